"""Seeded random GraniteSpeech checkpoints written like the hub (sharded safetensors, PEFT LoRA adapter).

The model is built on the meta device and materialised one module at a time, initialised with the module owner's
transformers `_init_weights`, made non-degenerate (norms, biases, BatchNorm statistics), cast to `dtype` and
streamed into shards, so the 8b model never has to be in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers 4.x default "5GB"
LORA_TARGET_MODULES = ("q_proj", "v_proj")
LORA_B_STD = 0.02  # trained LoRA B is non-zero; at this scale the adapter moves logits visibly but not wildly

# Perturbation scales that make constant-initialised tensors informative (a swapped LayerNorm weight/bias or a
# skipped BatchNorm would otherwise be invisible).
NORM_WEIGHT_NOISE = 0.1
BIAS_STD = 0.02
BATCH_NORM_MEAN_STD = 0.5
BATCH_NORM_VAR_RANGE = (0.5, 2.0)

# Module-path prefixes of transformers >= 5.10 mapped to the legacy (hub) key layout; 4.x paths are already legacy.
_LEGACY_PREFIXES = (
    ("model.encoder.", "encoder."),
    ("model.projector.", "projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)

FEATURE_EXTRACTOR_CONFIG = {
    "feature_extractor_type": "GraniteSpeechFeatureExtractor",
    "melspec_kwargs": {"hop_length": 160, "n_fft": 512, "n_mels": 80, "sample_rate": 16000, "win_length": 400},
    "processor_class": "GraniteSpeechProcessor",
    "projector_downsample_rate": 5,
    "projector_window_size": 15,
    "sampling_rate": 16000,
}


def legacy_key(module_path_key: str) -> str:
    for new, old in _LEGACY_PREFIXES:
        if module_path_key.startswith(new):
            return old + module_path_key[len(new) :]
    return module_path_key


def default_lora_shape(hf_config: dict) -> tuple[int, int]:
    """(r, alpha): the published adapter's r=64/alpha=32 for real sizes; r=8/alpha=16 (scaling 2) for tiny ones."""
    return (64, 32) if hf_config["text_config"]["hidden_size"] >= 1024 else (8, 16)


def check_config(hf_config: dict) -> None:
    if hf_config.get("model_type") != "granite_speech":
        raise ValueError(f"expected model_type 'granite_speech', got model_type={hf_config.get('model_type')!r}")
    for key in ("encoder_config", "projector_config", "text_config", "audio_token_index"):
        if key not in hf_config:
            raise ValueError(f"granite_speech config lacks {key!r}; keys present: {sorted(hf_config)}")


def _meta_model(hf_config: dict):
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    config = GraniteSpeechConfig.from_dict(hf_config)
    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config)
    return model.eval()


def _modules_with_owner(model: nn.Module):
    """(path, module, owner PreTrainedModel) children-first, like transformers' smart_apply init dispatch."""
    from transformers import PreTrainedModel

    def walk(prefix: str, module: nn.Module, owner):
        for name, child in module.named_children():
            child_owner = child if isinstance(child, PreTrainedModel) else owner
            yield from walk(f"{prefix}{name}.", child, child_owner)
        yield prefix, module, owner

    yield from walk("", model, model)


def _persistent_direct_tensors(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters(recurse=False) if p is not None]
    names += [
        n
        for n, b in module.named_buffers(recurse=False)
        if b is not None and n not in module._non_persistent_buffers_set
    ]
    return names


@torch.no_grad()
def _make_non_degenerate(module: nn.Module, generator: torch.Generator) -> None:
    """Replace constant init values (norm weights 1, biases 0, BN stats, zeroed padding rows) by plausible noise."""

    def noise_like(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * std

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.running_mean.copy_(noise_like(module.running_mean, BATCH_NORM_MEAN_STD))
        low, high = BATCH_NORM_VAR_RANGE
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * (high - low) + low)
    for name, param in module.named_parameters(recurse=False):
        if param.ndim == 1 and param.numel() > 1 and bool((param == param[0]).all()):
            if float(param[0]) == 0.0:
                param.copy_(noise_like(param, BIAS_STD))
            else:
                param.mul_(1.0 + noise_like(param, NORM_WEIGHT_NOISE))
        elif isinstance(module, nn.Embedding) and name == "weight":
            zero_rows = (param == 0).all(dim=1)  # padding_idx row: trained checkpoints have a real embedding there
            if zero_rows.any():
                std = float(param[~zero_rows].std())
                param[zero_rows] = noise_like(param[zero_rows], std)


def _natural_order(key: str) -> tuple:
    """'layers.10' after 'layers.9'."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


def _derived_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def _check_informative(prefix: str, module: nn.Module, names: list[str]) -> None:
    for name in names:
        tensor = getattr(module, name)
        if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
            raise RuntimeError(
                f"{prefix}{name} ({type(module).__name__}) is constant after init; the builder must randomise it"
            )


class _ShardWriter:
    """Greedy sharding into at least `min_shards` files of about equal size, then hub-style names + index."""

    def __init__(self, folder: Path, total_bytes: int, max_shard_bytes: int, min_shards: int = 2):
        self.folder = folder
        n_shards = max(min_shards, math.ceil(total_bytes / max_shard_bytes))
        self.target_bytes = math.ceil(total_bytes / n_shards)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_files: list[str] = []
        self.key_to_shard: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        if self.pending_bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(self.shard_files)
        name = f"shard-{index}.tmp.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.key_to_shard.update({k: index for k in self.pending})
        self.shard_files.append(name)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shard_files)
        final_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp_name, final_name in zip(self.shard_files, final_names):
            os.rename(self.folder / tmp_name, self.folder / final_name)
        weight_map = {k: final_names[i] for k, i in sorted(self.key_to_shard.items())}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _tensors_to_write(model: nn.Module) -> dict[str, tuple[int, torch.dtype]]:
    """legacy key -> (numel, meta dtype) of every persistent tensor, excluding tied duplicates (lm_head if tied)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if not tied and getattr(model.config.text_config, "tie_word_embeddings", False):
        tied = {"language_model.lm_head.weight"}  # transformers 4.x: ties inside GraniteForCausalLM
    out = {}
    for key, tensor in model.state_dict().items():
        if key in tied or legacy_key(key) in tied:
            continue
        out[legacy_key(key)] = (tensor.numel(), tensor.dtype)
    return out


def write_base_weights(model: nn.Module, folder: Path, *, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Materialise, initialise and stream the weights of a meta-device model into hub-layout shards."""
    wanted = _tensors_to_write(model)

    def nbytes(numel: int, meta_dtype: torch.dtype) -> int:
        return numel * (meta_dtype.itemsize if not meta_dtype.is_floating_point else dtype.itemsize)

    total = sum(nbytes(n, d) for n, d in wanted.values())
    writer = _ShardWriter(folder, total, max_shard_bytes)
    # Visit modules in legacy-key order and seed each from (seed, legacy path): the values and the shard contents
    # then do not depend on the module tree of the installed transformers version (4.57 and 5.x agree).
    visits = []
    for prefix, module, owner in _modules_with_owner(model):
        names = [n for n in _persistent_direct_tensors(module) if legacy_key(prefix + n) in wanted]
        if names:
            visits.append((_natural_order(legacy_key(prefix)), prefix, module, owner, names))
    visits.sort(key=lambda visit: visit[0])
    with torch.random.fork_rng(devices=[]):
        for _, prefix, module, owner, names in visits:
            module_seed = _derived_seed(seed, legacy_key(prefix))
            module.to_empty(device="cpu", recurse=False)
            for name in names:  # deterministic start: some inits skip tensors (4.57 leaves num_batches_tracked)
                getattr(module, name).detach().zero_()
            torch.manual_seed(module_seed)  # transformers' init functions draw from the global generator
            owner._init_weights(module)
            _make_non_degenerate(module, torch.Generator().manual_seed(module_seed + 1))
            _check_informative(prefix, module, names)
            for name in names:
                tensor = getattr(module, name).detach()
                writer.add(legacy_key(prefix + name), tensor.to(dtype) if tensor.is_floating_point() else tensor)
            module.to_empty(device="meta", recurse=False)  # the writer holds what is still unwritten
    writer.finish()
    written = set(writer.key_to_shard)
    if written != set(wanted):
        raise RuntimeError(f"internal error: not written {sorted(set(wanted) - written)[:5]}")


def _lora_layer_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    text = hf_config["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    return {
        "q_proj": (text["num_attention_heads"] * head_dim, text["hidden_size"]),
        "v_proj": (kv_heads * head_dim, text["hidden_size"]),
    }


@torch.no_grad()
def write_lora_adapter(
    folder: Path, hf_config: dict, *, base_model_path: Path, seed: int, dtype: torch.dtype, rank: int, alpha: int
) -> None:
    """adapter_config.json (written by peft) + adapter_model.safetensors with hub-style keys.

    A ~ peft's default kaiming-uniform init; B ~ N(0, LORA_B_STD) (non-zero, as after training).
    """
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(_derived_seed(seed, "lora"))
    shapes = _lora_layer_shapes(hf_config)
    tensors = {}
    for layer in range(hf_config["text_config"]["num_hidden_layers"]):
        for target in LORA_TARGET_MODULES:
            out_features, in_features = shapes[target]
            prefix = f"base_model.model.language_model.model.layers.{layer}.self_attn.{target}"
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) bound
            lora_a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            lora_b = torch.randn(out_features, rank, generator=generator) * LORA_B_STD
            tensors[f"{prefix}.lora_A.weight"] = lora_a.to(dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(LORA_TARGET_MODULES),
        base_model_name_or_path=str(base_model_path),
        task_type=None,
    )
    lora_config.save_pretrained(str(folder))
    # peft stores target_modules as a set; pin the order so the file is byte-stable across processes.
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapter_config["target_modules"] = list(LORA_TARGET_MODULES)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def write_hub_folder(
    folder: Path,
    hf_config: dict,
    *,
    final_path: Path,
    seed: int,
    dtype: torch.dtype,
    lora_rank: int,
    lora_alpha: int,
    max_shard_bytes: int,
) -> None:
    from ._tokenizer import build_tokenizer

    check_config(hf_config)
    model = _meta_model(hf_config)
    write_base_weights(model, folder, seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes)
    config = dict(hf_config, torch_dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_lora_adapter(
        folder, hf_config, base_model_path=final_path, seed=seed, dtype=dtype, rank=lora_rank, alpha=lora_alpha
    )
    build_tokenizer(folder, hf_config)
    (folder / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR_CONFIG, indent=2) + "\n")
    processor_config = {"audio_token": "<|audio|>", "processor_class": "GraniteSpeechProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


def write_tf5_folder(
    folder: Path, hub_folder: Path, *, final_path: Path, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """Re-save the hub checkpoint with transformers 5.x save_pretrained (base only), then the adapter hub-style.

    transformers 5.x save_pretrained with the adapter attached writes `q_proj.base_layer.weight` keys that do not
    load back, so the base model is loaded without the adapter.
    """
    import transformers
    from transformers import AutoProcessor, GraniteSpeechForConditionalGeneration

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ValueError(f"layout 'tf5' needs transformers 5.x to write it; this is {transformers.__version__}")
    with tempfile.TemporaryDirectory(prefix="granite-speech-base-") as base_only:
        for entry in hub_folder.iterdir():  # everything except the adapter files
            if entry.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                os.symlink(entry, Path(base_only) / entry.name)
        model = GraniteSpeechForConditionalGeneration.from_pretrained(base_only, dtype=dtype)
        if getattr(model, "_hf_peft_config_loaded", False):
            raise RuntimeError("internal error: base model loaded with an adapter attached")
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        n_shards = max(2, math.ceil(total / max_shard_bytes))
        model.save_pretrained(folder, max_shard_size=math.ceil(total / n_shards))
        del model
        AutoProcessor.from_pretrained(base_only).save_pretrained(folder)
    shutil.copyfile(hub_folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    adapter_config = json.loads((hub_folder / ADAPTER_CONFIG).read_text())
    adapter_config["base_model_name_or_path"] = str(final_path)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
