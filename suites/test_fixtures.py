"""The fixtures themselves: configs, tokenizer, seeded checkpoints (hub and tf5 layouts), speech clips, cache.

HF transformers is the oracle: every fixture must load through its public API with nothing missing or re-initialised.
Fixed size: the tiny fixtures on the CPU in fp32 (`fixed:...` in the test ids), whatever --model says; the 2b/8b
configs are checked on the meta device only. The regime the fixture weights put the model in is measured by
suites/test_fixture_regime.py; here the weights are checked against the rules that make it (fixtures.REGIMES), and
the untied fixture's hyperparameters against every default a port could fall back to.
"""

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors import safe_open

from parity.granite.fixtures import (
    CACHE_MAX_ENV,
    CONFIG_VARIANTS,
    FIXTURES_DIR,
    REGIMES,
    build_checkpoint,
    build_tokenizer,
    cache_limit_bytes,
    hf_config_path,
    load_hf_config,
    load_speech_dataset,
    prune_cache,
    shallow_config,
    speech_clip_table,
)
from parity.granite.fixtures.checkpoint import InitRegime

TF_MAJOR = int(transformers.__version__.split(".")[0])
TF5_MODULE_PATHS = hasattr(transformers, "GraniteSpeechModel") and TF_MAJOR >= 5

pytestmark = pytest.mark.runs_at("tiny-fixtures", device="cpu", dtype="float32")
ENGLISH = 'mister quilter is the apostle of the middle classes, and we are glad to welcome his gospel! "yes"; no? 42.'


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _read_safetensors(folder, pattern):
    tensors = {}
    for path in sorted(folder.glob(pattern)):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _legacy_state_dict(model):
    from parity.granite.fixtures.checkpoint import legacy_key

    state = model.state_dict()  # with LoRA attached the base weight lives at `<proj>.base_layer.weight`
    return {legacy_key(k.replace(".base_layer.", ".")): v for k, v in state.items() if ".lora_" not in k}


def _load_hf(folder):
    from transformers import GraniteSpeechForConditionalGeneration

    model, info = GraniteSpeechForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def _set_adapters(model, enabled: bool):
    if enabled:
        model.enable_adapters()
    else:
        model.disable_adapters()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_config():
    return load_hf_config("tiny")


@pytest.fixture(scope="module")
def hub_folder():
    return build_checkpoint("tiny")


@pytest.fixture(scope="module")
def tf5_folder():
    return build_checkpoint("tiny", layout="tf5")


@pytest.fixture(scope="module")
def hub_model(hub_folder):
    return _load_hf(hub_folder)


# ----------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_loads_with_explicit_dimensions(variant, tmp_path):
    from transformers import AutoConfig, GraniteSpeechConfig

    raw = load_hf_config(variant)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for config in (GraniteSpeechConfig.from_dict(raw), AutoConfig.from_pretrained(tmp_path)):
        assert type(config).__name__ == "GraniteSpeechConfig"
        enc, proj, text = config.encoder_config, config.projector_config, config.text_config
        assert enc.dim_head == raw["encoder_config"]["dim_head"]
        assert enc.num_layers % 2 == 0 and enc.num_layers == raw["encoder_config"]["num_layers"]
        assert enc.context_size == raw["encoder_config"]["context_size"] <= enc.max_pos_emb
        assert proj.cross_attention_frequency == raw["projector_config"]["cross_attention_frequency"]
        assert proj.encoder_hidden_size == enc.hidden_dim
        assert text.vocab_size == raw["audio_token_index"] + 1
        assert config.audio_token_index == raw["audio_token_index"]
        assert text.tie_word_embeddings == raw["text_config"]["tie_word_embeddings"]
        if hasattr(config, "tie_word_embeddings"):  # top-level field exists from 5.10
            assert config.tie_word_embeddings == raw["tie_word_embeddings"]


def test_real_configs_match_published_dimensions():
    published = (("2b", 2048, 8192, 1 / 64, 8.0), ("8b", 4096, 12800, 1 / 128, 16.0))
    for variant, hidden, inter, att_mult, scaling in published:
        raw = load_hf_config(variant)
        enc, text = raw["encoder_config"], raw["text_config"]
        assert (enc["num_layers"], enc["output_dim"], enc["hidden_dim"], enc["dim_head"]) == (16, 256, 1024, 128)
        assert raw["projector_config"]["cross_attention_frequency"] == 1
        assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]) == (hidden, inter, 40)
        assert text["attention_multiplier"] == att_mult and text["logits_scaling"] == scaling
        assert (raw["audio_token_index"], text["vocab_size"]) == (49159, 49160)


@pytest.mark.parametrize("variant", ["2b", "8b"])
def test_real_variants_plan_on_the_meta_device(variant):
    """The 2b/8b weights are built on the GPU runner; here only the streamed write plan is checked (no memory)."""
    from parity.granite.fixtures.checkpoint import _meta_model, _tensors_to_write

    raw = load_hf_config(variant)
    text = raw["text_config"]
    plan = _tensors_to_write(_meta_model(raw))
    d, inner = text["hidden_size"], text["num_attention_heads"] * text["head_dim"]
    kv_inner = text["num_key_value_heads"] * text["head_dim"]
    per_layer = 2 * d * inner + 2 * d * kv_inner + 3 * d * text["intermediate_size"] + 2 * d
    expected_text = text["vocab_size"] * d + text["num_hidden_layers"] * per_layer + d
    assert sum(n for k, (n, _) in plan.items() if k.startswith("language_model.")) == expected_text
    assert "language_model.lm_head.weight" not in plan  # tied: the hub layout stores the embedding only
    assert {k.split(".")[0] for k in plan} == {"encoder", "projector", "language_model"}
    assert sum(k.endswith("num_batches_tracked") for k in plan) == raw["encoder_config"]["num_layers"]


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown variant"):
        hf_config_path("3b")


# --------------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("variant", ["tiny", "2b"])
def test_tokenizer_round_trips_and_places_audio_token(variant, tmp_path):
    from transformers import AutoTokenizer

    config = load_hf_config(variant)
    build_tokenizer(tmp_path, config)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    audio_id = config["audio_token_index"]
    assert len(tokenizer) == config["text_config"]["vocab_size"]
    assert tokenizer.convert_tokens_to_ids("<|audio|>") == audio_id
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") == 0 == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|start_of_role|>") == audio_id - 7

    text = f"<|audio|>{ENGLISH} <|audio|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == audio_id and ids.count(audio_id) == 2
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(ENGLISH)["input_ids"]) == ENGLISH
    assert len(tokenizer(" the old house")["input_ids"]) < len(" the old house")  # learned merges, not bytes

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|audio|>can you transcribe the speech into a written format?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|start_of_role|>assistant<|end_of_role|>")
    assert tokenizer(prompt)["input_ids"].count(audio_id) == 1


def test_tokenizer_rejects_audio_token_not_last(tmp_path, tiny_config):
    bad = dict(tiny_config, audio_token_index=5)
    with pytest.raises(ValueError, match="audio_token_index must be the last id"):
        build_tokenizer(tmp_path, bad)


# ------------------------------------------------------------------------------------------------- checkpoints
def test_hub_layout_files(hub_folder, tiny_config):
    shards = sorted(hub_folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((hub_folder / "model.safetensors.index.json").read_text())
    weights = _read_safetensors(hub_folder, "model-*-of-*.safetensors")
    assert set(index["weight_map"]) == set(weights)
    assert {k.split(".")[0] for k in weights} == {"encoder", "projector", "language_model"}
    assert "language_model.lm_head.weight" not in weights  # tied
    n_layers = tiny_config["encoder_config"]["num_layers"]
    assert sum(k.endswith("batch_norm.num_batches_tracked") for k in weights) == n_layers

    adapter_config = json.loads((hub_folder / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 20)
    assert adapter_config["target_modules"] == ["q_proj", "v_proj"]
    assert adapter_config["base_model_name_or_path"] == str(hub_folder)
    adapter = _read_safetensors(hub_folder, "adapter_model.safetensors")
    expected = {
        f"base_model.model.language_model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
        for i in range(tiny_config["text_config"]["num_hidden_layers"])
        for p in "qv"
        for ab in "AB"
    }
    assert set(adapter) == expected


def test_hub_weights_are_non_degenerate(hub_folder):
    weights = _read_safetensors(hub_folder, "model-*-of-*.safetensors")
    for key, tensor in weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert tensor.dtype == torch.float32, key
        assert tensor.numel() == 1 or float(tensor.std()) > 1e-3, f"{key} is constant"
        if tensor.ndim == 2:
            assert bool((tensor.abs().sum(dim=1) > 0).all()), f"{key} has an all-zero row"
    running_var = weights["encoder.layers.0.conv.batch_norm.running_var"]
    assert 0.5 <= float(running_var.min()) and float(running_var.max()) <= 2.0 and float(running_var.std()) > 0.2
    assert float(weights["encoder.layers.0.conv.batch_norm.running_mean"].abs().mean()) > 0.1
    assert abs(float(weights["encoder.layers.0.conv.batch_norm.weight"].mean()) - 1.0) < 0.2
    assert 0.5 < float(weights["projector.query"].std()) < 2.0  # transformers init: N(0, 1)
    adapter = _read_safetensors(hub_folder, "adapter_model.safetensors")
    for key, tensor in adapter.items():
        assert float(tensor.abs().mean()) > 1e-3, f"{key} is (near) zero"


# the real sizes' rules (gains over each tensor's fan-in) checked on one-layer models of their widths
@pytest.mark.parametrize("variant", sorted(REGIMES))
def test_weights_follow_the_fixture_regime(variant):
    """Every >= 2-D weight has the std its regime rule gives (so no weight keeps an init that depends on the
    transformers line: 4.57 inits the encoder from the top-level initializer_range, 5.x from the encoder config's)."""
    regime = REGIMES[variant]
    config = load_hf_config(variant) if variant.startswith("tiny") else shallow_config(variant, 1)
    folder = build_checkpoint(variant if variant.startswith("tiny") else config, regime=regime)
    weights = _read_safetensors(folder, "model-*-of-*.safetensors")
    unruled, off = [], []
    for key, tensor in weights.items():
        if tensor.ndim < 2 or not tensor.is_floating_point():
            continue
        std = regime.std_for(key, config, tuple(tensor.shape))
        if std is None:
            unruled.append(key)
        elif tensor.numel() >= 256 and not 0.8 * std < float(tensor.std()) < 1.2 * std:
            off.append(f"{key}: std {float(tensor.std()):.3g}, rule {std:g}")
    assert unruled == ["projector.query"], unruled  # the Q-Former queries keep HF's N(0, 1) on both lines
    assert not off, off
    adapter = _read_safetensors(folder, "adapter_model.safetensors")
    b_std = torch.cat([t.flatten() for k, t in adapter.items() if "lora_B" in k]).std()
    assert 0.8 * regime.lora_b_std < float(b_std) < 1.2 * regime.lora_b_std
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    expected_shape = regime.lora_shape or ((8, 20) if variant.startswith("tiny") else (64, 32))
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == expected_shape


def test_fan_in_rules_scale_with_the_width():
    """A ("fan_in", gain) rule: std = gain / sqrt(input width x kernel), per tensor."""
    regime = InitRegime(weight_std=((r"^a$", ("fan_in", 2.0)), (r"^b$", 0.5), (r"^c$", "initializer_range")))
    assert regime.std_for("a", {}, (10, 400)) == pytest.approx(0.1)
    assert regime.std_for("a", {}, (10, 16, 25)) == pytest.approx(0.1)  # a convolution: 16 channels x kernel 25
    assert regime.std_for("b", {}, (10, 400)) == 0.5
    assert regime.std_for("c", {"initializer_range": 0.02}, (10, 400)) == 0.02
    assert regime.std_for("d", {}, (10, 400)) is None
    with pytest.raises(ValueError, match=r"unknown init rule \('fan_out', 2.0\)"):
        InitRegime(weight_std=((r".", ("fan_out", 2.0)),)).std_for("a", {}, (1, 1))


def _default(config, name):
    """A field of an HF config instance, looking into 5.x's rope_parameters for rope_theta."""
    if name == "rope_theta" and getattr(config, "rope_parameters", None):
        return config.rope_parameters["rope_theta"]
    return getattr(config, name)


def test_untied_fixture_differs_from_every_default():
    """A field the port drops (or reads on one transformers line only) and replaces by a default changes the numbers
    of the tiny-untied fixture: none of its values equals the HF default, the FMS default or a value derived from
    other fields (attention_multiplier = 1/head_dim or head_dim**-0.5)."""
    from dataclasses import fields as dataclass_fields

    from fms.models.granite import GraniteConfig as FMSGraniteConfig
    from transformers import Blip2QFormerConfig, GraniteConfig

    raw = load_hf_config("tiny-untied")
    text, proj = raw["text_config"], raw["projector_config"]
    hf_text, hf_proj = GraniteConfig(), Blip2QFormerConfig()
    fms_text = {f.name: f.default for f in dataclass_fields(FMSGraniteConfig)}
    fms_names = {"rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "embedding_multiplier": "embedding_multiplier",
                 "residual_multiplier": "residual_multiplier", "attention_multiplier": "attention_multiplier",
                 "logits_scaling": "logits_scaling"}
    for name, fms_name in fms_names.items():
        assert text[name] != _default(hf_text, name), f"text_config.{name} equals the HF default"
        assert text[name] != fms_text[fms_name], f"text_config.{name} equals the FMS default {fms_name}"
    head_dim = text["head_dim"]
    assert text["attention_multiplier"] not in (1 / head_dim, head_dim**-0.5)
    assert text["num_attention_heads"] // text["num_key_value_heads"] > 2  # GQA: a repeat/interleave mix-up shows
    assert text["num_attention_heads"] * head_dim != text["hidden_size"]  # head_dim is never hidden // heads
    assert text["rms_norm_eps"] >= 1e-3  # large enough to move the logits past the regression bound if dropped
    assert proj["layer_norm_eps"] != hf_proj.layer_norm_eps and proj["layer_norm_eps"] >= 1e-3
    assert proj["cross_attention_frequency"] != hf_proj.cross_attention_frequency
    r, alpha = REGIMES["tiny-untied"].lora_shape
    assert alpha % r != 0 and r & (r - 1) != 0  # alpha // r != alpha / r; r is not a power of two
    assert not raw["tie_word_embeddings"] and not text["tie_word_embeddings"]


def _check_loaded(model, info, folder, n_text_layers):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # the weights in the model are the file's, not a fresh init
    files = _read_safetensors(folder, "model-*-of-*.safetensors")
    state = _legacy_state_dict(model)
    for key, tensor in files.items():
        assert torch.equal(state[key], tensor), key

    lora = _lora_modules(model)
    assert len(lora) == 2 * n_text_layers
    adapter = _read_safetensors(folder, "adapter_model.safetensors")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    lora_r, lora_alpha = adapter_config["r"], adapter_config["lora_alpha"]
    assert (lora_r, lora_alpha) == (8, 20)
    for name, module in lora.items():
        layer = name.split(".layers.")[1]
        file_prefix = f"base_model.model.language_model.model.layers.{layer}"
        assert module.scaling["default"] == lora_alpha / lora_r  # PEFT's plain LoRA scale: 2.5
        assert torch.equal(module.lora_A["default"].weight, adapter[f"{file_prefix}.lora_A.weight"])
        assert torch.equal(module.lora_B["default"].weight, adapter[f"{file_prefix}.lora_B.weight"])
        assert float(module.lora_B["default"].weight.abs().max()) > 0


def _text_logits(model, adapters: bool):
    _set_adapters(model, adapters)
    input_ids = torch.tensor([[5, 17, 42, 300, 7, 99, 12]])
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_hub_layout_loads_with_adapter(hub_model, hub_folder, tiny_config):
    model, info = hub_model
    _check_loaded(model, info, hub_folder, tiny_config["text_config"]["num_hidden_layers"])
    on, off = _text_logits(model, True), _text_logits(model, False)
    # relative: 4.x logits are divided by logits_scaling; fp32 noise is ~1e-7 of the range
    assert float((on - off).abs().max()) > 1e-3 * float(on.abs().max())
    _set_adapters(model, True)


if TF_MAJOR >= 5:  # the tf5 layout is written by transformers 5.x: collected on that line only (no skip)

    def test_tf5_layout_loads_with_adapter(tf5_folder, tiny_config):
        assert len(list(tf5_folder.glob("model-*-of-*.safetensors"))) >= 2
        adapter_config = json.loads((tf5_folder / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(tf5_folder)
        model, info = _load_hf(tf5_folder)
        _check_loaded(model, info, tf5_folder, tiny_config["text_config"]["num_hidden_layers"])
        reference, _ = _load_hf(build_checkpoint("tiny"))
        for adapters in (True, False):
            assert torch.equal(_text_logits(model, adapters), _text_logits(reference, adapters))

else:

    def test_tf5_layout_is_refused_by_transformers_4():
        with pytest.raises(ValueError, match="written by transformers 5.x"):
            build_checkpoint("tiny", layout="tf5")


def test_untied_variant_keeps_a_separate_head():
    folder = build_checkpoint("tiny-untied")
    weights = _read_safetensors(folder, "model-*-of-*.safetensors")
    head, embed = weights["language_model.lm_head.weight"], weights["language_model.model.embed_tokens.weight"]
    assert not torch.equal(head, embed)
    model, info = _load_hf(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    lm_head = model.lm_head if TF5_MODULE_PATHS else model.language_model.lm_head
    assert torch.equal(lm_head.weight, head)


def test_tiny_model_forward_and_generate_with_audio(hub_model, hub_folder, tiny_config):
    from transformers import AutoProcessor

    model, _ = hub_model
    processor = AutoProcessor.from_pretrained(str(hub_folder))
    clip = load_speech_dataset()[2]  # 45 encoder frames -> 3 windows -> 9 audio tokens
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|audio|>can you transcribe the speech into a written format?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(prompt, clip["audio"]["array"], return_tensors="pt")
    audio_id = tiny_config["audio_token_index"]
    assert int((inputs["input_ids"] == audio_id).sum()) == 9
    assert tuple(inputs["input_features"].shape) == (1, 45, 160)

    _set_adapters(model, True)
    with torch.no_grad():
        logits = model(**inputs).logits
        text_only_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == audio_id, 0)
        logits_without_audio = model(input_ids=text_only_ids, attention_mask=inputs["attention_mask"]).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], tiny_config["text_config"]["vocab_size"])
    assert torch.isfinite(logits).all()
    # the audio reaches the language model
    assert float((logits - logits_without_audio).abs().max()) > 1e-2 * float(logits.abs().max())

    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) >= 1
    assert int(new_tokens[0]) == int(logits[0, -1].argmax())


# ------------------------------------------------------------------------------------------------------- cache
def test_cache_returns_the_same_folder(hub_folder):
    shard = next(hub_folder.glob("model-00001-*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    assert build_checkpoint("tiny") == hub_folder
    assert shard.stat().st_mtime_ns == mtime  # not rebuilt


def test_build_is_seeded(hub_folder, tmp_path):
    again = build_checkpoint("tiny", cache_dir=tmp_path / "a")
    other_seed = build_checkpoint("tiny", seed=1, cache_dir=tmp_path / "b")
    assert again != hub_folder and again.name == hub_folder.name
    ours, same, different = (
        _read_safetensors(f, "model-*-of-*.safetensors") for f in (hub_folder, again, other_seed)
    )
    assert all(torch.equal(ours[k], same[k]) for k in ours)
    assert not torch.equal(ours["encoder.input_linear.weight"], different["encoder.input_linear.weight"])
    assert not any(tmp.name.startswith(".tmp-") for tmp in (tmp_path / "a").iterdir())


def _cache_entry(cache, name, size, last_used_s_ago):
    entry = cache / name
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * size)
    stamp = cache / f".{name}.used"
    stamp.touch()
    when = time.time() - last_used_s_ago
    os.utime(stamp, (when, when))
    return entry


def test_cache_prunes_least_recently_used_entries_to_its_bound(tmp_path, monkeypatch):
    hour = 3600
    old = _cache_entry(tmp_path, "2b-hub-float32-old", 400, 3 * hour)
    older = _cache_entry(tmp_path, "cfg-hub-float32-older", 300, 5 * hour)
    recent = _cache_entry(tmp_path, "8b-hub-float32-recent", 500, 60)  # inside the grace period: maybe in use
    building = tmp_path / ".tmp-tiny-hub-float32-x-1-ab"
    building.mkdir()
    (building / "model.safetensors").write_bytes(b"x" * 1000)
    new = _cache_entry(tmp_path, "tiny-hub-float32-new", 200, 10 * hour)  # the entry just built: kept
    removed = prune_cache(tmp_path, keep=new, limit=1000)
    # 1400 bytes in entries: the least recently used goes first, then the next, until <= 1000
    assert removed == [older, old]
    assert not older.exists() and not old.exists() and not (tmp_path / f".{older.name}.used").exists()
    assert recent.is_dir() and new.is_dir() and building.is_dir()
    # over the bound with only protected entries left: nothing more is removed
    assert prune_cache(tmp_path, keep=new, limit=1) == []
    monkeypatch.setenv(CACHE_MAX_ENV, "1e-6")  # ~1 KiB
    assert cache_limit_bytes() == pytest.approx(1e-6 * 2**30)
    for bad in ("0", "-3", "lots", "nan"):
        monkeypatch.setenv(CACHE_MAX_ENV, bad)
        with pytest.raises(ValueError, match=CACHE_MAX_ENV):
            cache_limit_bytes()


def test_cache_hit_marks_the_entry_used_and_a_build_prunes(tmp_path, monkeypatch):
    stale = _cache_entry(tmp_path, "cfg-hub-float32-stale", 10_000, 48 * 3600)
    monkeypatch.setenv(CACHE_MAX_ENV, "1e-9")  # one byte: every entry that may go, goes; the new build stays
    folder = build_checkpoint("tiny", cache_dir=tmp_path)
    stamp = tmp_path / f".{folder.name}.used"
    assert not stale.exists() and folder.is_dir() and stamp.is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # the folder is a plain checkpoint
    os.utime(stamp, (0, 0))
    assert build_checkpoint("tiny", cache_dir=tmp_path) == folder
    assert time.time() - stamp.stat().st_mtime < 60


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown layout"):
        build_checkpoint("tiny", layout="gguf")
    with pytest.raises(ValueError, match="unsupported dtype"):
        build_checkpoint("tiny", dtype="int8")
    with pytest.raises(ValueError, match="neither a variant"):
        build_checkpoint("no-such-variant")
    with pytest.raises(ValueError, match="regime must be"):
        build_checkpoint("tiny", regime="sharp")


# ----------------------------------------------------------------------------------------------------- speech
def test_speech_dataset_matches_the_clip_table():
    dataset = load_speech_dataset()
    table = speech_clip_table()
    assert dataset.column_names == ["file", "audio", "text", "speaker_id", "chapter_id", "id"]
    assert len(dataset) == len(table) >= 6
    for row, clip in zip(dataset, table):
        audio = row["audio"]
        assert row["id"] == clip["id"]
        assert audio["sampling_rate"] == 16000
        assert audio["array"].dtype.name == "float32" and audio["array"].ndim == 1
        assert len(audio["array"]) == clip["num_samples"]
        assert (clip["num_samples"] // 160 + 1) // 2 == clip["encoder_frames"]
        assert 0.1 < float(abs(audio["array"]).max()) <= 1.0  # speech, not silence
        assert row["text"] and row["text"] == row["text"].upper()
        assert row["speaker_id"] == int(row["id"].split("-")[0])
    frames = [clip["encoder_frames"] for clip in table]
    for period in (15, 40, 200):
        assert any(f % period == 0 for f in frames), f"no clip ends on a {period}-frame boundary"
        assert any(f % period == 1 for f in frames), f"no clip ends one frame past a {period}-frame boundary"
    seconds = [clip["num_samples"] / 16000 for clip in table]
    assert min(seconds) < 1.0 and max(seconds) > 30.0


def test_speech_fixtures_are_small():
    total = sum(p.stat().st_size for p in (FIXTURES_DIR / "speech").iterdir())
    assert total < 3 * 2**20


def test_librispeech_dummy_is_used_only_from_the_local_cache():
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download("hf-internal-testing/librispeech_asr_dummy", repo_type="dataset", local_files_only=True)
        cached = True
    except LocalEntryNotFoundError:
        cached = False
    if cached:
        row = load_speech_dataset("librispeech_dummy")[0]
        assert row["audio"]["sampling_rate"] == 16000 and row["audio"]["array"].dtype.name == "float32"
    else:
        with pytest.raises(ValueError, match="not in the local HF hub cache"):
            load_speech_dataset("librispeech_dummy")
    with pytest.raises(ValueError, match="unknown source"):
        load_speech_dataset("librivox")
