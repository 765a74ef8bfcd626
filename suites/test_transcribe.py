"""`python -m granite_speech transcribe` end to end (our feature extractor, processor, FMS generate, decode) against
HF's processor + generate + decode on the same clips. Uses the untied tiny fixture: tied random heads repeat one token,
which would make the text comparison weak.

HF always builds its own prompt (its tokenizer's chat template, as the model card does) and runs its own `generate`;
nothing of ours is fed to it.

The transcripts are compared on the session's device (`fixed:tiny-untied/<device>/float32`): under --device cuda the
fast decoder replays its steps from CUDA graphs, as `transcribe` runs in production. The CLI's own behaviour (output
lines, warnings, the decoder check) does not depend on the device: CPU only (`fixed:tiny-untied/cpu/float32`).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from granite_speech.__main__ import DEFAULT_PROMPT, transcribe
from granite_speech.audio import read_audio
from parity.granite.fixtures import SPEECH_DIR, build_checkpoint
from parity.granite.hf import load_hf_model, set_hf_adapter
from parity.granite.plugin import marked_scope

CLIPS = [SPEECH_DIR / "9002-102-0000.flac", SPEECH_DIR / "9004-104-0000.flac"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def untied():
    return build_checkpoint("tiny-untied")


@torch.no_grad()
def hf_transcripts(folder: Path, clips, device, new_tokens: int = NEW_TOKENS):
    """HF's own pipeline on `device`: AutoProcessor, the tokenizer's chat template, generate, batch_decode. Returns
    (texts, new token ids [B, n] on the CPU, the processor's inputs on the CPU)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    hf = load_hf_model(folder, device=str(device))
    set_hf_adapter(hf, True)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": DEFAULT_PROMPT}], tokenize=False, add_generation_prompt=True)
    audio = [read_audio(clip, 16000) for clip in clips]
    inputs = processor(text=[prompt] * len(audio), audio=audio, return_tensors="pt", padding=True, padding_side="left")
    out = hf.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].size(1):].cpu()
    return processor.batch_decode(new, skip_special_tokens=True), new, inputs


# both decoding loops of transcribe: FMS generate, and the static-cache fast path (its default on CUDA)
DECODERS = pytest.mark.parametrize("decoder", ["eager", "fast"])
CPU_ONLY = pytest.mark.runs_at("tiny-untied", device="cpu", dtype="float32")
pytestmark = pytest.mark.runs_at("tiny-untied", dtype="float32")  # the session's device, but for CPU_ONLY tests


@pytest.fixture(scope="module")
def run_device(request) -> torch.device:
    return marked_scope(request).device


@pytest.fixture(scope="module")
def hf_reference(run_device):
    """`hf_reference(folder)`: `hf_transcripts` of a folder, run once (both decoders are judged against it)."""
    runs = {}

    def get(folder: Path):
        if folder not in runs:
            runs[folder] = hf_transcripts(folder, CLIPS, run_device)
        return runs[folder]

    return get


@pytest.fixture
def graph_use(monkeypatch):
    """Records `use_cuda_graph` of every fast-path call that transcribe makes."""
    import granite_speech.fast_generate as fast_generate

    calls, original = [], fast_generate.generate_static

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_cuda_graph", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_generate, "generate_static", spy)
    return calls


def transcribe_on(folder, device, decoder, graph_use):
    """transcribe() on `device`; the fast decoder must have run from CUDA graphs exactly when the device is CUDA."""
    texts = transcribe(folder, CLIPS, max_new_tokens=NEW_TOKENS, decoder=decoder, device=device)
    assert graph_use == ([device.type == "cuda"] if decoder == "fast" else []), graph_use
    return texts


@DECODERS
def test_transcribe_matches_hf(untied, run_device, hf_reference, graph_use, decoder):
    expected, _, _ = hf_reference(untied)
    assert any(text.strip() for text in expected), "HF produced only empty transcripts: the comparison would be weak"
    assert expected[0] != expected[1], "both clips give one transcript: a clip mix-up would pass"
    assert transcribe_on(untied, run_device, decoder, graph_use) == expected


@CPU_ONLY
def test_transcribe_cli_prints_one_line_per_clip(untied, capsys):
    from granite_speech.__main__ import main

    assert main(["transcribe", "--checkpoint", str(untied), *map(str, CLIPS), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(clip) for clip in CLIPS]


# ---------------------------------------------------------------------------------------------- rows end apart
TRIGGER_DIM = 63  # a residual-stream coordinate reserved for the eos trigger (the tiny text width is 64)


def _edit_shards(folder: Path, edit) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        tensors = load_file(str(folder / shard))
        edit(tensors)
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})


def _reserve_trigger_dim(tensors: dict) -> None:
    """Nothing writes coordinate J of the residual stream (embeddings, audio embeddings, attention and MLP outputs)
    and the head ignores it: the model computes what it computed on the other 63 coordinates."""
    j = TRIGGER_DIM
    for key, value in tensors.items():
        if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) or key in (
                "projector.linear.weight", "projector.linear.bias"):
            value[j] = 0
        elif key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            value[:, j] = 0
        elif key == "language_model.model.norm.weight":
            value[j] = 1


@pytest.fixture(scope="module")
def rows_end_apart(untied, run_device, tmp_path_factory):
    """A copy of the untied tiny checkpoint on which row 0 of the batch emits eos several steps before row 1.

    Coordinate J of the residual stream is reserved (nothing writes it), then two tokens t0 and t1, generated by
    row 0 at step s0 and by row 1 at a later step s1 (and by no row earlier, nor in the prompt), get a large
    embedding on J, and the head's eos row reads J: feeding t0 or t1 makes eos the argmax, every other token leaves
    the computation unchanged. Returns (folder, step at which row 0 emits eos, same for row 1)."""
    folder = Path(shutil.copytree(untied, tmp_path_factory.mktemp("eos") / "ckpt"))
    _edit_shards(folder, _reserve_trigger_dim)
    _, new, inputs = hf_transcripts(folder, CLIPS, run_device)  # before the trigger edit: not hf_reference's
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(folder)).eos_token_id
    prompt = set(inputs["input_ids"].flatten().tolist())
    row0, row1 = new[0].tolist(), new[1].tolist()
    assert eos not in row0 and eos not in row1, "the reserved-coordinate model already emits eos: pick other clips"
    s0 = next((s for s in range(1, 4) if row0[s] not in prompt and row0[s] not in row1), None)
    assert s0 is not None, f"no trigger token for row 0 in {row0}"
    t0 = row0[s0]
    s1 = next((s for s in range(s0 + 2, NEW_TOKENS - 1) if row1[s] not in prompt and row1[s] not in row0[:s0 + 1]
               and row1[s] not in row1[:s] and row1[s] != t0), None)
    assert s1 is not None, f"no trigger token for row 1 in {row1}"
    t1 = row1[s1]

    def trigger(tensors):
        if "language_model.model.embed_tokens.weight" in tensors:
            tensors["language_model.model.embed_tokens.weight"][[t0, t1], TRIGGER_DIM] = 1000.0
        if "language_model.lm_head.weight" in tensors:
            tensors["language_model.lm_head.weight"][eos, TRIGGER_DIM] = 50.0

    _edit_shards(folder, trigger)
    return folder, s0 + 1, s1 + 1


@DECODERS
def test_each_row_stops_at_its_own_eos_like_hf(rows_end_apart, run_device, hf_reference, graph_use, decoder):
    folder, end0, end1 = rows_end_apart
    expected, new, _ = hf_reference(folder)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(folder)).eos_token_id
    # HF: the rows end at different steps, and HF stops after the later one
    assert new[0].tolist().index(eos) == end0 and new[1].tolist().index(eos) == end1 and new.size(1) == end1 + 1
    assert expected[0] != expected[1] and all(text.strip() for text in expected), expected
    assert transcribe_on(folder, run_device, decoder, graph_use) == expected


def test_generate_greedy_tokens_equal_hf_generate_on_hf_inputs(rows_end_apart, run_device, hf_reference):
    """The generation helper alone, on HF's own inputs: the same tokens as HF, pad after each row's eos, and the
    same number of steps (stops when the last row ends)."""
    from transformers import AutoTokenizer

    from granite_speech.checkpoint import load_model
    from granite_speech.generation import generate_greedy
    from granite_speech.model import padding_attn_kwargs

    folder, _, _ = rows_end_apart
    _, expected, inputs = hf_reference(folder)
    inputs = {k: v.to(run_device) for k, v in inputs.items()}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = load_model(folder, device=run_device)
    out = generate_greedy(
        model, inputs["input_ids"], max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        extra_kwargs={"input_features": inputs["input_features"], "input_features_mask": inputs["input_features_mask"],
                      **padding_attn_kwargs(inputs["attention_mask"])},
    )
    assert torch.equal(out[:, inputs["input_ids"].size(1):].cpu(), expected)


# ---------------------------------------------------------------------------------------------- warnings
@CPU_ONLY
def test_missing_adapter_is_a_warning_naming_the_lora_mode(untied, tmp_path, capsys):
    from granite_speech.__main__ import main

    folder = Path(shutil.copytree(untied, tmp_path / "no-adapter"))
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_model.safetensors").unlink()
    assert main(["transcribe", "--checkpoint", str(folder), str(CLIPS[0]), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {folder} has no adapter_config.json / adapter_model.safetensors, so no modality LoRA is "
            f"applied: lora_mode 'merged' ran with LoRA rank 0") in err, err


@CPU_ONLY
@DECODERS
def test_empty_transcript_is_pointed_out(untied, monkeypatch, capsys, decoder):
    import granite_speech.fast_generate as fast_generate
    import granite_speech.generation as generation
    from granite_speech.__main__ import main

    def eos_at_once(model, input_ids, *args, eos_token_id, **kwargs):
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], eos_token_id)], dim=1)

    monkeypatch.setattr(generation, "generate_greedy", eos_at_once)
    monkeypatch.setattr(fast_generate, "generate_static", eos_at_once)
    assert main(["transcribe", "--checkpoint", str(untied), str(CLIPS[0]), "--decoder", decoder]) == 0
    out, err = capsys.readouterr()
    assert out == f"{CLIPS[0]}\t\n"
    assert f"warning: {CLIPS[0]}: empty transcript (the model emitted 0 token(s) before end-of-text)" in err, err


@CPU_ONLY
def test_decoder_choice_is_checked_before_loading(untied):
    from granite_speech.__main__ import check_transcribe_inputs
    from granite_speech.cli_errors import UsageError

    with pytest.raises(UsageError, match="decoder must be one of auto, eager, fast, got 'graph'"):
        check_transcribe_inputs(untied, CLIPS, decoder="graph")
    assert check_transcribe_inputs(untied, CLIPS, device="cpu").decoder == "eager"  # auto: fast only on CUDA
    assert check_transcribe_inputs(untied, CLIPS, device="cpu", decoder="fast").decoder == "fast"
