"""The FMS model against the HF reference built from the same checkpoint: encoder, projector, logits with audio,
text-only logits (adapter off on both sides) and greedy generation, for batch 1 and a left-padded batch of 3.

Two checkpoints, each on the session's device and dtype (the test id says which, e.g. `model:tiny/cpu/float32`):
- `model:<--model>`: the session checkpoint (--model / --checkpoint);
- `fixed:tiny-untied`: the tiny fixture whose every defaultable hyperparameter differs from the HF and FMS defaults
  (rope_theta, rms/Q-Former eps, multipliers, GQA ratio 3, LoRA alpha/r = 9/6), so that a field the port drops and
  replaces by a default changes the numbers.

Every comparison goes through `parity.testing.assert_parity` (the documented gate and the tight regression bound
beside it) and records its measured error as junit properties. HF logits are brought to FMS's convention with HF's
own `logits_scaling` (never FMS's: a dropped scaling would otherwise cancel out). Generation tests first assert that
what they compare is informative: varied tokens, rows that differ, audio that changes the result.
"""

import pytest
import torch
from fms.utils.generation import generate

from granite_speech.checkpoint import load_model
from granite_speech.model import padding_attn_kwargs
from parity.granite.fixtures import build_checkpoint
from parity.granite.hf import hf_audio_features, hf_encoder, hf_logits_to_fms, load_hf_model, set_hf_adapter
from parity.granite.plugin import resolve_run_scope
from parity.testing import assert_parity

PROMPT = "<|audio|> please transcribe this clip."
TEXT_PROMPTS = ["the quick brown fox", "a much longer prompt about the middle classes and their gospel", "hi there"]
BATCHES = {"batch1": [0], "batch3": [0, 1, 2]}
FIXED_CHECKPOINT = "tiny-untied"
NEW_TOKENS = 32
MIN_DISTINCT_TOKENS = 8  # of NEW_TOKENS per row
MIN_CHANGED_BY_AUDIO = 0.25  # share of a row's generated tokens that other audio must change


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        scopes = [resolve_run_scope(metafunc.config), resolve_run_scope(metafunc.config, FIXED_CHECKPOINT)]
        metafunc.parametrize("case", scopes, ids=[s.id for s in scopes], indirect=True, scope="module")


class Case:
    def __init__(self, checkpoint, hf_model, fms_model, processor, device, dtype):
        self.checkpoint, self.hf, self.fms, self.processor = checkpoint, hf_model, fms_model, processor
        self.device, self.dtype = device, dtype
        self._audio_only = None

    @property
    def fms_audio_only(self):
        if self._audio_only is None:
            self._audio_only = load_model(self.checkpoint, dtype=self.dtype, device=self.device, lora_mode="audio_only")
        return self._audio_only

    def hf_logits(self, logits):
        """HF logits in FMS's convention, with the scaling HF's own config states."""
        return hf_logits_to_fms(logits, self.hf.config.text_config.logits_scaling)


@pytest.fixture(scope="module")
def case(request):
    scope = request.param
    if not scope.fixed:
        return Case(request.getfixturevalue("checkpoint_dir"), request.getfixturevalue("hf_model"),
                    request.getfixturevalue("fms_model"), request.getfixturevalue("hf_processor"), scope.device,
                    scope.dtype)
    from transformers import AutoProcessor

    folder = build_checkpoint(scope.size)
    return Case(folder, load_hf_model(folder, dtype=scope.dtype, device=str(scope.device)),
                load_model(folder, dtype=scope.dtype, device=scope.device), AutoProcessor.from_pretrained(str(folder)),
                scope.device, scope.dtype)


@pytest.fixture(scope="module")
def clips(speech_dataset):
    # three clips of different lengths, shortest first excluded so batch1 is not the trivial one
    by_length = sorted(speech_dataset, key=lambda row: len(row["audio"]["array"]))
    chosen = [by_length[2], by_length[0], by_length[1]]
    return [torch.tensor(row["audio"]["array"], dtype=torch.float32) for row in chosen]


@pytest.fixture(scope="module", params=list(BATCHES))
def audio_batch(request, case, clips):
    picked = [clips[i] for i in BATCHES[request.param]]
    inputs = case.processor(text=[PROMPT] * len(picked), audio=picked, return_tensors="pt", padding=True,
                            padding_side="left")
    return {
        "input_ids": inputs["input_ids"].to(case.device),
        "attention_mask": inputs["attention_mask"].to(case.device),
        "input_features": inputs["input_features"].to(case.device, case.dtype),
        "input_features_mask": inputs["input_features_mask"].to(case.device),
    }


def _position_ids(attention_mask):
    return padding_attn_kwargs(attention_mask)["position_ids"]


def _fms_audio_logits(model, batch, dtype, features=None):
    return model(
        batch["input_ids"],
        input_features=batch["input_features"] if features is None else features,
        input_features_mask=batch["input_features_mask"],
        **padding_attn_kwargs(batch["attention_mask"], dtype=dtype),
    )


@torch.no_grad()
def test_encoder(case, audio_batch, record_property):
    hf_out = hf_encoder(case.hf)(audio_batch["input_features"])
    hf_out = hf_out if isinstance(hf_out, torch.Tensor) else hf_out.last_hidden_state
    assert_parity("encoder", hf_out, case.fms.encoder(audio_batch["input_features"]), dtype=case.dtype,
                  device=case.device, record=record_property)


@torch.no_grad()
def test_projector(case, audio_batch, record_property):
    hf_out = hf_audio_features(case.hf, audio_batch["input_features"])
    fms_out = case.fms.get_audio_features(audio_batch["input_features"])
    assert_parity("projector", hf_out, fms_out, dtype=case.dtype, device=case.device, record=record_property)


@torch.no_grad()
def test_logits_with_audio(case, audio_batch, record_property):
    set_hf_adapter(case.hf, True)
    position_ids = _position_ids(audio_batch["attention_mask"])
    hf_logits = case.hf(**audio_batch, position_ids=position_ids).logits
    fms_logits = _fms_audio_logits(case.fms, audio_batch, case.dtype)
    valid = audio_batch["attention_mask"].bool()
    # informative: other audio (the features time-reversed) moves the logits far beyond the gate
    other = _fms_audio_logits(case.fms, audio_batch, case.dtype, audio_batch["input_features"].flip(1))
    moved = float((other - fms_logits)[valid].abs().max())
    record_property("logits_moved_by_other_audio", moved)
    assert moved > 0.1 * float(fms_logits[valid].abs().max()), f"other audio moved the logits by only {moved:.3g}"
    assert_parity("logits_audio", case.hf_logits(hf_logits), fms_logits, dtype=case.dtype, device=case.device,
                  tolerance_class="logits", valid=valid, record=record_property)


@pytest.mark.parametrize("batch", list(BATCHES))
@torch.no_grad()
def test_logits_text_only_adapter_off(case, batch, record_property):
    prompts = [TEXT_PROMPTS[i] for i in BATCHES[batch]]
    inputs = case.processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(case.device)
    set_hf_adapter(case.hf, False)
    try:
        hf_logits = case.hf(**inputs, position_ids=_position_ids(inputs["attention_mask"])).logits
    finally:
        set_hf_adapter(case.hf, True)
    model = case.fms_audio_only
    fms_logits = model(inputs["input_ids"], **padding_attn_kwargs(inputs["attention_mask"], dtype=case.dtype))
    assert_parity("logits_text", case.hf_logits(hf_logits), fms_logits, dtype=case.dtype, device=case.device,
                  tolerance_class="logits", valid=inputs["attention_mask"].bool(), record=record_property)


@torch.no_grad()
def test_audio_only_mode_with_audio_equals_merged(case, audio_batch, record_property):
    merged = _fms_audio_logits(case.fms, audio_batch, case.dtype)
    separate = _fms_audio_logits(case.fms_audio_only, audio_batch, case.dtype)
    assert_parity("lora_modes", merged, separate, dtype=case.dtype, device=case.device, tolerance_class="logits",
                  valid=audio_batch["attention_mask"].bool(), record=record_property)


def _hf_generate(hf_model, batch, features=None):
    inputs = dict(batch, input_features=batch["input_features"] if features is None else features)
    return hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)


def assert_varied_generation(tokens, changed_by_audio, record_property):
    """The comparison is informative: every row varied, rows different from each other, audio changing them."""
    distinct = [len(set(row)) for row in tokens.tolist()]
    record_property("distinct_generated_tokens_per_row", distinct)
    assert min(distinct) >= MIN_DISTINCT_TOKENS, f"degenerate generation: distinct tokens per row {distinct}"
    rows = [tuple(row) for row in tokens.tolist()]
    assert len(set(rows)) == len(rows), "two rows generated the same tokens"
    record_property("share_changed_by_other_audio", changed_by_audio)
    assert min(changed_by_audio) >= MIN_CHANGED_BY_AUDIO, f"other audio changed only {changed_by_audio} of each row"


@torch.no_grad()
def test_greedy_generation_identical(case, audio_batch, record_property):
    """Greedy tokens identical for NEW_TOKENS steps, and every step's logits within tolerance."""
    set_hf_adapter(case.hf, True)
    prompt_len = audio_batch["input_ids"].size(1)
    hf_out = _hf_generate(case.hf, audio_batch)
    hf_tokens = hf_out.sequences[:, prompt_len:]
    other_audio = _hf_generate(case.hf, audio_batch, audio_batch["input_features"].flip(1)).sequences[:, prompt_len:]
    assert_varied_generation(hf_tokens, (hf_tokens != other_audio).float().mean(-1).tolist(), record_property)

    fms_step_logits = []

    def keep_logits(position, logits, next_val, kwargs):
        fms_step_logits.append(logits)
        return next_val, kwargs

    fms_tokens = generate(
        case.fms,
        audio_batch["input_ids"],
        max_seq_len=prompt_len + NEW_TOKENS,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        prepare_model_inputs_hook=case.fms.prepare_inputs_for_generation,
        post_iteration_hook=keep_logits,
        extra_kwargs={
            "input_features": audio_batch["input_features"],
            "input_features_mask": audio_batch["input_features_mask"],
            **padding_attn_kwargs(audio_batch["attention_mask"], dtype=case.dtype),
        },
    )[:, prompt_len:]
    assert torch.equal(fms_tokens, hf_tokens), f"FMS {fms_tokens.tolist()} != HF {hf_tokens.tolist()}"
    # HF's generate hands out float32 copies of the model-dtype logits (an exact upcast): compare in the model dtype
    hf_steps = torch.stack([case.hf_logits(step) for step in hf_out.logits], dim=1).to(case.dtype)
    assert_parity("generation_step_logits", hf_steps, torch.stack(fms_step_logits, dim=1), dtype=case.dtype,
                  device=case.device, tolerance_class="logits", record=record_property)
