"""Maps the HF architecture `GraniteSpeechForConditionalGeneration` to FMS's `granite_speech` so that
`get_model("hf_pretrained", model_path=DIR)` builds the model from any valid HF config.json.

The config-coverage audit (`config_audit`) runs inside `from_hf_config` / `read_lora_config`, i.e. here, before FMS
reads a single weight: an unsupported field stops the load with an error naming it.

FMS's HF config registry lives in `fms.models.hf.config_utils`, whose package imports transformers' modeling code
(about 2 s). `register_hf_architecture` therefore registers there only once that module is loaded: at once if it is,
else right after its first import, which `get_model("hf_pretrained")` itself performs before it reads the registry.
"""

import importlib.abc
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, List, Tuple

from granite_speech.checkpoint.files import check_checkpoint_folder
from granite_speech.config import GraniteSpeechConfig, checkpoint_has_lm_head, from_hf_config, read_lora_config

HF_ARCHITECTURE = "GraniteSpeechForConditionalGeneration"
# chosen by the caller of get_model, not by the checkpoint
_USER_OPTIONS = ("lora_mode", "fused_weights")


def build_granite_speech_params(config) -> dict:
    """FMS kwargs for an HF GraniteSpeechConfig: every field of the FMS config except the caller's options, so
    nothing of the base variant get_model starts from leaks in. The adapter settings come from the checkpoint
    folder's adapter_config.json (rank 0 when the folder has none), tying from its lm_head (see
    `granite_speech.config.resolve_tie`)."""
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    folder = Path(name) if name else None  # an in-memory config (no folder) must not read the current directory
    lora, has_lm_head = {}, None
    if folder is not None and folder.is_dir():
        check_checkpoint_folder(folder)
        lora = read_lora_config(folder)
        has_lm_head = checkpoint_has_lm_head(folder)
    fms_config = from_hf_config(
        config, lora or {"lora_rank": 0, "lora_alpha": 0.0}, checkpoint_has_lm_head=has_lm_head
    )
    return {f.name: getattr(fms_config, f.name) for f in fields(GraniteSpeechConfig) if f.name not in _USER_OPTIONS}


# ---------------------------------------------------------------------------------------------- deferred registration
_REGISTRY_MODULE = "fms.models.hf.config_utils"
_pending: List[Tuple[str, str, Callable[[object], dict]]] = []  # (HF architecture, FMS architecture, param builder)


def _register_pending(module) -> None:
    while _pending:
        module._FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(*_pending.pop(0))


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `fms.models.hf.config_utils` through the other finders and wraps its loader's `exec_module`, so that
    the pending architectures are registered as soon as the module has run, before anything can read its registry.
    A post-import hook rather than a patch of FMS's `get_model`: it holds for every reader of the registry (FMS's
    `hf_configured`, `infer_model_configuration`, user code), whatever imports the module first."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_pending(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # done: later imports of the module find it in sys.modules

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance: nothing else shares it
        return spec


_finder = _RegisterAfterImport()


def register_hf_architecture(hf_architecture: str, fms_architecture: str, param_builder: Callable[[object], dict]):
    """Map `hf_architecture` (config.json's `architectures[0]`) to `fms_architecture`, its FMS kwargs built by
    `param_builder(hf_config)`, in FMS's HF config registry: now if FMS has loaded it, else on its first import."""
    _pending.append((hf_architecture, fms_architecture, param_builder))
    module = sys.modules.get(_REGISTRY_MODULE)
    if module is not None:
        _register_pending(module)
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


register_hf_architecture(HF_ARCHITECTURE, "granite_speech", build_granite_speech_params)
