"""Bad input gets a clear error that names what was wrong: audio and prompts through the processor, tensors through
the model's forward, corrupted checkpoints through the loader, broken configs, and the CLI.

Audio, prompt and forward cases run against the session's model (`--model`: `model:...` in the test id); checkpoint
corruption always edits a temporary copy of the tiny fixture (never the cached folder), since only the file handling
is under test there, and the config and CLI cases need no model (`fixed:...`: the CPU gate runs them).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.granite.fixtures.paths import CONFIGS_DIR

import transformers  # noqa: E402

PLUS_IN_TRANSFORMERS = hasattr(transformers, "GraniteSpeechPlusForConditionalGeneration")
import torch
from fms.models import get_model
from safetensors.torch import load_file, save_file

import granite_speech  # noqa: F401  (registers the architecture for get_model)
from granite_speech.checkpoint import CheckpointCoverageError
from granite_speech.config import ConformerConfig, GraniteSpeechConfig, QFormerProjectorConfig
from granite_speech.processor import GraniteSpeechProcessor
from parity.granite.fixtures import SPEECH_DIR, build_checkpoint
from granite_speech.checkpoint import load_model

PROMPT = "<|audio|> please transcribe this clip."
SESSION = pytest.mark.runs_at("session")
pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # all but the SESSION-marked tests


def _noise(num_samples: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_samples, generator=torch.Generator().manual_seed(seed)) * 0.1


# ---------------------------------------------------------------------------------------------- audio and prompts
@pytest.fixture(scope="module")
def processor(checkpoint_dir):
    return GraniteSpeechProcessor.from_pretrained(checkpoint_dir)


@SESSION
@pytest.mark.parametrize(
    "make_audio, kwargs, error, message",
    [
        pytest.param(lambda: torch.zeros(0), {}, ValueError, r"audio\[0\] has 0 samples; expected at least 257",
                     id="empty-clip"),
        pytest.param(lambda: [], {}, ValueError, r"audio is an empty list; expected one or more clips",
                     id="empty-list"),
        pytest.param(lambda: _noise(256), {}, ValueError, r"audio\[0\] has 256 samples; expected at least 257",
                     id="too-short-256"),
        pytest.param(lambda: [_noise(16_000).index_fill(0, torch.tensor([3, 900]), float("nan"))], {}, ValueError,
                     r"audio\[0\] contains 2 NaN/Inf samples; expected finite samples", id="nan"),
        pytest.param(lambda: [_noise(16_000).index_fill(0, torch.tensor([5]), float("-inf"))], {}, ValueError,
                     r"audio\[0\] contains 1 NaN/Inf samples; expected finite samples", id="inf"),
        pytest.param(lambda: [np.stack([_noise(8_000, 1).numpy(), _noise(8_000, 2).numpy()], axis=1)], {},
                     ValueError, r"audio\[0\] has shape \[8000, 2\]; expected one mono clip.*mix multi-channel",
                     id="stereo-channels-last"),
        pytest.param(lambda: _noise(16_000).view(1, 2, 8_000), {}, ValueError,
                     r"audio tensor has shape \[1, 2, 8000\]; expected a mono clip", id="stereo-3d"),
        # a [2, N] tensor is a batch of two clips by contract: with one placeholder, the count check says so
        pytest.param(lambda: _noise(16_000).view(2, 8_000), {}, ValueError,
                     r"1 <\|audio\|> placeholders but 2 audio clips.*\[B, N\] tensor counts as B clips",
                     id="stereo-2d-read-as-two-clips"),
        pytest.param(lambda: _noise(16_000), {"sampling_rate": 44_100}, ValueError,
                     r"audio sampled at 44100 Hz, but this extractor expects 16000 Hz", id="wrong-sampling-rate"),
        pytest.param(lambda: (_noise(16_000) * 32767).to(torch.int16), {}, ValueError,
                     r"dtype torch.int16; expected floating point samples.*int16 / 32768", id="int16-tensor"),
        pytest.param(lambda: [(_noise(16_000).numpy() * 32767).astype(np.int32)], {}, ValueError,
                     r"audio\[0\] has numpy dtype int32; expected floating point samples", id="int32-numpy"),
        pytest.param(lambda: _noise(16_000).tolist(), {}, TypeError,
                     r"audio\[0\] is a float; expected a torch.Tensor or numpy array per clip", id="python-floats"),
    ],
)
def test_processor_rejects_bad_audio(processor, make_audio, kwargs, error, message):
    with pytest.raises(error, match=message):
        processor(PROMPT, make_audio(), **kwargs)


@SESSION
def test_processor_accepts_the_shortest_valid_clip(processor):
    # the boundary of the too-short case: 257 samples is HF's minimum and must work (so the check is not too strict)
    out = processor(PROMPT, _noise(257))
    assert out["input_features"].shape[1] == 1 and bool(torch.isfinite(out["input_features"]).all())


@SESSION
@pytest.mark.parametrize(
    "texts, num_clips, message",
    [
        pytest.param(["<|audio|><|audio|> two placeholders"], 1,
                     r"contain 2 <\|audio\|> placeholders but 1 audio clips were given", id="more-placeholders"),
        pytest.param(["<|audio|> first", "no placeholder here"], 2,
                     r"contain 1 <\|audio\|> placeholders but 2 audio clips were given", id="fewer-placeholders"),
        pytest.param(["<|audio|> audio promised"], 0, r"contain 1 <\|audio\|> placeholders but no audio was given",
                     id="placeholder-without-audio"),
    ],
)
def test_processor_rejects_placeholder_count_mismatch(processor, texts, num_clips, message):
    audio = [_noise(8_000, seed=i) for i in range(num_clips)] or None
    with pytest.raises(ValueError, match=message):
        processor(texts, audio)


# ---------------------------------------------------------------------------------------------- model forward
@pytest.fixture(scope="module")
def forward_inputs(fms_model, device, dtype):
    """Two prompts whose clips have 1 and 2 projector windows: valid ids, features and mask to break one at a time."""
    cfg = fms_model.config
    q = cfg.projector_config.queries_per_window
    frames = 2 * cfg.projector_config.window_size
    audio_id = cfg.audio_token_index
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([[5] + [audio_id] * q + [7] * (q + 2), [5] + [audio_id] * (2 * q) + [7, 8]])
    features = torch.randn(2, frames, cfg.encoder_config.input_dim, generator=g)
    mask = torch.arange(2 * q).unsqueeze(0) < torch.tensor([[q], [2 * q]])
    return {"ids": ids.to(device), "features": features.to(device, dtype), "mask": mask.to(device), "q": q,
            "vocab": cfg.text_config.src_vocab_size}


@SESSION
@torch.no_grad()
def test_forward_accepts_the_valid_inputs(fms_model, forward_inputs):
    # the control for every case below: the unbroken inputs run
    out = fms_model(forward_inputs["ids"], input_features=forward_inputs["features"],
                    input_features_mask=forward_inputs["mask"])
    assert out.shape[:2] == forward_inputs["ids"].shape and bool(torch.isfinite(out).all())


def _break(inputs, case):
    ids, features, mask = inputs["ids"], inputs["features"], inputs["mask"]
    if case == "audio-tokens-without-features":
        return dict(input_ids=ids)
    if case == "total-count-mismatch":  # 3q placeholders in the prompts, features for one window (q) per clip
        return dict(input_ids=ids, input_features=features[:, : features.shape[1] // 2])
    if case == "per-row-count-mismatch":  # same total, rows swapped
        return dict(input_ids=ids, input_features=features, input_features_mask=mask.flip(0))
    if case == "features-without-audio-tokens":
        return dict(input_ids=torch.full_like(ids, 7), input_features=features, input_features_mask=mask)
    if case == "mask-wrong-shape":
        return dict(input_ids=ids, input_features=features, input_features_mask=mask[:, :-1])
    if case == "mask-wrong-dtype":
        return dict(input_ids=ids, input_features=features, input_features_mask=mask.long())
    if case == "features-2d":
        return dict(input_ids=ids, input_features=features[0], input_features_mask=mask)
    if case == "features-4d":
        return dict(input_ids=ids, input_features=features[None], input_features_mask=mask)
    if case == "id-beyond-the-vocabulary":  # ids of another (larger) tokenizer: a device-side assert on CUDA
        vocab = inputs["vocab"]
        return dict(input_ids=torch.cat([ids[:, :-1], torch.full_like(ids[:, -1:], vocab)], 1),
                    input_features=features, input_features_mask=mask)
    if case == "negative-id":
        return dict(input_ids=torch.cat([torch.full_like(ids[:, :1], -1), ids[:, 1:]], 1), input_features=features,
                    input_features_mask=mask)
    if case == "features-wrong-size":
        return dict(input_ids=ids, input_features=features[..., : features.shape[-1] // 2], input_features_mask=mask)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("audio-tokens-without-features", r"input_ids hold \d+ audio tokens \(id \d+\) but no input_features"),
        ("total-count-mismatch", r"audio tokens per prompt \[{q}, {q2}\] do not match audio features per clip "
                                 r"\[{q}, {q}\]"),
        ("per-row-count-mismatch", r"audio tokens per prompt \[{q}, {q2}\] do not match audio features per clip "
                                   r"\[{q2}, {q}\]"),
        ("features-without-audio-tokens", r"audio tokens per prompt \[0, 0\] do not match"),
        ("mask-wrong-shape", r"input_features_mask must be a bool tensor of shape \[num_audios=2, "
                             r"audio_tokens={q2}\], got torch.bool \(2, {q2m1}\)"),
        ("mask-wrong-dtype", r"input_features_mask must be a bool tensor .* got torch.int64"),
        ("features-2d", r"input_features must be \[batch, frames, \d+\], got \(\d+, \d+\)$"),
        ("features-4d", r"input_features must be \[batch, frames, \d+\], got \(1, 2, \d+, \d+\)"),
        ("features-wrong-size", r"input_features must be \[batch, frames, (\d+)\], got \(2, \d+, \d+\)"),
        ("id-beyond-the-vocabulary", r"input_ids hold token id {vocab}, outside this model's vocabulary \[0, {vocab}\); "
                                     r"were they made by another model's tokenizer\?"),
        ("negative-id", r"input_ids hold token id -1, outside this model's vocabulary \[0, {vocab}\)"),
    ],
)
@SESSION
@torch.no_grad()
def test_forward_rejects_bad_tensors(fms_model, forward_inputs, case, message):
    q = forward_inputs["q"]
    message = message.format(q=q, q2=2 * q, q2m1=2 * q - 1, vocab=forward_inputs["vocab"])
    with pytest.raises(ValueError, match=message):
        fms_model(**_break(forward_inputs, case))


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny_checkpoint():
    return build_checkpoint("tiny")


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def _shard_of(folder: Path, key: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]


def _edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


ENTRY_POINTS = {
    "load_model": load_model,
    "get_model": lambda folder: get_model("hf_pretrained", model_path=str(folder)),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_missing_shard_file_is_named(ckpt_copy, entry):
    shard = _shard_of(ckpt_copy, "encoder.input_linear.weight")
    shard.unlink()  # the index still lists it
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}.*model\.safetensors\.index\.json|"
                                                rf"model\.safetensors\.index\.json.*{shard.name}"):
        ENTRY_POINTS[entry](ckpt_copy)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_truncated_safetensors_is_named(ckpt_copy, entry):
    shard = _shard_of(ckpt_copy, "encoder.input_linear.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # header intact, tensor data cut short
    with pytest.raises(ValueError, match=rf"{shard.name}.*(truncated|corrupt|incomplete)"):
        ENTRY_POINTS[entry](ckpt_copy)


def test_orphan_lora_key_of_a_non_target_module(ckpt_copy):
    key = "base_model.model.language_model.model.layers.0.self_attn.k_proj.lora_A.weight"  # k_proj is no target
    _edit_safetensors(ckpt_copy / "adapter_model.safetensors",
                      lambda t: t.__setitem__(key, torch.ones_like(t[key.replace("k_proj", "q_proj")])))
    message = r"LoRA tensors with no matching.*lora\.layers\.0\.k_proj\.lora_A"
    with pytest.raises(CheckpointCoverageError, match=message):
        load_model(ckpt_copy)


def test_orphan_lora_key_beyond_the_last_decoder_layer(ckpt_copy):
    nlayers = json.loads((ckpt_copy / "config.json").read_text())["text_config"]["num_hidden_layers"]
    source = "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
    key = source.replace("layers.0.", f"layers.{nlayers + 5}.")
    _edit_safetensors(ckpt_copy / "adapter_model.safetensors", lambda t: t.__setitem__(key, t[source].clone()))
    with pytest.raises(CheckpointCoverageError, match=rf"lora\.layers\.{nlayers + 5}\.q_proj\.lora_A"):
        load_model(ckpt_copy)


def test_unknown_extra_tensor_is_named(ckpt_copy):
    shard = _shard_of(ckpt_copy, "encoder.input_linear.weight")
    _edit_safetensors(shard, lambda t: t.__setitem__("vision_tower.patch_embed.weight", torch.ones(4, 4)))
    with pytest.raises(CheckpointCoverageError, match=r"no place for.*vision_tower\.patch_embed\.weight"):
        load_model(ckpt_copy)


def test_encoder_layer_beyond_the_config_is_named(ckpt_copy):
    # a checkpoint deeper than its config.json: the extra layer must be reported, not crash the loader
    nlayers = json.loads((ckpt_copy / "config.json").read_text())["encoder_config"]["num_layers"]
    source = "encoder.layers.0.ff1.up_proj.weight"
    key = source.replace("layers.0.", f"layers.{nlayers}.")
    _edit_safetensors(_shard_of(ckpt_copy, source), lambda t: t.__setitem__(key, t[source].clone()))
    with pytest.raises(CheckpointCoverageError, match=rf"encoder\.layers\.{nlayers}\.ff1\.w1\.weight"):
        load_model(ckpt_copy)


def test_missing_decoder_projection_is_named(ckpt_copy):
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    _edit_safetensors(_shard_of(ckpt_copy, key), lambda t: t.pop(key))
    with pytest.raises(CheckpointCoverageError, match=r"layers\.0\.(self_attn\.k_proj|attn\.in_proj\.key)"):
        load_model(ckpt_copy)


@pytest.mark.parametrize(
    "section, field, value, linked",
    [
        pytest.param("text_config", "hidden_size", 128, {}, id="text-hidden-128-vs-64-tensors"),
        pytest.param("encoder_config", "hidden_dim", 32, {("projector_config", "encoder_hidden_size"): 32},
                     id="encoder-hidden-32-vs-64-tensors"),
    ],
)
def test_config_dims_disagreeing_with_the_tensors_raise(ckpt_copy, section, field, value, linked):
    original = json.loads((ckpt_copy / "config.json").read_text())[section][field]

    def edit(config):
        config[section][field] = value
        for (other_section, other_field), other_value in linked.items():
            config[other_section][other_field] = other_value

    _edit_json(ckpt_copy / "config.json", edit)
    with pytest.raises(ValueError, match=r"[Ss]hape mismatch") as excinfo:
        load_model(ckpt_copy)
    # the chained cause carries both sizes, so the message says which dimension disagrees
    chain = f"{excinfo.value} {excinfo.value.__cause__}"
    assert str(value) in chain and str(original) in chain, chain


def test_folder_without_config_json(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_model(ckpt_copy)


def test_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=rf"{missing.name}"):
        load_model(missing)


@pytest.mark.parametrize(
    "field, value, message",
    [
        pytest.param("target_modules", ".*(q|v)_proj", r"a regex target_modules \('\.\*\(q\|v\)_proj'\) is not "
                     r"supported", id="regex-target-modules"),
        pytest.param("peft_type", "IA3", r"only LoRA adapters are supported, got peft_type .*IA3",
                     id="non-lora-peft-type"),
    ],
)
def test_bad_adapter_config(ckpt_copy, field, value, message):
    _edit_json(ckpt_copy / "adapter_config.json", lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {message}"):
        load_model(ckpt_copy)


def test_lora_mode_typo_in_the_config():
    with pytest.raises(ValueError, match=r"lora_mode must be one of \('merged', 'audio_only'\), got 'merge'"):
        GraniteSpeechConfig(lora_mode="merge")


def test_lora_mode_typo_when_loading(tiny_checkpoint):
    # get_model passes lora_mode through ModelConfig.updated, which must validate it as the constructor does
    with pytest.raises(ValueError, match=r"lora_mode must be one of \('merged', 'audio_only'\), got 'merge'"):
        load_model(tiny_checkpoint, lora_mode="merge")


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(lambda c: c["encoder_config"].update(context_size=c["encoder_config"]["max_pos_emb"] + 1),
                     r"context_size must be in \(0, max_pos_emb=64\], got 65", id="context-size-gt-max-pos-emb"),
        pytest.param(lambda c: c.update(window_size=16), r"window_size \(16\) must be a multiple of downsample_rate "
                     r"\(5\)", id="window-not-multiple-of-downsample"),
    ],
)
def test_inconsistent_config_json(ckpt_copy, edit, message):
    _edit_json(ckpt_copy / "config.json", edit)
    with pytest.raises(ValueError, match=message):
        load_model(ckpt_copy)


@pytest.mark.parametrize(
    "build, message",
    [
        pytest.param(lambda: ConformerConfig(context_size=600, max_pos_emb=512),
                     r"context_size must be in \(0, max_pos_emb=512\], got 600", id="conformer-context-size"),
        pytest.param(lambda: QFormerProjectorConfig(window_size=15, downsample_rate=4),
                     r"window_size \(15\) must be a multiple of downsample_rate \(4\)", id="projector-window"),
    ],
)
def test_inconsistent_fms_configs(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------------------------------------- CLI
# `transcribe`'s main as its console script calls it; the process boundary (`python -m granite_speech`) is
# suites/test_cli_errors.py's (test_version), which also holds the whole bad-input table of both CLIs
def _cli(capsys, *args: str) -> tuple:
    from granite_speech.__main__ import main

    code = main(["transcribe", *args])
    return code, capsys.readouterr().err


def test_cli_missing_audio_file(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.flac"
    code, err = _cli(capsys, "--checkpoint", str(tiny_checkpoint), str(missing))
    assert code == 2  # usage or input error (suites/test_cli_errors.py holds the whole contract)
    assert f"no such audio file: {missing}" in err, err
    assert "Traceback" not in err, err


def test_cli_missing_checkpoint_folder(tmp_path, capsys):
    clip = sorted(SPEECH_DIR.glob("*.flac"))[0]
    missing = tmp_path / "no-checkpoint"
    code, err = _cli(capsys, "--checkpoint", str(missing), str(clip))
    assert code == 2
    assert f"checkpoint folder {missing} does not exist" in err, err[-2000:]
    assert "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- get_model (#24)
class WeightsRead(BaseException):
    """FMS started reading weights: a BaseException, so no `except Exception` in between can swallow it."""


@pytest.fixture
def no_weight_reads(monkeypatch):
    from fms.utils import serialization

    def tripwire(*args, **kwargs):
        raise WeightsRead("FMS read the weights before the input was refused")

    monkeypatch.setattr(serialization, "load_state_dict_into_model", tripwire)


def test_get_model_on_a_missing_folder_names_it(tmp_path, no_weight_reads):
    # was: the hub's repo-id validation error (nothing is fetched: model_path is a local folder)
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=rf"model_path {missing} does not exist; expected a local Hugging Face "
                                                rf"checkpoint folder \(nothing is fetched from the hub\)"):
        get_model("hf_pretrained", model_path=str(missing))


def test_get_model_on_a_file_says_it_is_not_a_folder(tiny_checkpoint, no_weight_reads):
    # was: "... holds only pickle weights (config.json)"
    config = tiny_checkpoint / "config.json"
    with pytest.raises(NotADirectoryError, match=rf"model_path {config} is a file, not a folder; expected the Hugging "
                                                 rf"Face checkpoint folder that holds it \({tiny_checkpoint}\)"):
        get_model("hf_pretrained", model_path=str(config))


@pytest.mark.parametrize("data_type", ["int8", torch.int64, torch.bool])
def test_get_model_with_an_integer_dtype_is_a_value_error(tiny_checkpoint, no_weight_reads, data_type):
    # was: a TypeError from torch.set_default_dtype
    with pytest.raises(ValueError, match=r"data_type torch\.(int8|int64|bool) is not supported by granite_speech: "
                                         r"expected a floating-point dtype \(torch\.float32, torch\.bfloat16, "
                                         r"torch\.float16, torch\.float64\)"):
        get_model("hf_pretrained", model_path=str(tiny_checkpoint), data_type=data_type)


def _fit_member_config(folder: Path) -> None:
    shutil.copy(CONFIGS_DIR / "tiny-plus.json",
                folder / "config.json")


@pytest.mark.parametrize(
    "edit, error, message",
    [
        pytest.param(lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(
            intermediate_size=2 * c["text_config"]["intermediate_size"])), CheckpointCoverageError,
            r"(?s)shape mismatch .*layers\.0\.ff_sub_layer\.w2\.weight: checkpoint \[64, 128\], model \[64, 256\]",
            id="shape-mismatch"),
        pytest.param(lambda f: _edit_safetensors(_shard_of(f, "language_model.model.layers.1.mlp.down_proj.weight"),
                                                 lambda t: t.pop("language_model.model.layers.1.mlp.down_proj.weight")),
                     CheckpointCoverageError, r"1 model tensors missing from the checkpoint: "
                     r"\['language_model\.base_model\.layers\.1\.ff_sub_layer\.w2\.weight'\]", id="missing-tensor"),
        pytest.param(_fit_member_config, *((CheckpointCoverageError, r"(shape mismatch|does not match the model)")
                                           if PLUS_IN_TRANSFORMERS else (ValueError, r"granite_speech_plus")),
                     id="config-of-another-member"),  # 4.57 has no plus classes: its config is refused as unknown
        pytest.param(lambda f: _edit_safetensors(_shard_of(f, "encoder.input_linear.weight"), lambda t: t.update(
            {"encoder.input_linear.weight": t["encoder.input_linear.weight"].to(torch.uint8)})), ValueError,
            r"1 weight tensor\(s\) are not floating point: encoder\.input_linear\.weight \(U8, in model-\S+\); "
            r"expected F16, BF16, F32, F64", id="integer-dtype"),
        pytest.param(lambda f: _edit_json(f / "config.json", lambda c: c["encoder_config"].update(num_layers=0)),
                     ValueError, r"encoder_config\.num_layers=0 is not supported .*supported: a whole number >= 1",
                     id="zero-encoder-layers"),
    ],
)
def test_checkpoint_and_config_disagreeing_raise_before_any_weight_is_read(ckpt_copy, no_weight_reads, edit, error,
                                                                           message):
    """Checks that came only after every weight was read (the coverage audit in post_init) run on the safetensors
    headers: the same adapter steps and audit, on meta tensors."""
    edit(ckpt_copy)
    with pytest.raises(error, match=message):
        get_model("hf_pretrained", model_path=str(ckpt_copy))


def test_nan_weights_are_named_at_load(ckpt_copy):
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    _edit_safetensors(_shard_of(ckpt_copy, key), lambda t: t[key].__setitem__((0, 3), float("inf")))
    with pytest.raises(ValueError, match=r"tensor language_model\.base_model\.layers\.1\.attn\.dense\.weight \(FMS "
                                         r"name\) holds 1 NaN/Inf value\(s\), the first at index \[0, 3\]"):
        load_model(ckpt_copy)


def test_the_finite_check_passes_large_finite_weights(ckpt_copy):
    """Its control: the fast path (a non-finite sum) overflows on huge finite weights; the exact test lets them
    load."""
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    _edit_safetensors(_shard_of(ckpt_copy, key), lambda t: t[key].fill_(3e38))
    model = load_model(ckpt_copy)
    assert float(model.language_model.base_model.layers[1].attn.dense.weight.detach().max()) == pytest.approx(3e38)
