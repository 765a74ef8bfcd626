"""The config-coverage audit (`granite_speech.checkpoint.config_audit`): every field of the installed transformers'
Granite Speech config classes and of peft's LoraConfig has a rule; mapped fields reach the FMS config, refused
values raise an error naming the field, the value and what is supported, unknown fields are reported.

Numbers (does a mapped field compute what HF computes?) are checked by suites/test_config_fuzz.py.
"""

import dataclasses
import inspect
import json
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import Blip2QFormerConfig, GraniteConfig, GraniteSpeechConfig, GraniteSpeechEncoderConfig

from granite_speech.checkpoint import config_audit
from granite_speech.checkpoint.config_audit import (
    ADAPTER_SECTION,
    IRRELEVANT,
    MAPPED,
    REFUSED,
    UnauditedConfigWarning,
    UnsupportedConfigError,
    audit_adapter_config,
    audit_hf_config,
    rule_counts,
    rules_for,
)
from granite_speech.config import (
    GraniteSpeechConfig as FMSGraniteSpeechConfig,
    VARIANTS,
    from_hf_config,
    read_lora_config,
    resolve_tie,
)

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # configs only
HF_CLASSES = {
    "": GraniteSpeechConfig,
    "encoder_config": GraniteSpeechEncoderConfig,
    "projector_config": Blip2QFormerConfig,
    "text_config": GraniteConfig,
}


def _class_fields(cls) -> set:
    """Every field a config class declares on this transformers line: 5.x dataclass fields, 4.57 __init__
    arguments, and what a default instance serialises (the PreTrainedConfig base fields included)."""
    names = set(cls().to_dict())
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    return names


@pytest.mark.parametrize("section", list(HF_CLASSES), ids=lambda s: s or "top")
def test_every_field_of_the_installed_config_classes_has_a_rule(section):
    missing = sorted(_class_fields(HF_CLASSES[section]) - set(rules_for(section)))
    assert not missing, f"transformers {transformers.__version__} {HF_CLASSES[section].__name__}: no rule for {missing}"


def test_every_lora_config_field_has_a_rule():
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)} | set(LoraConfig().to_dict())
    missing = sorted(fields - set(rules_for(ADAPTER_SECTION)))
    assert not missing, f"peft LoraConfig: no rule for {missing}"


def test_every_rule_is_one_of_three_kinds_with_a_reason():
    for section in [*HF_CLASSES, ADAPTER_SECTION]:
        for name, rule in rules_for(section).items():
            assert rule.kind in (MAPPED, IRRELEVANT, REFUSED), (section, name)
            assert rule.note.strip(), (section, name)
            if rule.kind == REFUSED:
                assert rule.supported and rule.example is not config_audit._ANY, (section, name)


def test_audit_counts(capsys):
    """mapped / irrelevant / refused per config class, over the fields of the installed classes (the closing
    note of the audit quotes these)."""
    lines = []
    for section, cls in HF_CLASSES.items():
        counts = rule_counts(section, sorted(_class_fields(cls)))
        lines.append(f"{cls.__name__}: {counts}")
        assert counts[MAPPED] > 0
    from peft import LoraConfig

    counts = rule_counts(ADAPTER_SECTION, [f.name for f in dataclasses.fields(LoraConfig)])
    lines.append(f"LoraConfig: {counts}")
    with capsys.disabled():
        print(f"\nconfig audit, transformers {transformers.__version__}:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------- a base config
def _base() -> dict:
    return {
        "model_type": "granite_speech",
        "audio_token_index": 63,
        "window_size": 15,
        "downsample_rate": 5,
        "tie_word_embeddings": True,
        "encoder_config": {"input_dim": 160, "num_layers": 2, "hidden_dim": 64, "feedforward_mult": 4,
                           "num_heads": 4, "dim_head": 16, "output_dim": 42, "context_size": 40, "max_pos_emb": 64,
                           "conv_kernel_size": 15, "conv_expansion_factor": 2},
        "projector_config": {"model_type": "blip_2_qformer", "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 64, "encoder_hidden_size": 64,
                             "cross_attention_frequency": 1},
        "text_config": {"model_type": "granite", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "rope_theta": 10000.0, "tie_word_embeddings": True, "pad_token_id": 0},
    }


def _with(section: str, key: str, value) -> dict:
    value = json.loads(json.dumps(value))  # transformers edits RoPE dicts in place
    config = _base()
    target = config[section] if section else config
    target[key] = value
    if section == "encoder_config" and key == "hidden_dim":  # HF's Q-Former reads encoder_hidden_size
        config["projector_config"]["encoder_hidden_size"] = value
    if section == "projector_config" and key == "encoder_hidden_size":
        config["encoder_config"]["hidden_dim"] = value
    if key == "audio_token_id":  # the alias alone
        config.pop("audio_token_index")
    return config


def _cases(kind):
    for section in HF_CLASSES:
        for name, rule in config_audit.HF_SECTIONS[section].items():
            if rule.kind == kind and rule.example is not config_audit._ANY:
                yield pytest.param(section, name, rule.example, id=f"{section or 'top'}.{name}")


@pytest.mark.parametrize("section, name, example", list(_cases(MAPPED)))
def test_a_mapped_field_reaches_the_fms_config(section, name, example):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnauditedConfigWarning)
        base = from_hf_config(_base()).as_dict()
        changed = from_hf_config(_with(section, name, example)).as_dict()
    assert changed != base, f"{section}.{name}={example!r} did not change the FMS config"


@pytest.mark.parametrize("section, name, example", [c for c in _cases(REFUSED) if "model_type" not in c.id] + [
    pytest.param("text_config", "pruned_heads", {"0": [0]}, id="text_config.pruned_heads (common)"),
    pytest.param("projector_config", "hidden_act", "quick_gelu", id="projector_config.hidden_act=quick_gelu"),
    pytest.param("text_config", "hidden_act", "gelu_new", id="text_config.hidden_act=gelu_new"),
    pytest.param("text_config", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, id="rope-dynamic"),
    pytest.param("text_config", "rope_scaling", {"rope_type": "yarn", "factor": 2.0}, id="rope-yarn"),
])
def test_a_refused_value_raises_naming_field_value_and_supported(section, name, example):
    config = _with(section, name, example)
    with pytest.raises(UnsupportedConfigError) as excinfo:
        from_hf_config(config)
    message = str(excinfo.value)
    path = f"{section}.{name}" if section else name
    # transformers 5 holds the RoPE settings (rope_scaling, partial_rotary_factor) in rope_parameters
    paths = (path, "text_config.rope_parameters") if name in ("rope_scaling", "partial_rotary_factor") else (path,)
    assert excinfo.value.path.startswith(paths), message
    assert excinfo.value.path in message and "supported" in message, message


@pytest.mark.parametrize("section, expected", [("", "granite_speech"), ("encoder_config", "granite_speech_encoder"),
                                               ("projector_config", "blip_2_qformer"), ("text_config", "granite")])
def test_a_foreign_model_type_is_refused(section, expected):
    config = _with(section, "model_type", "llama")
    path = f"{section}.model_type" if section else "model_type"
    with pytest.raises(UnsupportedConfigError, match=rf"{path}='llama'.*supported: '{expected}'"):
        from_hf_config(config)


def test_rope_sub_fields_are_audited():
    config = _with("text_config", "rope_scaling", {"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5})
    with pytest.raises(UnsupportedConfigError, match=r"partial_rotary_factor=0\.5.*supported: 1\.0"):
        from_hf_config(config)


def test_unknown_fields_are_reported_not_ignored():
    config = _with("text_config", "brand_new_knob", 3)
    with pytest.warns(UnauditedConfigWarning, match=r"text_config\.brand_new_knob=3"):
        from_hf_config(config)
    with pytest.warns(UnauditedConfigWarning, match=r"adapter_config\.brand_new_knob=True"):
        audit_adapter_config({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
                              "brand_new_knob": True})


def test_defaults_and_fixture_configs_audit_clean():
    from parity.granite.fixtures import CONFIG_VARIANTS, load_hf_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnauditedConfigWarning)
        audit_hf_config(GraniteSpeechConfig())
        for variant in CONFIG_VARIANTS:
            audit_hf_config(GraniteSpeechConfig.from_dict(load_hf_config(variant)))


# ---------------------------------------------------------------------------------------------- adapter_config.json
def _adapter_folder(tmp_path, **changes):
    from peft import LoraConfig

    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return tmp_path


def test_adapter_config_maps_rank_alpha_targets_and_rslora(tmp_path):
    lora = read_lora_config(_adapter_folder(tmp_path, use_rslora=True, target_modules=["v_proj", "k_proj"]))
    assert lora == {"lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": ("k_proj", "v_proj"),
                    "lora_use_rslora": True}
    config = FMSGraniteSpeechConfig(**{k: v for k, v in lora.items()})
    assert config.lora_scaling == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r
    assert FMSGraniteSpeechConfig(lora_rank=4, lora_alpha=8.0).lora_scaling == pytest.approx(2)


@pytest.mark.parametrize("name, rule", [(n, r) for n, r in config_audit.ADAPTER_RULES.items()
                                        if r.kind == REFUSED], ids=lambda x: x if isinstance(x, str) else "")
def test_a_refused_adapter_value_names_the_file_field_and_value(tmp_path, name, rule):
    folder = _adapter_folder(tmp_path, **{name: rule.example})
    with pytest.raises(UnsupportedConfigError) as excinfo:
        read_lora_config(folder)
    message = str(excinfo.value)
    assert message.startswith(str(folder / "adapter_config.json") + ": "), message
    assert excinfo.value.path == f"adapter_config.{name}" and repr(rule.example) in message, message
    assert "supported" in message, message


def test_adapter_without_target_modules_is_refused(tmp_path):
    folder = _adapter_folder(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    del data["target_modules"]
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedConfigError, match=r"adapter_config\.target_modules=None"):
        read_lora_config(folder)


# ---------------------------------------------------------------------------------------------- tie, defaults
@pytest.mark.parametrize("top, text, has_lm_head, tied", [
    (True, True, False, True),
    (True, False, False, True),  # 5.x wrote it (ties on the top-level flag, no lm_head written)
    (False, True, False, True),  # 4.57 wrote it (ties on text_config's flag)
    (True, False, True, False),  # 4.57 wrote it untied: the lm_head is there
    (False, False, True, False),
    (True, True, True, False),  # a distinct lm_head is loaded, as transformers 5 does
    (False, False, False, False),  # no lm_head and no flag: the weight-coverage audit names it missing
])
def test_tying_follows_the_checkpoint_as_hf_resolves_it(top, text, has_lm_head, tied):
    assert resolve_tie(top, text, has_lm_head) is tied


def test_default_fms_config_builds_a_consistent_model():
    from granite_speech.model import GraniteSpeech

    config = FMSGraniteSpeechConfig()
    assert config.projector_config.output_dim == config.text_config.emb_dim
    assert config.as_dict() == VARIANTS["2b"].updated(lora_rank=0, lora_alpha=0.0).as_dict()
    with torch.device("meta"):
        model = GraniteSpeech()
    assert model.language_model.config.emb_dim == model.projector.out_proj.out_features


def test_config_only_tying_follows_the_installed_line():
    config = _base()
    config["text_config"]["tie_word_embeddings"] = False
    tied = from_hf_config(config).text_config.tie_heads
    assert tied is (Version(transformers.__version__) >= Version("5.10"))


# ---------------------------------------------------------------------------------------------- the supported sets
@pytest.mark.parametrize("name", config_audit.SUPPORTED_ACTIVATIONS)
def test_a_supported_activation_is_hfs_function(name):
    from fms.utils.activation import str_to_activation
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(str_to_activation(name)(x), ACT2FN[name](x), rtol=0, atol=0)


def test_every_supported_rope_type_has_an_fms_table():
    from granite_speech import model

    assert set(model._ROPE_IMPLS) == set(config_audit.SUPPORTED_ROPE_TYPES)
