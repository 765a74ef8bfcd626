"""Checks on a checkpoint folder's files before any tensor is read, so a broken folder is reported by file name
(FMS's loader globs `*.safetensors`, never reads the index, and surfaces a truncated file as a bare header error).

Weights are read from safetensors only, never through pickle (`torch.load`), on every loading path:

- `get_model("hf_pretrained", model_path=DIR)`: the HF config registry runs `check_checkpoint_folder`;
- `get_model("granite_speech", VARIANT, model_path=PATH, source="hf")`: FMS would glob `*.bin` / `*.pt` when a
  folder holds no safetensors and `torch.load` them. `install_fms_guard` wraps the step of FMS's `get_model` that
  resolves the architecture (it runs before FMS reads any weight file): for `granite_speech` it runs
  `check_weight_files` on the path, which refuses anything but safetensors. Other architectures are untouched.
- `granite_speech.checkpoint.load_model`, the CLIs and the pytest plugin's `--checkpoint`: `check_checkpoint_folder`.
"""

import json
from pathlib import Path
from typing import List, Union

import torch

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ARCHITECTURE = "granite_speech"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointFormatError(ValueError):
    """A checkpoint holds weights in a format that is never read (pickle), or a file that is corrupt."""


def _pickle_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _refuse_pickle(where: str, names: List[str]) -> None:
    raise CheckpointFormatError(
        f"{where} holds only pickle weights ({', '.join(names)}); Granite Speech loads safetensors only, never "
        f"pickle: convert them (e.g. transformers `save_pretrained(..., safe_serialization=True)`)"
    )


def _check_readable(shard: Path, folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="pt") as handle:
            handle.keys()
    except SafetensorError as err:  # its message does not name the file
        raise CheckpointFormatError(f"{shard.name} in {folder} is truncated or corrupt: {err}") from err


def check_weight_files(path: Union[str, Path]) -> List[Path]:
    """The safetensors files FMS will read for `model_path=path` (a folder, a file, or FMS's `folder/*glob`);
    raises FileNotFoundError for missing files, CheckpointFormatError for pickle-only or corrupt ones."""
    text = str(path)
    base, star, pattern = text.partition("*")
    root = Path(base).expanduser()
    if star:
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint folder {root} does not exist")
        files = sorted(root.glob(star + pattern))
        if not files:
            raise FileNotFoundError(f"no checkpoint files match {text}")
        pickled = [p.name for p in files if p.suffix != ".safetensors"]
        if pickled:
            _refuse_pickle(text, pickled)
        for shard in files:
            _check_readable(shard, root)
        return files
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(str(root), [root.name])
        if root.suffix != ".safetensors":
            raise CheckpointFormatError(f"{root} is neither a folder nor a *.safetensors file; expected a checkpoint "
                                        f"folder (or one of its safetensors files)")
        _check_readable(root, root.parent)
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist")
    index = root / INDEX_NAME
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointFormatError(f"{index} is not a safetensors index (no readable weight_map): {err}") from err
        absent = [name for name in listed if not (root / name).is_file()]
        if absent:
            raise FileNotFoundError(f"shard(s) {absent} listed in {index} are missing from {root}")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        pickled = _pickle_files(root)
        if pickled:
            _refuse_pickle(str(root), pickled)
        raise FileNotFoundError(f"{root} holds no *.safetensors files (only safetensors are loaded, never pickle)")
    for shard in shards:
        _check_readable(shard, root)
    return shards


def check_checkpoint_folder(folder: Union[str, Path]) -> Path:
    """The folder as a Path; raises FileNotFoundError / CheckpointFormatError (a ValueError) naming the missing,
    pickle-only or unreadable file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise FileNotFoundError(f"checkpoint folder {folder} is a file; expected a Hugging Face checkpoint folder")
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    check_weight_files(folder)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (folder / name).is_file()]
        if pickled:
            _refuse_pickle(f"the adapter of {folder}", pickled)
        raise FileNotFoundError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; expected both (the LoRA "
                                f"adapter) or neither")
    return folder


def check_processor_files(folder: Union[str, Path]) -> Path:
    """The files the processor needs besides the weights: tokenizer and feature extractor configs."""
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no preprocessor_config.json (the feature extractor's settings)")
    if not (folder / "tokenizer_config.json").is_file() or not any(
        (folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")
    ):
        raise FileNotFoundError(f"{folder} has no tokenizer (expected tokenizer_config.json with tokenizer.json, "
                                f"vocab.json or tokenizer.model)")
    return folder


# ---------------------------------------------------------------------------------------------- the FMS guard
_INFER = "__maybe_infer_model_variant"  # fms.models: resolves architecture/variant/model_path/source first
_BUILD = "_get_model_instance"  # fms.models: builds the model (meta device, data_type) before the weights load
FAMILY_ARCHITECTURES = ("granite_speech", "granite_speech_plus", "granite_speech5")


def install_fms_guard() -> None:
    """Make `fms.models.get_model` check a Granite Speech checkpoint before reading any weight.

    FMS 1.13's `get_model` calls, in order: the architecture resolver (`__maybe_infer_model_variant`), then
    `serialization.load_state_dict` (which globs `*.bin` and `torch.load`s it when no safetensors exist), then
    `_get_model_instance` (the model on the meta device, in `data_type`), then the weights. The resolver is the one
    step that sees both the architecture and the weight path before any read, so it is wrapped here (idempotently):
    for the family's architectures it refuses anything but safetensors (`check_weight_files`) and runs the
    weight-coverage audit on the safetensors headers (`preflight`); `model_path` of `hf_pretrained` must be a local
    folder (FMS reads it as one; a missing one would otherwise be looked up on the hub as a repo id). The model
    builder is wrapped to refuse a non-floating `data_type` for the family with a ValueError. Other architectures
    are untouched."""
    import fms.models as fms_models

    original = fms_models.__dict__.get(_INFER)
    build = fms_models.__dict__.get(_BUILD)
    if original is None or build is None:
        raise ImportError(
            f"fms.models has no {_INFER} / {_BUILD} (ibm-fms {getattr(fms_models, '__version__', '?')}): the "
            f"safetensors-only guard of granite_speech cannot be installed; this package is pinned to ibm-fms 1.13.1"
        )
    if getattr(original, "_granite_speech_guard", False):
        return

    def guarded(architecture, variant, model_path, source, **kwargs):
        if architecture == "hf_pretrained" and variant is None and model_path is not None:
            check_local_folder(model_path)
        resolved = original(architecture, variant, model_path, source, **kwargs)
        if resolved[0] in FAMILY_ARCHITECTURES and resolved[2] is not None:
            from granite_speech.checkpoint.preflight import check_headers_cover_model

            files = check_weight_files(resolved[2])
            check_headers_cover_model(resolved[0], resolved[1], resolved[3], resolved[4], files)
        return resolved

    def guarded_build(architecture, variant, *, dtype=None, **kwargs):
        if architecture in FAMILY_ARCHITECTURES and dtype is not None and not (
                isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"data_type {dtype} is not supported by {architecture}: expected a floating-point dtype "
                             f"({', '.join(map(str, SUPPORTED_DTYPES))})")
        return build(architecture, variant, dtype=dtype, **kwargs)

    guarded._granite_speech_guard = True
    guarded.__wrapped__ = original
    guarded_build.__wrapped__ = build
    setattr(fms_models, _INFER, guarded)
    setattr(fms_models, _BUILD, guarded_build)


def check_local_folder(model_path) -> Path:
    """`get_model("hf_pretrained", model_path=...)` reads a local folder, never the hub: a missing path is a
    FileNotFoundError and a file a NotADirectoryError (both OSError), each naming the path."""
    folder = Path(str(model_path)).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model_path {folder} does not exist; expected a local Hugging Face checkpoint folder "
                                f"(nothing is fetched from the hub)")
    if not folder.is_dir():
        raise NotADirectoryError(f"model_path {folder} is a file, not a folder; expected the Hugging Face checkpoint "
                                 f"folder that holds it ({folder.parent})")
    return folder


install_fms_guard()
