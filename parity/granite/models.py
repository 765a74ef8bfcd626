"""The models of a `compare` run and the memory they need.

`Models` holds the loaded models (loaded once, shared by the cases); the loaders and metadata of each family member
(`member_of`, `load_hf_family_model`, `load_fms_family_model`, `regime_of`); and the memory planning of the float64
work (`shortfall`, `Models.float64_room`, `audio_path_float64`): HF's float64 copy for the noise floors and FMS's
audio path in float64 for the formula check.
"""

import contextlib
import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from parity.capture import available_bytes, checkpoint_param_bytes, free_memory
from parity.granite.hf import hf_from_folder, load_hf_model, set_hf_adapter
from parity.granite.probes_family import CTC5, PLUS, SPEECH


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` lives on `device` ("cuda" means the current card: tensors say "cuda:0", and the two devices
    do not compare equal)."""
    if tensor.device.type != device.type:
        return False
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return index is None or tensor.device.index in (index, None)


@dataclass
class Models:
    """The loaded models of a run (loaded once, shared by the cases); `dtype` is the one in use (`at(dtype)`)."""

    checkpoint: Path
    dtype: torch.dtype
    device: torch.device
    hf: Dict[torch.dtype, Any] = field(default_factory=dict)
    hf64_source: Dict[str, torch.dtype] = field(default_factory=dict)  # {"dtype": the one HF's fp64 copy came from}
    fms: Dict[Tuple[torch.dtype, str], Any] = field(default_factory=dict)  # (dtype, lora_mode) -> model
    hf_processor: Any = None
    fms_processor: Any = None
    fast_encoder: str = "eager"  # StaticGenerator(encoder=) of the fast path's generation section
    fast_gemv: str = "cublas"  # StaticGenerator(gemv=) of the same loop

    def at(self, dtype: torch.dtype) -> "Models":
        """The same store, working in `dtype` (models are shared, not copied)."""
        view = copy.copy(self)
        view.dtype = dtype
        return view

    @property
    def member(self) -> str:
        """The checkpoint's HF model_type (granite_speech, granite_speech_plus, granite_speech5_ctc)."""
        return member_of(self.checkpoint)

    def fms_model(self, lora_mode: str):
        if (self.dtype, lora_mode) not in self.fms:
            self.fms[self.dtype, lora_mode] = load_fms_family_model(self.checkpoint, self.dtype, self.device,
                                                                   lora_mode=lora_mode)
        return self.fms[self.dtype, lora_mode]

    def reference(self):
        if self.dtype not in self.hf:
            self.hf[self.dtype] = load_hf_family_model(self.checkpoint, self.dtype, str(self.device))
        return self.hf[self.dtype]

    def reference64(self):
        """HF in float64 made from the working dtype's model: a 16-bit case's floors then hold the same rounded
        weights both sides run, so they measure rounding in the activations only. One such copy at a time."""
        if self.hf64_source.get("dtype") != self.dtype:
            self.hf.pop(torch.float64, None)
            free_memory()
            self.hf[torch.float64] = copy.deepcopy(self.reference()).to(self.device, torch.float64)
            self.hf64_source["dtype"] = self.dtype
        return self.hf[torch.float64].to(self.device)

    def keep_only(self, fms_keys: set, hf_dtypes: set) -> None:
        """Free the working models outside `fms_keys` / `hf_dtypes` (HF's float64 copy stays): the models no later
        case uses, so that a 2b run's bf16 case finds room for its float64 copies without parking."""
        dropped = [k for k in self.fms if k not in fms_keys] + [d for d in self.hf
                                                               if d != torch.float64 and d not in hf_dtypes]
        for key in dropped:
            (self.fms if isinstance(key, tuple) else self.hf).pop(key)
        if dropped:
            free_memory()

    def working_models(self) -> list:
        """The loaded models of the working dtypes (every one but HF's float64 copy)."""
        return [model for dtype, model in self.hf.items() if dtype != torch.float64] + list(self.fms.values())

    def device_bytes(self, models: Optional[list] = None) -> int:
        """What `models` (the working models by default) hold on the run device."""
        return sum(t.numel() * t.element_size()
                   for model in (self.working_models() if models is None else models)
                   for t in itertools.chain(model.parameters(), model.buffers()) if on_device(t, self.device))

    def float64_bytes(self) -> int:
        """What the float64 work holds at once: HF's float64 copy (the floors) and FMS's audio path in float64 (the
        formula check, `audio_path_float64`). Counted on the loaded models, else (a run against saved references,
        where HF is never loaded) on the checkpoint's headers with FMS's copy as large as HF's."""
        fms = self.fms.get((self.dtype, "merged"))
        audio = value_count(fms) - value_count(*decoder_blocks(fms)) if fms is not None else self.values()
        return 8 * (self.values() + audio)

    def values(self) -> int:
        """How many values the model holds: counted on the loaded HF model, else (a run against saved references,
        where HF is never loaded) on the checkpoint's safetensors headers."""
        loaded = self.hf.get(self.dtype)
        return value_count(loaded) if loaded is not None else checkpoint_param_bytes(self.checkpoint, torch.uint8)

    @contextlib.contextmanager
    def float64_room(self):
        """Room on a GPU for the float64 copies: where they would not fit beside the working models, the fewest of
        those (other dtypes' first, then the largest) wait in host memory meanwhile and come back after. Where they
        fit, HF's copy stays on the card for the whole run, made once per working dtype; else it waits in host
        memory between uses too."""
        if self.device.type != "cuda":
            yield
            return
        need, parked = self.float64_bytes(), []
        waiting = sorted((m for m in self.working_models() if self.device_bytes([m])),
                         key=lambda m: (self.dtype in {p.dtype for p in m.parameters()}, -self.device_bytes([m])))
        for model in waiting:
            if not shortfall(self, need):
                break
            parked.append((model, self.device_bytes([model])))
            model.to("cpu")
            free_memory()
        try:
            yield
        finally:
            hf64 = self.hf.get(torch.float64)
            if parked and hf64 is not None and shortfall(self, sum(size for _, size in parked), reuse=False):
                hf64.to("cpu")
                free_memory()
            for model, _ in parked:
                model.to(self.device)

    def processors(self):
        if self.hf_processor is None:
            from transformers import AutoProcessor

            self.hf_processor = AutoProcessor.from_pretrained(str(self.checkpoint))
            if self.member == CTC5:
                from granite_speech.features5 import GraniteSpeech5Processor

                self.fms_processor = GraniteSpeech5Processor.from_pretrained(self.checkpoint)
            else:
                from granite_speech.processor import GraniteSpeechProcessor

                self.fms_processor = GraniteSpeechProcessor.from_pretrained(self.checkpoint)
        return self.hf_processor, self.fms_processor


# ---------------------------------------------------------------------------------------------------------------
# family members


def read_config(checkpoint: Union[str, Path]) -> dict:
    import json

    return json.loads((Path(checkpoint) / "config.json").read_text())


def member_of(checkpoint: Union[str, Path]) -> str:
    """The HF model_type of a checkpoint folder; a ValueError for one outside the family."""
    model_type = read_config(checkpoint).get("model_type")
    if model_type not in (SPEECH, PLUS, CTC5):
        raise ValueError(f"{checkpoint} is model_type {model_type!r}, not a Granite Speech family member "
                         f"({SPEECH}, {PLUS}, {CTC5})")
    return model_type


_HF_CLASSES = {SPEECH: "GraniteSpeechForConditionalGeneration", PLUS: "GraniteSpeechPlusForConditionalGeneration",
               CTC5: "GraniteSpeech5ForCTC"}


def load_hf_family_model(folder: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The HF reference of any family member in eval mode (3.3: `load_hf_model`, with its adapter checks)."""
    member = member_of(folder)
    if member == SPEECH:
        return load_hf_model(folder, dtype, device)
    import transformers

    klass = getattr(transformers, _HF_CLASSES[member], None)
    if klass is None:
        raise ImportError(f"transformers {transformers.__version__} has no {_HF_CLASSES[member]}")
    return hf_from_folder(klass, folder, dtype, device)


def load_fms_family_model(folder: Union[str, Path], dtype: torch.dtype, device: Union[str, torch.device],
                          lora_mode: str = "merged"):
    """The FMS model of any family member, through `get_model("hf_pretrained")` (5.0 has no LoRA mode)."""
    if member_of(folder) == CTC5:
        import granite_speech  # noqa: F401  (registers the family)
        from fms.models import get_model

        from granite_speech.checkpoint.files import check_checkpoint_folder

        folder = check_checkpoint_folder(folder)
        device = torch.device(device)
        return get_model("hf_pretrained", model_path=str(folder), device_type=device.type,
                         data_type=dtype).to(device).eval()
    from granite_speech.checkpoint import load_model

    return load_model(folder, dtype, device, lora_mode=lora_mode)


def set_adapter(model, enabled: bool) -> None:
    """HF's modality LoRA on exactly when audio is given -- where the checkpoint has one (a merged-LoRA checkpoint
    has none to switch: its LoRA is in the weights)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        set_hf_adapter(model, enabled)


def regime_of(checkpoint: Union[str, Path], lora_mode: str = "merged") -> dict:
    from granite_speech.family import lora_regime

    return lora_regime(checkpoint, lora_mode)


def member_metadata(checkpoint: Union[str, Path]) -> dict:
    """The report header's family entries: which member (HF model_type and class, FMS architecture) and which
    LoRA regime ran (`granite_speech.family.lora_regime`; the 5.0 CTC model has none)."""
    member = member_of(checkpoint)
    fms_architecture = {SPEECH: "granite_speech", PLUS: "granite_speech_plus", CTC5: "granite_speech5"}[member]
    out = {"model_type": member, "hf_class": _HF_CLASSES[member], "fms_architecture": fms_architecture}
    regime = regime_of(checkpoint)
    out["lora_regime"] = regime["regime"]
    out["lora_regime_detail"] = regime["detail"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# memory planning: what fits on the run device, and the float64 copies


def shortfall(models: Models, need: int, parked: bool = False, reuse: bool = True) -> Optional[str]:
    """None when `need` more bytes fit on the run device (with 25% headroom), else what they need and what is free.
    `reuse`: HF's float64 copy already made counts as free (the float64 work reuses or replaces it, never holds it
    twice). `parked`: with the working models moved to host memory first (`Models.float64_room`), on a GPU."""
    free = available_bytes(models.device)
    if free is not None and models.device.type == "cuda":
        free += models.device_bytes([models.hf[torch.float64]]) if reuse and torch.float64 in models.hf else 0
        free += models.device_bytes() if parked else 0
    if free is not None and need * 1.25 > free:
        return f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free" + (" with the working models parked in "
                                                                          "host memory" if parked else "")
    return None


def value_count(*modules: torch.nn.Module) -> int:
    """How many values the parameters and buffers of `modules` hold."""
    return sum(t.numel() for module in modules for t in itertools.chain(module.parameters(), module.buffers()))


def decoder_blocks(model: torch.nn.Module) -> Tuple[torch.nn.Module, ...]:
    """The decoder blocks of an FMS family model (none for the CTC member): FMS's `Granite.base_model.layers`."""
    layers = getattr(getattr(getattr(model, "language_model", None), "base_model", None), "layers", None)
    return (layers,) if layers is not None else ()


def audio_path_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of an FMS model without its decoder blocks, for the formula check: it compares the audio path
    and the merged embeddings only, and the blocks hold most of an LLM member's weights (2b: 23 GB less in float64).
    The weights are the working float32 model's, upcast exactly as HF's float64 copy is upcast from HF's; the audio
    path holds no LoRA, so the merge's rounding is not in it."""
    blocks = decoder_blocks(model)
    if not blocks:
        return copy.deepcopy(model).to(torch.float64)
    base = model.language_model.base_model
    base.layers = torch.nn.ModuleList().eval()
    try:
        return copy.deepcopy(model).to(torch.float64)
    finally:
        base.layers = blocks[0]


def inputs_in_float64(inputs: dict) -> dict:
    return {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in inputs.items()}


def floors_wanted(floors: str, models: Models) -> Tuple[bool, str, Optional[str]]:
    """(measure the floors?, why, the cause when they are not measured: a `parity.verdict.CAUSES` entry)."""
    if floors == "off":
        return False, "noise floors off (--floors off)", "floors off"
    if floors == "on":
        return True, "HF in float64 (requested)", None
    short = shortfall(models, models.float64_bytes(), parked=True)
    if short:
        return False, f"noise floors not run: an fp64 copy {short}", "memory"
    return True, "HF in float64", None
