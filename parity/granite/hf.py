"""What differs between the transformers lines the harness serves (4.57.x hub layout, 5.x in-memory layout).

Everything version-dependent about the HF reference lives here, so tests and the CLI never branch on versions.
"""

from pathlib import Path
from typing import Union

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)


def hf_divides_logits(transformers_version: Union[str, Version]) -> bool:
    """4.x and 5.0-5.9 return lm_head(h) / logits_scaling; 5.10.1 split GraniteSpeechModel out and returns raw
    lm_head(h)."""
    return Version(str(transformers_version)) < Version("5.10")


LOGITS_DIVIDED_BY_SCALING = hf_divides_logits(TRANSFORMERS_VERSION)


def load_hf_model(folder: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The HF reference in eval mode, with the checkpoint's LoRA adapter attached (peft must be installed)."""
    from transformers import GraniteSpeechForConditionalGeneration

    return hf_from_folder(GraniteSpeechForConditionalGeneration, folder, dtype, device)


def hf_from_folder(model_class, folder: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`model_class.from_pretrained` on a checkpoint folder, its base weights and its adapter both read from that
    folder, in eval mode."""
    from granite_speech.checkpoint.files import check_checkpoint_folder

    check_checkpoint_folder(folder)  # safetensors only, on every transformers line (4.57 reads a .bin regardless)
    kwargs = {"torch_dtype": dtype} if TRANSFORMERS_VERSION.major < 5 else {"dtype": dtype}
    has_adapter = (Path(folder) / "adapter_config.json").is_file()
    if has_adapter:
        # 4.57 otherwise loads the base weights from the adapter's `base_model_name_or_path` (another folder, or a
        # hub id) and compares against a different model; 5.x keeps a local folder that has its own config.json
        kwargs["adapter_kwargs"] = {"_adapter_model_path": str(folder)}
    model = model_class.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    if has_adapter and not getattr(model, "_hf_peft_config_loaded", False):
        raise RuntimeError(f"{folder} has an adapter_config.json but transformers did not attach the adapter")
    return model.to(device).eval()


def set_hf_adapter(model, enabled: bool) -> None:
    """HF's forward() never toggles the modality LoRA (only generate() does): parity runs must set it."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        if enabled:
            raise RuntimeError("the HF reference has no LoRA adapter loaded")
        return
    from peft.tuners.lora import LoraLayer

    # per-layer toggle: works across transformers/peft versions (5.24's model-level call demands peft >= 0.22)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.enable_adapters(enabled)


def hf_audio_features(model, input_features: torch.Tensor) -> torch.Tensor:
    """Projected audio embeddings [B, tokens, D]; 4.57 returns a tensor, 5.x a ModelOutput (`pooler_output`)."""
    out = model.get_audio_features(input_features)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_encoder(model):
    return model.encoder if hasattr(model, "encoder") and not hasattr(model, "model") else model.model.encoder


def hf_logits_to_fms(hf_logits: torch.Tensor, logits_scaling: float) -> torch.Tensor:
    """FMS Granite divides by logits_scaling (as 4.57 did); 5.10.1+ HF does not."""
    return hf_logits if LOGITS_DIVIDED_BY_SCALING else hf_logits / logits_scaling


def hf_load_audio(path: Union[str, Path], sampling_rate: int = 16000, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """HF's own audio loading as a tensor (float32): transformers `load_audio` with its soundfile backend (5.23+); on
    lines whose `load_audio` has no such backend and needs librosa instead (4.57, 5.17), the recipe that backend
    documents as equal to `librosa.load` (soundfile decode, mean down-mix, soxr HQ resampling to
    ceil(n * rate / source) samples). `dtype=torch.float64`: that recipe in float64 (the samples' noise floor)."""
    import inspect
    import math

    from transformers.audio_utils import load_audio

    if dtype == torch.float32 and "backend" in inspect.signature(load_audio).parameters:
        try:
            return torch.from_numpy(load_audio(str(path), sampling_rate=sampling_rate, backend="soundfile"))
        except ValueError as err:
            if "backend" not in str(err):  # only an unknown backend falls back; a bad file stays an error
                raise
    import numpy as np
    import soundfile
    import soxr

    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    waveform, rate = soundfile.read(str(path), dtype=numpy_dtype.__name__, always_2d=True)
    waveform = waveform.T.mean(axis=0) if waveform.shape[1] > 1 else waveform[:, 0]
    if rate != sampling_rate:
        length = math.ceil(waveform.shape[-1] * sampling_rate / rate)
        waveform = soxr.resample(waveform, rate, sampling_rate, quality="soxr_hq")
        waveform = np.pad(waveform, (0, max(0, length - len(waveform))))[:length]
    return torch.from_numpy(np.ascontiguousarray(waveform, dtype=numpy_dtype))
