"""granite-speech-4.1-2b-plus (HF `granite_speech_plus`) in FMS against HF transformers.

The member follows --model / --device / --dtype (`family_variant`, see the plugin): the CPU gate (--model tiny) runs
the tiny version (configs/tiny-plus.json: cat_hidden_layers [0, 2], i.e. the input_linear output and the
self-conditioning block's output) on the CPU in fp32, `--model 4.1-2b-plus --device cuda` the member at its real
dimensions. Either is the seeded family fixture (random weights drawn with HF's own classes, `save_pretrained`),
loaded through `get_model("hf_pretrained")`. Inputs: HF's feature extractor on a padded batch of two committed clips
of different lengths, prompts left-padded. Compared (tiny fp32: atol = rtol = 1e-4; otherwise the tolerance table):
the encoder output, each concatenated part, the projector output, the logits (valid text positions), and greedy
generation (tokens exactly, step logits). Configs, the width check and other concatenations are size-independent
(`fixed:...` in the test id: the CPU gate runs them).
"""

import pytest
import torch

import transformers  # noqa: E402  (a hard dependency: a broken install fails, never skips)
if not hasattr(transformers, "GraniteSpeechPlusForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no granite_speech_plus", allow_module_level=True)

from fms.models import get_model, list_variants
from fms.utils.generation import generate

import granite_speech  # noqa: F401
import granite_speech.plus as plus
from granite_speech.model import padding_attn_kwargs
from parity.granite.fixtures.family import (
    audio_prompt_batch,
    build_family_checkpoint,
    capture_outputs,
    hf_config,
    load_family_config,
    read_clip,
)
from parity.granite.hf import hf_logits_to_fms
from parity.testing import assert_parity
from parity.tolerances import Tolerance

TOL = Tolerance(1e-4, 1e-4, why="family parity suites: fp32 atol = rtol = 1e-4")  # the fixed-size tests'
CLIPS = ("9002-102-0001", "9001-101-0001")  # 199 and 121 encoder frames: 14 and 9 windows of the projector
NEW_TOKENS = 8
FIXED = pytest.mark.runs_at("tiny-plus", device="cpu", dtype="float32")  # configs and own tiny builds
pytestmark = pytest.mark.family_members("tiny-plus", "4.1-2b-plus")  # the member of the other tests


@pytest.fixture(scope="module")
def hf_model(family_hf_model):
    return family_hf_model


@pytest.fixture(scope="module")
def fms_model(family_fms_model):
    return family_fms_model


@pytest.fixture(scope="module")
def audio():
    extractor = transformers.GraniteSpeechFeatureExtractor()
    return extractor([torch.from_numpy(read_clip(name)) for name in CLIPS])


@pytest.fixture(scope="module")
def batch(hf_model, audio, device, dtype):
    config = hf_model.config
    prompts = audio_prompt_batch(
        audio["audio_embed_sizes"], config.audio_token_index, config.text_config.vocab_size, seed=1
    )
    return {**{k: v.to(device) for k, v in prompts.items()},
            "input_features": audio["input_features"].to(device, dtype),
            "input_features_mask": audio["input_features_mask"].to(device)}


def _judge(name, reference, candidate, dtype, device, tolerance, record_property=None, **kwargs):
    assert_parity(name, reference, candidate, dtype=dtype, device=device, tolerance=tolerance,
                  record=None if record_property is None else _record(record_property), **kwargs)


def _record(record_property):
    return lambda name, value: record_property(name, value)


def _hf_encoder(model):
    return model.model.encoder if hasattr(model, "model") else model.encoder


# ---------------------------------------------------------------------------------------------- configs
@FIXED
@pytest.mark.parametrize("name, variant", [("tiny-plus", "tiny"), ("4.1-2b-plus", "4.1-2b-plus")])
def test_fixture_configs_load_in_hf_and_equal_the_variants(name, variant):
    config = hf_config(name)  # HF's own class, with its cat_hidden_layers / encoder_hidden_size check
    assert type(config).__name__ == "GraniteSpeechPlusConfig"
    built = plus.GraniteSpeechPlusConfig(**plus.build_granite_speech_plus_params(config))
    expected = plus.VARIANTS[variant]
    for part in ("encoder_config", "projector_config", "text_config"):
        assert getattr(built, part).as_dict() == getattr(expected, part).as_dict(), f"{name}: {part} differs"
    assert (built.audio_token_index, built.lora_rank) == (expected.audio_token_index, expected.lora_rank)


@FIXED
def test_width_check_matches_hf():
    data = load_family_config("tiny-plus")
    data["projector_config"]["encoder_hidden_size"] = 128  # 64 x 2, but two layers are concatenated (64 x 3)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        hf_config(data)
    with pytest.raises(ValueError, match="encoder_dim"):
        plus.GraniteSpeechPlusConfig(
            encoder_config=plus._tiny_plus_config.encoder_config,
            projector_config=plus._tiny_plus_config.projector_config.updated(encoder_dim=128),
            text_config=plus._tiny_plus_config.text_config,
            audio_token_index=599,
        )
    with pytest.raises(ValueError, match="out of range"):
        plus.PlusConformerConfig(nlayers=4, cat_hidden_layers=(4,))


@FIXED
def test_registered_names():
    assert list_variants("granite_speech_plus") == ["4.1-2b-plus", "tiny"]


# ---------------------------------------------------------------------------------------------- model
def test_loaded_model(fms_model, family_variant):
    assert type(fms_model).__name__ == "GraniteSpeechPlus"
    assert fms_model.config.cat_hidden_layers == tuple(load_family_config(family_variant)["encoder_config"][
        "cat_hidden_layers"])
    assert fms_model.lora is None and fms_model.config.lora_rank == 0  # no adapter files: nothing to merge


@torch.no_grad()
def test_encoder_and_each_concatenated_part(hf_model, fms_model, batch, dtype, device, family_tolerance,
                                            record_property):
    features = batch["input_features"]
    hf_out = _hf_encoder(hf_model)(features).last_hidden_state
    fms_out = fms_model.encoder(features)
    dim = fms_model.config.encoder_config.emb_dim
    cat = fms_model.config.cat_hidden_layers
    assert hf_out.shape == fms_out.shape == (*features.shape[:2], (len(cat) + 1) * dim)
    _judge("encoder_concat", hf_out, fms_out, dtype, device, family_tolerance, record_property)
    names = [("input_linear" if layer == 0 else f"block_{layer}") for layer in cat] + ["final"]
    for part, name in enumerate(names):
        _judge(f"encoder_part_{name}", hf_out[..., part * dim:(part + 1) * dim],
               fms_out[..., part * dim:(part + 1) * dim], dtype, device, family_tolerance, record_property)


@torch.no_grad()
def test_exported_mid_block_carries_the_ctc_term(hf_model, fms_model, batch, dtype, device, family_tolerance):
    """HF adds the mid-layer CTC term in place to the tensor it exported: the exported state of the self-conditioning
    block (L // 2; block 2 of tiny-plus) is the block output plus out_mid(softmax(out(.))), not the block output."""
    enc = fms_model.encoder
    cat = fms_model.config.cat_hidden_layers
    if enc.self_conditioning_layer not in cat:
        pytest.skip(f"this member exports blocks {cat}, not the self-conditioning block {enc.self_conditioning_layer}")
    part, path = cat.index(enc.self_conditioning_layer), f"encoder.layers.{enc.self_conditioning_layer - 1}"
    features = batch["input_features"]
    with capture_outputs(fms_model, [path]) as captured:
        fms_out = fms_model.encoder(features)
    dim = fms_model.config.encoder_config.emb_dim
    exported, block = fms_out[..., part * dim:(part + 1) * dim], captured[path]
    with_term = block + enc.ctc_out_mid(torch.softmax(enc.ctc_out(block), dim=-1))
    exact = 1e-6 if dtype == torch.float32 else None  # the same ops on both sides: only fp32 reassociation apart
    torch.testing.assert_close(exported, with_term, atol=exact, rtol=exact)
    assert (exported - block).float().abs().max() > 1e-2
    with capture_outputs(hf_model, ["model." + path]) as hf_captured:
        _hf_encoder(hf_model)(features)
    _judge("self_conditioning_block", hf_captured["model." + path], block, dtype, device, family_tolerance)


@torch.no_grad()
def test_projector(hf_model, fms_model, batch, dtype, device, family_tolerance, record_property):
    hf_out = hf_model.get_audio_features(batch["input_features"]).pooler_output
    fms_out = fms_model.get_audio_features(batch["input_features"])
    _judge("projector", hf_out, fms_out, dtype, device, family_tolerance, record_property)


@torch.no_grad()
def test_logits_with_audio(hf_model, fms_model, batch, dtype, device, family_tolerance, record_property):
    attn = padding_attn_kwargs(batch["attention_mask"])
    hf_logits = hf_model(**batch, position_ids=attn["position_ids"]).logits
    fms_logits = fms_model(
        batch["input_ids"],
        input_features=batch["input_features"],
        input_features_mask=batch["input_features_mask"],
        **attn,
    )
    scaling = fms_model.config.text_config.logits_scaling
    _judge("logits", hf_logits_to_fms(hf_logits, scaling), fms_logits, dtype, device, family_tolerance,
           record_property, tolerance_class="logits", valid=batch["attention_mask"].bool())


@torch.no_grad()
def test_greedy_generation(hf_model, fms_model, batch, dtype, device, family_tolerance, record_property):
    prompt_len = batch["input_ids"].size(1)
    hf_out = hf_model.generate(
        **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    step_logits = []

    def keep_logits(position, logits, next_val, kwargs):
        step_logits.append(logits)
        return next_val, kwargs

    fms_tokens = generate(
        fms_model,
        batch["input_ids"],
        max_seq_len=prompt_len + NEW_TOKENS,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        prepare_model_inputs_hook=fms_model.prepare_inputs_for_generation,
        post_iteration_hook=keep_logits,
        extra_kwargs={
            "input_features": batch["input_features"],
            "input_features_mask": batch["input_features_mask"],
            **padding_attn_kwargs(batch["attention_mask"]),
        },
    )[:, prompt_len:]
    hf_tokens = hf_out.sequences[:, prompt_len:]
    record_property("distinct_generated_tokens", len(set(hf_tokens.flatten().tolist())))
    steps = _steps_to_compare(fms_tokens, hf_tokens, dtype, record_property)
    scaling = fms_model.config.text_config.logits_scaling
    # HF's generate hands out float32 copies of the model-dtype logits (an exact upcast): compared in the model dtype
    hf_steps = torch.stack([hf_logits_to_fms(step, scaling) for step in hf_out.logits], dim=1).to(dtype)
    _judge("generation_step_logits", hf_steps[:, :steps], torch.stack(step_logits, dim=1)[:, :steps], dtype, device,
           family_tolerance, record_property, tolerance_class="logits")


def _steps_to_compare(fms_tokens, hf_tokens, dtype, record_property) -> int:
    """fp32: every token equal, every step compared. 16 bits: rounding alone can flip a greedy near-tie of a correct
    port (test_family_layers judges such flips by HF's own float64 margin), so the steps are compared up to the first
    one where a row parts, that step included (both sides still fed the same tokens)."""
    if dtype == torch.float32:
        assert torch.equal(fms_tokens, hf_tokens), f"FMS {fms_tokens.tolist()} != HF {hf_tokens.tolist()}"
        return hf_tokens.size(1)
    parted = (fms_tokens != hf_tokens).any(dim=0).nonzero().flatten().tolist()
    record_property("first_step_where_a_row_parts", parted[0] if parted else None)
    return parted[0] + 1 if parted else hf_tokens.size(1)


# ---------------------------------------------------------------------------------------------- loading paths
def test_named_variant_with_hf_source(family_variant, family_checkpoint, fms_model, batch, device, dtype):
    variant = "tiny" if family_variant == "tiny-plus" else family_variant
    model = get_model("granite_speech_plus", variant, model_path=str(family_checkpoint), source="hf",
                      device_type=device.type, data_type=dtype).to(device).eval()
    with torch.no_grad():
        assert torch.equal(model.get_audio_features(batch["input_features"]),
                           fms_model.get_audio_features(batch["input_features"]))


def test_transformers_5_17_layout(tmp_path, family_checkpoint, fms_model, batch, device, dtype):
    """transformers 5.17 saves this model's decoder as `language_model.model.model.*`; HF loads it, so must FMS."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = family_checkpoint
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    prefix = "language_model.model."
    renamed = {("language_model.model.model." + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("language_model.model.model.") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = get_model("hf_pretrained", model_path=str(tmp_path), device_type=device.type,
                      data_type=dtype).to(device).eval()
    attn = padding_attn_kwargs(batch["attention_mask"])
    kwargs = dict(input_features=batch["input_features"], input_features_mask=batch["input_features_mask"], **attn)
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], **kwargs), fms_model(batch["input_ids"], **kwargs))


def test_lora_regime_is_merged(family_checkpoint):
    from granite_speech.family import lora_regime

    assert lora_regime(family_checkpoint)["regime"] == "merged_in_checkpoint"


@FIXED
@pytest.mark.parametrize("cat", [(), (3,), (1, 3)])
def test_other_cat_layers(tmp_path, cat, audio, record_property):
    """No concatenation (plus == 3.3), a layer after the middle one, two layers out of order in the config."""
    data = load_family_config("tiny-plus")
    data["encoder_config"]["cat_hidden_layers"] = list(reversed(cat)) if cat else None
    data["projector_config"]["encoder_hidden_size"] = 64 * (len(cat) + 1)
    hf, folder = build_family_checkpoint(data, tmp_path, seed=7)
    fms = get_model("hf_pretrained", model_path=str(folder))
    assert fms.config.cat_hidden_layers == tuple(reversed(cat))
    with torch.no_grad():
        hf_out = hf.get_audio_features(audio["input_features"])
        fms_enc = fms.encoder(audio["input_features"])
        fms_proj = fms.get_audio_features(audio["input_features"])
    assert_parity(f"encoder_cat_{cat}", hf_out.last_hidden_state, fms_enc, dtype=torch.float32, tolerance=TOL)
    assert_parity(f"projector_cat_{cat}", hf_out.pooler_output, fms_proj, dtype=torch.float32, tolerance=TOL,
                  record=_record(record_property))
