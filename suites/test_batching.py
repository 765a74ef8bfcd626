"""Padded batches: FMS equals HF on the SAME padded batch (encoder, projector, logits compared at the valid positions),
for clips of three different lengths and prompts of different text lengths padded left or right.

Also HF's documented batching semantics, tested as such: the encoder has no padding mask, so HF itself gives a clip
different encoder states alone and padded in a batch. The test asserts that difference exceeds the tolerance AND that
FMS reproduces HF's batched value, so a batched/single difference is HF's semantics, not a bug of ours. The decoder,
which does mask padding, must give a left-padded prompt the same logits as the prompt alone.

Runs on the session checkpoint, device and dtype (`model:...` in the test id); every comparison goes through
`parity.testing.assert_parity` (gate and regression bound) and records its measured error.
"""

import pytest
import torch

from granite_speech import lengths
from granite_speech.model import padding_attn_kwargs
from parity.diff import compare
from parity.granite.hf import hf_audio_features, hf_encoder, hf_logits_to_fms, set_hf_adapter
from parity.testing import assert_parity
from parity.tolerances import tolerance_for

pytestmark = pytest.mark.runs_at("session")

AUDIO = "<|audio|>"
# different text lengths around the placeholder, so the padding comes from text and audio alike
PROMPTS = [
    f"{AUDIO} transcribe",
    f"please listen to this recording carefully {AUDIO} and write down every word",
    f"clip: {AUDIO}",
]
TEXT_PROMPTS = ["hello", "a somewhat longer text prompt about boats and harbours", "three words here"]
CLIP_IDS = ("9002-102-0000", "9004-104-0000", "9002-102-0001")  # 13175, 38240, 63840 samples


def _judge(name, fms_value, hf_value, dtype, device, record_property, tolerance_class="activation"):
    assert_parity(name, hf_value, fms_value, dtype=dtype, device=device, tolerance_class=tolerance_class,
                  record=record_property)


def _hf_logits(hf_model, logits):
    """HF logits in FMS's convention, with the scaling HF's own config states (never FMS's, which would hide a
    dropped logits_scaling on the 5.10+ line)."""
    return hf_logits_to_fms(logits, hf_model.config.text_config.logits_scaling)


def _run_hf_encoder(hf_model, features):
    out = hf_encoder(hf_model)(features)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.fixture(scope="module")
def clips(speech_dataset):
    by_id = {row["id"]: row["audio"]["array"] for row in speech_dataset}
    return [torch.tensor(by_id[clip_id], dtype=torch.float32) for clip_id in CLIP_IDS]


@pytest.fixture(scope="module")
def valid_encoder_frames(clips):
    return [int(lengths.encoder_frames(lengths.mel_frames(clip.numel()))) for clip in clips]


@pytest.fixture(scope="module", params=["left", "right"])
def padded_batch(request, clips, hf_processor, device, dtype):
    inputs = hf_processor(text=PROMPTS, audio=clips, return_tensors="pt", padding=True, padding_side=request.param)
    mask = inputs["attention_mask"]
    assert (mask == 0).any(dim=1).sum() == 2, "two of the three prompts must be padded"
    return {
        "input_ids": inputs["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "input_features": inputs["input_features"].to(device, dtype),
        "input_features_mask": inputs["input_features_mask"].to(device),
    }


@torch.no_grad()
def test_encoder_on_padded_batch_matches_hf_at_valid_frames(
    hf_model, fms_model, padded_batch, valid_encoder_frames, dtype, device, record_property
):
    features = padded_batch["input_features"]
    assert features.shape[1] == max(valid_encoder_frames) and len(set(valid_encoder_frames)) == 3
    hf_out, fms_out = _run_hf_encoder(hf_model, features), fms_model.encoder(features)
    for row, frames in enumerate(valid_encoder_frames):
        _judge(f"encoder_row{row}", fms_out[row, :frames], hf_out[row, :frames], dtype, device, record_property)


@torch.no_grad()
def test_projector_on_padded_batch_matches_hf_at_valid_tokens(
    hf_model, fms_model, padded_batch, dtype, device, record_property
):
    features, valid = padded_batch["input_features"], padded_batch["input_features_mask"]
    hf_out, fms_out = hf_audio_features(hf_model, features), fms_model.get_audio_features(features)
    assert valid.shape == fms_out.shape[:2] and not valid.all()
    _judge("projector_valid_tokens", fms_out[valid], hf_out[valid], dtype, device, record_property)


@torch.no_grad()
def test_logits_on_padded_batch_match_hf_at_valid_positions(
    hf_model, fms_model, padded_batch, dtype, device, record_property
):
    attn = padding_attn_kwargs(padded_batch["attention_mask"], dtype=dtype)
    set_hf_adapter(hf_model, True)
    hf_logits = hf_model(**padded_batch, position_ids=attn["position_ids"]).logits
    fms_logits = fms_model(
        padded_batch["input_ids"],
        input_features=padded_batch["input_features"],
        input_features_mask=padded_batch["input_features_mask"],
        **attn,
    )
    valid = padded_batch["attention_mask"].bool()
    hf_logits = _hf_logits(hf_model, hf_logits)
    _judge("logits_valid_positions", fms_logits[valid], hf_logits[valid], dtype, device, record_property, "logits")


@pytest.fixture(scope="module")
def clip_with_padded_last_block(speech_dataset, fms_model):
    """A speech segment cut to 1.5 attention blocks of encoder frames, and a dataset clip at least one block longer:
    batched, the segment's last block is half padding. The segment comes from the middle of the longest clip so that
    its last block holds speech (a block of silence has the padding's features, and attending to more copies of
    the same frame changes nothing)."""
    context = fms_model.config.encoder_config.context_size
    frames = context + context // 2
    num_samples = (2 * frames - 1) * lengths.HOP_LENGTH  # mel frames = 2 * frames, so exactly `frames` encoder frames
    clips = sorted((torch.tensor(row["audio"]["array"]) for row in speech_dataset), key=len)
    longer = next(c for c in clips if lengths.encoder_frames(lengths.mel_frames(c.numel())) >= frames + context)
    source = clips[-1]
    assert source.numel() >= num_samples
    start = (source.numel() - num_samples) // 2
    return source[start : start + num_samples].clone(), longer, frames


@torch.no_grad()
def test_hf_encoder_batched_differs_from_single_and_fms_reproduces_it(
    hf_model, fms_model, clip_with_padded_last_block, hf_processor, dtype, device, record_property
):
    """The short clip's own valid frames, encoded alone and as row 0 of the padded batch (same feature values:
    only the padding frames appended by batching differ). HF's encoder attends to those padding frames (block
    attention and the depthwise conv), so its batched states differ from its single ones beyond the tolerance."""
    short, longer, frames = clip_with_padded_last_block
    inputs = hf_processor(text=[AUDIO, AUDIO], audio=[short, longer], return_tensors="pt", padding=True)
    batch = inputs["input_features"].to(device, dtype)
    assert batch.shape[1] > frames
    alone = batch[:1, :frames]
    context = fms_model.config.encoder_config.context_size
    last_block = alone[0, context:].float()
    assert last_block.max() - last_block.min() > 0.5, "the segment's last block is silent; pick another segment"

    hf_batched = _run_hf_encoder(hf_model, batch)[0, :frames]
    hf_alone = _run_hf_encoder(hf_model, alone)[0]
    semantics = compare(hf_alone, hf_batched, tolerance_for(dtype, device))
    record_property("hf_batched_vs_single_max_abs_diff", semantics.metrics.max_abs)
    assert not semantics.passed, (
        f"HF's encoder gave the same states alone and padded in a batch ({semantics.detail}); the documented "
        "no-padding-mask semantics would make them differ"
    )

    _judge("fms_batched_vs_hf_batched", fms_model.encoder(batch)[0, :frames], hf_batched, dtype, device,
           record_property)
    _judge("fms_single_vs_hf_single", fms_model.encoder(alone)[0], hf_alone, dtype, device, record_property)


@torch.no_grad()
def test_left_padded_text_prompts_equal_each_prompt_alone(
    hf_model, fms_model, hf_processor, dtype, device, record_property
):
    """The decoder masks padding: every row of a left-padded batch equals that prompt run alone (FMS), and equals
    HF's batched logits."""
    inputs = hf_processor.tokenizer(TEXT_PROMPTS, return_tensors="pt", padding=True, padding_side="left").to(device)
    mask = inputs["attention_mask"]
    assert (mask == 0).any(dim=1).sum() == 2
    attn = padding_attn_kwargs(mask, dtype=dtype)
    batched = fms_model(inputs["input_ids"], **attn)

    set_hf_adapter(hf_model, True)  # FMS's default model has the LoRA merged: HF with the adapter on is its reference
    hf_logits = hf_model(**inputs, position_ids=attn["position_ids"]).logits
    hf_logits = _hf_logits(hf_model, hf_logits)
    _judge("text_batched_vs_hf", batched[mask.bool()], hf_logits[mask.bool()], dtype, device, record_property,
           "logits")

    for row in range(len(TEXT_PROMPTS)):
        real = mask[row].bool()
        alone = fms_model(inputs["input_ids"][row : row + 1, real])
        _judge(f"text_row{row}_batched_vs_alone", batched[row, real], alone[0], dtype, device, record_property,
               "logits")
