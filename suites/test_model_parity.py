"""The FMS model against the HF reference built from the same checkpoint: encoder, projector, logits with audio,
text-only logits (adapter off on both sides) and greedy generation, for batch 1 and a left-padded batch of 3.

Each comparison records its measured max |diff| as a junit property (`record_property`), so CI logs carry numbers.
"""

import pytest
import torch
from fms.utils.generation import generate

from granite_speech.model import padding_attn_kwargs
from parity.diff import compare
from parity.tolerances import dtype_name, tolerance_for
from parity.granite.hf import hf_audio_features, hf_encoder, hf_logits_to_fms, set_hf_adapter
from granite_speech.checkpoint import load_model

PROMPT = "<|audio|> please transcribe this clip."
TEXT_PROMPTS = ["the quick brown fox", "a much longer prompt about the middle classes and their gospel", "hi there"]
BATCHES = {"batch1": [0], "batch3": [0, 1, 2]}


def _close(name, fms_value, hf_value, dtype, device, record_property, valid=None, tolerance_class="activation"):
    """Judge with the harness's own diff engine (dtype-keyed, ulp-aware tolerance table) and record the numbers."""
    tol = tolerance_for(dtype, device, tolerance_class)
    if valid is not None:  # compare only real (non-pad) positions: pad rows are undefined on both sides
        fms_value, hf_value = fms_value[valid], hf_value[valid]
    result = compare(hf_value.detach().cpu(), fms_value.detach().cpu(), tol, ulp_dtype=dtype_name(dtype))
    metrics = result.metrics
    if metrics is not None:
        record_property(f"{name}_max_abs_diff", metrics.max_abs)
    assert result.passed, f"{name}: {result.status} {result.detail} (atol {tol.atol}, rtol {tol.rtol}) {metrics}"


@pytest.fixture(scope="module")
def clips(speech_dataset):
    # three clips of different lengths, shortest first excluded so batch1 is not the trivial one
    by_length = sorted(speech_dataset, key=lambda row: len(row["audio"]["array"]))
    chosen = [by_length[2], by_length[0], by_length[1]]
    return [torch.tensor(row["audio"]["array"], dtype=torch.float32) for row in chosen]


@pytest.fixture(scope="module", params=list(BATCHES))
def audio_batch(request, clips, hf_processor, device, dtype):
    picked = [clips[i] for i in BATCHES[request.param]]
    inputs = hf_processor(text=[PROMPT] * len(picked), audio=picked, return_tensors="pt", padding=True,
                          padding_side="left")
    return {
        "input_ids": inputs["input_ids"].to(device),
        "attention_mask": inputs["attention_mask"].to(device),
        "input_features": inputs["input_features"].to(device, dtype),
        "input_features_mask": inputs["input_features_mask"].to(device),
    }


@pytest.fixture(scope="module")
def fms_audio_only(checkpoint_dir, device, dtype):
    return load_model(checkpoint_dir, dtype=dtype, device=device, lora_mode="audio_only")


def _position_ids(attention_mask):
    return padding_attn_kwargs(attention_mask)["position_ids"]


@torch.no_grad()
def test_encoder(hf_model, fms_model, audio_batch, dtype, device, record_property):
    hf_out = hf_encoder(hf_model)(audio_batch["input_features"])
    hf_out = hf_out if isinstance(hf_out, torch.Tensor) else hf_out.last_hidden_state
    _close("encoder", fms_model.encoder(audio_batch["input_features"]), hf_out, dtype, device, record_property)


@torch.no_grad()
def test_projector(hf_model, fms_model, audio_batch, dtype, device, record_property):
    hf_out = hf_audio_features(hf_model, audio_batch["input_features"])
    fms_out = fms_model.get_audio_features(audio_batch["input_features"])
    _close("projector", fms_out, hf_out, dtype, device, record_property)


@torch.no_grad()
def test_logits_with_audio(hf_model, fms_model, audio_batch, dtype, device, record_property):
    set_hf_adapter(hf_model, True)
    position_ids = _position_ids(audio_batch["attention_mask"])
    hf_logits = hf_model(**audio_batch, position_ids=position_ids).logits
    attn = padding_attn_kwargs(audio_batch["attention_mask"], dtype=dtype)
    fms_logits = fms_model(
        audio_batch["input_ids"],
        input_features=audio_batch["input_features"],
        input_features_mask=audio_batch["input_features_mask"],
        **attn,
    )
    valid = audio_batch["attention_mask"].bool()
    scaling = fms_model.config.text_config.logits_scaling
    _close("logits_audio", fms_logits, hf_logits_to_fms(hf_logits, scaling), dtype, device, record_property, valid,
           "logits")


@pytest.mark.parametrize("batch", list(BATCHES))
@torch.no_grad()
def test_logits_text_only_adapter_off(hf_model, fms_audio_only, hf_processor, batch, dtype, device, record_property):
    prompts = [TEXT_PROMPTS[i] for i in BATCHES[batch]]
    inputs = hf_processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    set_hf_adapter(hf_model, False)
    try:
        hf_logits = hf_model(**inputs, position_ids=_position_ids(inputs["attention_mask"])).logits
    finally:
        set_hf_adapter(hf_model, True)
    fms_logits = fms_audio_only(inputs["input_ids"], **padding_attn_kwargs(inputs["attention_mask"], dtype=dtype))
    scaling = fms_audio_only.config.text_config.logits_scaling
    valid = inputs["attention_mask"].bool()
    _close("logits_text", fms_logits, hf_logits_to_fms(hf_logits, scaling), dtype, device, record_property, valid,
           "logits")


@torch.no_grad()
def test_audio_only_mode_with_audio_equals_merged(fms_model, fms_audio_only, audio_batch, dtype, device, record_property):
    attn = padding_attn_kwargs(audio_batch["attention_mask"], dtype=dtype)
    kwargs = dict(input_features=audio_batch["input_features"], input_features_mask=audio_batch["input_features_mask"])
    merged = fms_model(audio_batch["input_ids"], **kwargs, **attn)
    separate = fms_audio_only(audio_batch["input_ids"], **kwargs, **attn)
    _close("lora_modes", separate, merged, dtype, device, record_property, audio_batch["attention_mask"].bool(),
           "logits")


NEW_TOKENS = 32


@torch.no_grad()
def test_greedy_generation_identical(hf_model, fms_model, audio_batch, dtype, device, record_property):
    """Greedy tokens identical for NEW_TOKENS steps, and every step's logits within tolerance: random tied-head
    models tend to repeat one token, so the logits keep the comparison sharp where the tokens alone would not."""
    set_hf_adapter(hf_model, True)
    prompt_len = audio_batch["input_ids"].size(1)
    hf_out = hf_model.generate(
        **audio_batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    fms_step_logits = []

    def keep_logits(position, logits, next_val, kwargs):
        fms_step_logits.append(logits)
        return next_val, kwargs

    fms_tokens = generate(
        fms_model,
        audio_batch["input_ids"],
        max_seq_len=prompt_len + NEW_TOKENS,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        prepare_model_inputs_hook=fms_model.prepare_inputs_for_generation,
        post_iteration_hook=keep_logits,
        extra_kwargs={
            "input_features": audio_batch["input_features"],
            "input_features_mask": audio_batch["input_features_mask"],
            **padding_attn_kwargs(audio_batch["attention_mask"], dtype=dtype),
        },
    )[:, prompt_len:]
    hf_tokens = hf_out.sequences[:, prompt_len:]
    record_property("distinct_generated_tokens", len(set(hf_tokens.flatten().tolist())))
    assert torch.equal(fms_tokens, hf_tokens), f"FMS {fms_tokens.tolist()} != HF {hf_tokens.tolist()}"
    scaling = fms_model.config.text_config.logits_scaling
    # HF's generate hands out float32 copies of the model-dtype logits (an exact upcast): compare in the model dtype
    hf_steps = torch.stack([hf_logits_to_fms(step, scaling) for step in hf_out.logits], dim=1).to(dtype)
    _close("generation_step_logits", torch.stack(fms_step_logits, dim=1), hf_steps, dtype, device, record_property,
           tolerance_class="logits")
