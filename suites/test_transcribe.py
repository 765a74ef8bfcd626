"""`python -m granite_speech transcribe` end to end (our feature extractor, processor, FMS generate, decode) against
HF's processor + generate + decode on the same clips. Uses the untied tiny fixture: tied random heads repeat one token,
which would make the text comparison weak."""

import pytest
import torch

from granite_speech.__main__ import DEFAULT_PROMPT, build_prompt, transcribe
from granite_speech.audio import read_audio
from parity.granite.fixtures import SPEECH_DIR, build_checkpoint
from parity.granite.hf import load_hf_model, set_hf_adapter

CLIPS = [SPEECH_DIR / "9002-102-0000.flac", SPEECH_DIR / "9004-104-0000.flac"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def untied():
    return build_checkpoint("tiny-untied")


@torch.no_grad()
def test_transcribe_matches_hf(untied):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(untied))
    hf = load_hf_model(untied)
    set_hf_adapter(hf, True)
    audio = [read_audio(clip, 16000) for clip in CLIPS]
    prompt = build_prompt(processor.tokenizer, DEFAULT_PROMPT)
    inputs = processor(text=[prompt] * len(audio), audio=audio, return_tensors="pt", padding=True, padding_side="left")
    out = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].size(1):], skip_special_tokens=True)
    assert any(text.strip() for text in expected), "HF produced only empty transcripts: the comparison would be weak"
    assert transcribe(untied, CLIPS, max_new_tokens=NEW_TOKENS) == expected


def test_transcribe_cli_prints_one_line_per_clip(untied, capsys):
    from granite_speech.__main__ import main

    assert main(["transcribe", "--checkpoint", str(untied), *map(str, CLIPS), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(clip) for clip in CLIPS]
