"""`granite-speech transcribe` for every family member, end to end, against HF's own pipeline on the same clips.

The checkpoint's config.json picks the path: the LLM members (4.0-1b / 4.1-2b on the 3.3 classes with the LoRA merged
in, 4.1-2b-plus) run our feature extractor, processor, FMS generate and decode; the CTC member (5.0) our
`GraniteSpeech5Processor`, `get_model("hf_pretrained")` and greedy CTC decoding (`ctc5.transcribe`). HF always builds
its own inputs: AutoProcessor, the tokenizer's chat template and `generate` for the LLMs; AutoProcessor, `generate`
and the processor's `batch_decode` (its CTC tokenizer collapses repeats and drops the blank) for 5.0.

`family_variant` follows --model (see the plugin): `--model tiny` runs tiny-4.0, tiny-plus and tiny-5 on CPU.
"""

import pytest
import torch

import transformers  # noqa: E402  (a hard dependency: a broken install fails, never skips)

from granite_speech.__main__ import DEFAULT_PROMPT, check_transcribe_inputs, main, transcribe  # noqa: E402
from granite_speech.audio import read_audio  # noqa: E402
from granite_speech.cli_errors import UsageError  # noqa: E402
from parity.granite.fixtures import SPEECH_DIR  # noqa: E402
from parity.granite.fixtures.family import TINY_FAMILY  # noqa: E402
from parity.granite.models import load_hf_family_model, member_of  # noqa: E402

CLIPS = [SPEECH_DIR / "9002-102-0000.flac", SPEECH_DIR / "9004-104-0000.flac"]  # 41 and 120 frames: a padded batch
NEW_TOKENS = 12
CTC = "granite_speech5_ctc"


@torch.no_grad()
def hf_transcripts(folder, clips, device, dtype, new_tokens: int = NEW_TOKENS):
    """HF's own pipeline on the clips (each read by HF's own `load_audio`); returns the texts."""
    from parity.granite.hf import hf_load_audio

    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    model = load_hf_family_model(folder, dtype, str(device))
    audio = [hf_load_audio(clip, 16000).numpy() for clip in clips]
    if member_of(folder) == CTC:
        inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        return processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": DEFAULT_PROMPT}], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt] * len(audio), audio=audio, return_tensors="pt", padding=True,
                       padding_side="left")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].size(1):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(family_checkpoint, device, dtype):
    """HF's transcripts of the member, run once: both decoders are judged against them."""
    return hf_transcripts(family_checkpoint, CLIPS, device, dtype)


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_transcribe_matches_hf(family_checkpoint, device, dtype, record_property, decoder, request):
    if decoder == "fast" and member_of(family_checkpoint) == CTC:  # one forward: no decode loop to run fast
        with pytest.raises(UsageError, match="decoder fast: .* is a CTC model"):
            check_transcribe_inputs(family_checkpoint, CLIPS, decoder="fast")
        return
    expected = request.getfixturevalue("expected")  # not for the CTC member's fast case, which has none to run
    assert any(text.strip() for text in expected), "HF produced only empty transcripts: the comparison would be weak"
    got = transcribe(family_checkpoint, CLIPS, max_new_tokens=NEW_TOKENS, device=device, dtype=dtype,
                     decoder=decoder)
    record_property("transcripts", got)
    assert got == expected


def test_transcribe_picks_the_member_before_loading(family_checkpoint):
    job = check_transcribe_inputs(family_checkpoint, CLIPS)
    assert job.member == member_of(family_checkpoint)
    assert [a.numel() for a in job.audio] == [read_audio(c, 16000).numel() for c in CLIPS]


# the CLI is exercised on the tiny fixtures: deselected at real sizes, with the reason
@pytest.mark.family_members(*TINY_FAMILY)
def test_transcribe_cli_prints_one_line_per_clip(family_variant, family_checkpoint, capsys):
    assert main(["transcribe", "--checkpoint", str(family_checkpoint), *map(str, CLIPS), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(clip) for clip in CLIPS]
    # no adapter files is how these members ship (LoRA merged, or none): no warning about a missing adapter
    assert "no adapter_config.json" not in captured.err


def test_ctc_member_takes_no_prompt(family_checkpoint):
    """5.0 has no prompt: one without <|audio|> is accepted (and unused); the LLM members still refuse it."""
    from granite_speech.cli_errors import UsageError

    if member_of(family_checkpoint) == CTC:
        assert check_transcribe_inputs(family_checkpoint, CLIPS[:1], instruction="no placeholder").member == CTC
    else:
        with pytest.raises(UsageError):
            check_transcribe_inputs(family_checkpoint, CLIPS[:1], instruction="no placeholder")
