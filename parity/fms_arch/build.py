"""Both sides of one architecture: HF built from a config with seeded weights and saved (safetensors), FMS loaded
from that folder through its own HF path (`infer_model_configuration` + `get_model(..., source="hf")`)."""

import logging
from pathlib import Path
from typing import Tuple, Union

import torch

from parity.fms_arch.configs import Arch, seed_weights


def build_hf(arch: Arch, config, folder: Union[str, Path], seed: int) -> torch.nn.Module:
    """The HF model of `config` with the seeded weights of `seed_weights`, saved to `folder` with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch.hf_class)(config).eval()
    seed_weights(model, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def load_hf(arch: Arch, folder: Union[str, Path], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    return getattr(transformers, arch.hf_class).from_pretrained(str(folder), dtype=dtype).eval()


def fms_kwargs(folder: Union[str, Path]) -> dict:
    """What FMS's own HF loader (`as_fms_model`) passes to get_model for this folder: architecture, variant, config."""
    from fms.models.hf.utils import infer_model_configuration

    return infer_model_configuration(str(folder), download_weights=False)


def load_fms(arch: Arch, folder: Union[str, Path], dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> Tuple[torch.nn.Module, dict]:
    """FMS's model of `folder` through `get_model(architecture, variant, model_path=folder, source="hf")`."""
    from fms.models import get_model

    kwargs = fms_kwargs(folder)
    if kwargs.get("architecture") != arch.name:
        raise ValueError(f"FMS maps the checkpoint to {kwargs.get('architecture')!r}, not {arch.name!r}")
    previous = logging.getLogger("fms").level
    kwargs = {**kwargs, "model_path": str(folder)}
    model = get_model(source="hf", device_type=device, data_type=dtype, **kwargs)
    logging.getLogger("fms").setLevel(previous)
    return model.eval(), kwargs
