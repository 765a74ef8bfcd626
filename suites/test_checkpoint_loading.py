"""Loading checkpoints into the FMS model: both HF layouts, both entry points of get_model, and the coverage audit
that turns FMS's "keys not copied" warning into an error naming the keys."""

import json
import shutil

import pytest
import torch
from fms.models import get_model
from safetensors.torch import load_file, save_file

from granite_speech.checkpoint import CheckpointCoverageError
from granite_speech.config import _tiny_config, from_pretrained_folder
from parity.granite.fixtures import build_checkpoint
from parity.granite.hf import TRANSFORMERS_VERSION
from granite_speech.checkpoint import load_model


pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # file handling: the tiny fixture


@pytest.fixture(scope="module")
def tiny_hub():
    return build_checkpoint("tiny", layout="hub")


@pytest.fixture(scope="module")
def tiny_hub_model(tiny_hub):
    return load_model(tiny_hub)


@pytest.fixture(scope="module")
def probe_inputs():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 61, 160, generator=g)
    n_audio = 3 * -(-61 // 15)
    ids = torch.cat([torch.randint(1, 500, (1, 4), generator=g), torch.full((1, n_audio), _tiny_config.audio_token_index),
                     torch.randint(1, 500, (1, 5), generator=g)], dim=1)
    return ids, features


def _logits(model, inputs):
    ids, features = inputs
    with torch.no_grad():
        return model(ids, input_features=features)


def test_tiny_variant_matches_its_hf_config(tiny_hub):
    # the registered `tiny` variant and the HF config.json of the fixture describe the same model
    assert from_pretrained_folder(tiny_hub) == _tiny_config


@pytest.mark.skipif(TRANSFORMERS_VERSION.major < 5, reason="only transformers 5.x can write the tf5 layout (run on the tf5 line)")
def test_transformers5_saved_layout_loads_identically(tiny_hub_model, probe_inputs):
    tf5 = build_checkpoint("tiny", layout="tf5")
    assert torch.equal(_logits(load_model(tf5), probe_inputs), _logits(tiny_hub_model, probe_inputs))


def test_variant_entry_point_equals_hf_pretrained(tiny_hub, tiny_hub_model, probe_inputs):
    by_variant = get_model("granite_speech", "tiny", model_path=str(tiny_hub), source="hf").eval()
    assert torch.equal(_logits(by_variant, probe_inputs), _logits(tiny_hub_model, probe_inputs))


def test_unfused_weights_give_the_same_logits(tiny_hub, tiny_hub_model, probe_inputs):
    unfused = get_model("hf_pretrained", model_path=str(tiny_hub), fused_weights=False).eval()
    assert "language_model.base_model.layers.0.attn.in_proj.query.weight" in unfused.state_dict()
    torch.testing.assert_close(_logits(unfused, probe_inputs), _logits(tiny_hub_model, probe_inputs), atol=1e-6, rtol=1e-6)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_shard(folder, edit):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_audit_names_a_missing_tensor(tiny_hub, tmp_path):
    folder = _copy(tiny_hub, tmp_path / "ckpt")

    def drop_one_tensor(tensors):
        del tensors[next(k for k in sorted(tensors) if not k.endswith("num_batches_tracked"))]

    _edit_shard(folder, drop_one_tensor)
    with pytest.raises(CheckpointCoverageError, match="missing from the checkpoint"):
        load_model(folder)


def test_audit_names_an_extra_tensor(tiny_hub, tmp_path):
    folder = _copy(tiny_hub, tmp_path / "ckpt")
    _edit_shard(folder, lambda t: t.__setitem__("encoder.layers.0.attn.surprise.weight", torch.ones(2, 2)))
    with pytest.raises(CheckpointCoverageError, match=r"encoder\.layers\.0\.attn\.surprise\.weight"):
        load_model(folder)


def test_audit_names_an_orphan_lora_key(tiny_hub, tmp_path):
    folder = _copy(tiny_hub, tmp_path / "ckpt")
    adapter = folder / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    key = "base_model.model.language_model.model.layers.0.self_attn.k_proj.lora_A.weight"  # k_proj is not a target
    tensors[key] = torch.ones_like(tensors[key.replace("k_proj", "q_proj")])
    save_file(tensors, str(adapter))
    with pytest.raises(CheckpointCoverageError, match=r"LoRA tensors with no matching .*lora\.layers\.0\.k_proj"):
        load_model(folder)


def test_lora_scale_comes_from_adapter_config(tiny_hub, tiny_hub_model, tmp_path, probe_inputs):
    folder = _copy(tiny_hub, tmp_path / "ckpt")
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["lora_alpha"] = adapter_config["lora_alpha"] * 2
    config_path.write_text(json.dumps(adapter_config))
    rescaled = load_model(folder)
    assert rescaled.config.lora_scaling == 2 * tiny_hub_model.config.lora_scaling
    assert not torch.allclose(_logits(rescaled, probe_inputs), _logits(tiny_hub_model, probe_inputs), atol=1e-4)


def test_hf_reference_reads_the_folder_not_the_adapters_base_model(tiny_hub, tmp_path):
    """A copied and edited folder keeps the adapter_config.json whose `base_model_name_or_path` names the original:
    transformers 4.57 would load its base weights from there, and the reference would be a different model."""
    from parity.granite.hf import load_hf_model

    folder = shutil.copytree(tiny_hub, tmp_path / "copy")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_hub)
    key = "language_model.model.norm.weight"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    loaded = load_hf_model(folder).state_dict()
    norm = next(value for name, value in loaded.items() if name.endswith("model.norm.weight")
                and "language_model" in name)
    assert torch.equal(norm, tensors[key])
