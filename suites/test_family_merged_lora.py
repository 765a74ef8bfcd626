"""granite-4.0-1b-speech / granite-speech-4.1-2b: the 3.3 classes with the modality LoRA merged into the weights.

A tiny 3.3 model (configs/tiny.json with has_lora_adapter false) gets a PEFT LoRA on q_proj/v_proj with a non-zero B,
which is merged (`merge_and_unload`) before `save_pretrained`: the folder holds no adapter files, like the 4.x
releases. FMS loads it through `get_model("hf_pretrained")` with no LoRA of its own (rank 0, regime
"merged_in_checkpoint") and must give HF's logits with the adapter ON, fp32, atol = rtol = 1e-4, on a padded batch
of two clips. The real-size variants are checked against their fixture configs and the published size. All of this
is size-independent (`fixed:...` in the test id: the CPU gate runs it).

The member of --model (`family_variant`: tiny-4.0 at the CPU gate, 4.0-1b / 4.1-2b at real dimensions on
--device / --dtype) loads the same way from its seeded family fixture and gives the logits of HF's merged model.
"""

import pytest
import torch

import transformers  # noqa: E402  (a hard dependency: a broken install fails, never skips)
import peft  # noqa: E402

from fms.models import get_model, list_variants

import granite_speech  # noqa: F401
from granite_speech.config import from_hf_config
from granite_speech.family import FAMILY_VARIANTS, lora_regime
from granite_speech.model import GraniteSpeech, padding_attn_kwargs
from parity.granite.fixtures import load_hf_config
from parity.granite.fixtures.family import (
    audio_prompt_batch,
    build_family_checkpoint,
    hf_config,
    load_family_config,
    randomize_,
    read_clip,
)
from parity.granite.hf import hf_logits_to_fms
from parity.testing import assert_parity
from parity.tolerances import Tolerance

TOL = Tolerance(1e-4, 1e-4, why="family parity suites: fp32 atol = rtol = 1e-4")  # the fixed-size tests'
CLIPS = ("9002-102-0001", "9001-101-0001")
LORA_R, LORA_ALPHA, LORA_B_STD = 8, 20, 0.3
FIXED = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # the PEFT-merged tiny model built here
pytestmark = pytest.mark.family_members("tiny-4.0", "4.0-1b", "4.1-2b")  # the member of the other tests


def _tiny_merged_config() -> dict:
    data = load_hf_config("tiny")
    data["has_lora_adapter"] = False
    return data


@pytest.fixture(scope="module")
def audio():
    extractor = transformers.GraniteSpeechFeatureExtractor()
    return extractor([torch.from_numpy(read_clip(name)) for name in CLIPS])


def _padded_batch(audio, audio_token_index: int, vocab_size: int) -> dict:
    prompts = audio_prompt_batch(audio["audio_embed_sizes"], audio_token_index, vocab_size, seed=2)
    return {**prompts, "input_features": audio["input_features"], "input_features_mask": audio["input_features_mask"]}


@pytest.fixture(scope="module")
def inputs(audio):
    data = _tiny_merged_config()
    return _padded_batch(audio, data["audio_token_index"], data["text_config"]["vocab_size"])


def _hf_logits(model, inputs):
    position_ids = padding_attn_kwargs(inputs["attention_mask"])["position_ids"]
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids).logits


@pytest.fixture(scope="module")
def merged(tmp_path_factory, inputs):
    """(HF logits with the LoRA on, HF logits of the bare base model, the merged checkpoint folder)."""
    config_class, model_class = transformers.GraniteSpeechConfig, transformers.GraniteSpeechForConditionalGeneration
    torch.manual_seed(0)
    base = randomize_(model_class(config_class.from_dict(_tiny_merged_config())).float(), seed=4).eval()
    base_logits = _hf_logits(base, inputs)
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with_lora = peft.get_peft_model(base, lora).eval()
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in with_lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    lora_logits = _hf_logits(with_lora, inputs)
    folder = tmp_path_factory.mktemp("merged")
    with_lora.merge_and_unload().save_pretrained(str(folder), safe_serialization=True)
    return lora_logits, base_logits, folder


@FIXED
def test_folder_is_a_merged_checkpoint(merged):
    _, _, folder = merged
    names = sorted(p.name for p in folder.iterdir())
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names, names
    regime = lora_regime(folder)
    assert regime["regime"] == "merged_in_checkpoint" and regime["has_lora_adapter"] is False


@FIXED
def test_merged_checkpoint_matches_hf_with_the_adapter_on(merged, inputs, record_property):
    lora_logits, base_logits, folder = merged
    model = get_model("hf_pretrained", model_path=str(folder)).eval()
    assert isinstance(model, GraniteSpeech)
    assert model.config.lora_rank == 0 and model.lora is None
    attn = padding_attn_kwargs(inputs["attention_mask"])
    with torch.no_grad():
        fms_logits = model(inputs["input_ids"], input_features=inputs["input_features"],
                           input_features_mask=inputs["input_features_mask"], **attn)
    scaling = model.config.text_config.logits_scaling
    valid = inputs["attention_mask"].bool()
    # the adapter mattered: the bare base model is far from the adapted one
    assert (hf_logits_to_fms(lora_logits - base_logits, scaling)[valid]).abs().max() > 1e-2
    assert_parity("logits_vs_hf_adapter_on", hf_logits_to_fms(lora_logits, scaling), fms_logits,
                  dtype=torch.float32, tolerance=TOL, valid=valid, record=record_property)
    reloaded = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    assert_parity("logits_vs_hf_merged", hf_logits_to_fms(_hf_logits(reloaded.eval(), inputs), scaling), fms_logits,
                  dtype=torch.float32, tolerance=TOL, valid=valid, record=record_property)


@FIXED
def test_transformers_5_17_layout_of_the_3_3_classes(tmp_path, merged, inputs):
    """transformers 5.17's save_pretrained writes the decoder one level deeper (`language_model.model.model.*`); the
    folder is rewritten into exactly that layout (from whatever layout the installed transformers saved: 5.17 already
    writes it, 5.23 does not) and FMS must load it into the same model, bit for bit."""
    import shutil

    from safetensors.torch import load_file, save_file

    from granite_speech.checkpoint.layout import to_hub

    _, _, folder = merged
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    prefix = "language_model.model."
    tensors = {to_hub(k): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    doubled = {("language_model.model.model." + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in tensors.items()}
    assert any(k.startswith("language_model.model.model.layers.") for k in doubled)
    save_file(doubled, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    attn = padding_attn_kwargs(inputs["attention_mask"])
    logits = []
    for source in (folder, tmp_path):
        model = get_model("hf_pretrained", model_path=str(source)).eval()
        with torch.no_grad():
            logits.append(model(inputs["input_ids"], input_features=inputs["input_features"],
                                input_features_mask=inputs["input_features_mask"], **attn))
    assert torch.equal(logits[0], logits[1])


@FIXED
def test_flag_without_adapter_files_is_reported(tmp_path):
    data = _tiny_merged_config()
    data["has_lora_adapter"] = True
    _, folder = build_family_checkpoint(data, tmp_path, seed=1)
    assert lora_regime(folder)["regime"] == "adapter_missing"


# ---------------------------------------------------------------------------------------------- real-size variants
@FIXED
@pytest.mark.parametrize("name", ["4.0-1b", "4.1-2b"])
def test_variants_equal_their_fixture_configs(name):
    config = hf_config(name)  # HF's own class
    assert type(config).__name__ == "GraniteSpeechConfig" and config.has_lora_adapter is False
    built = from_hf_config(config, {})
    expected = FAMILY_VARIANTS[name]
    for part in ("encoder_config", "projector_config", "text_config"):
        assert getattr(built, part).as_dict() == getattr(expected, part).as_dict(), f"{name}: {part} differs"
    assert (built.audio_token_index, built.lora_rank) == (expected.audio_token_index, 0)
    assert name in list_variants("granite_speech")


@FIXED
def test_4_0_1b_size_matches_the_published_count():
    with torch.device("meta"):
        hf = transformers.GraniteSpeechForConditionalGeneration(hf_config("4.0-1b"))
        fms = GraniteSpeech(FAMILY_VARIANTS["4.0-1b"])
    params = sum(p.numel() for p in hf.parameters())
    batch_norm_stats = sum(b.numel() for n, b in hf.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert params == sum(p.numel() for p in fms.parameters()) == 2_313_141_596
    assert params + batch_norm_stats == 2_313_207_132  # the published checkpoint's element count
    assert load_family_config("4.0-1b")["text_config"]["tie_word_embeddings"] is False


# ---------------------------------------------------------------------------------------------- the member of --model
@torch.no_grad()
def test_member_matches_hf_merged(family_checkpoint, family_hf_model, family_fms_model, audio, device, dtype,
                                  family_tolerance, record_property):
    """The member's merged checkpoint loads with no LoRA of its own and gives HF's logits on the padded batch."""
    assert lora_regime(family_checkpoint)["regime"] == "merged_in_checkpoint"
    model = family_fms_model
    assert isinstance(model, GraniteSpeech) and model.config.lora_rank == 0 and model.lora is None
    config = family_hf_model.config
    batch = _padded_batch(audio, config.audio_token_index, config.text_config.vocab_size)
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    attn = padding_attn_kwargs(batch["attention_mask"])
    fms_logits = model(batch["input_ids"], input_features=batch["input_features"],
                       input_features_mask=batch["input_features_mask"], **attn)
    scaling = model.config.text_config.logits_scaling
    assert_parity("member_logits_vs_hf_merged", hf_logits_to_fms(_hf_logits(family_hf_model, batch), scaling),
                  fms_logits, dtype=dtype, device=device, tolerance=family_tolerance, tolerance_class="logits",
                  valid=batch["attention_mask"].bool(), record=record_property)
