"""Loading the FMS model the way an FMS user does: `fms.models.get_model("hf_pretrained")` on a checkpoint folder."""

from pathlib import Path
from typing import Union

import torch


def load_model(
    folder: Union[str, Path],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    lora_mode: str = "merged",
):
    """The FMS Granite Speech model of a local HF checkpoint folder, in eval mode."""
    import granite_speech  # noqa: F401  (registers the architecture, adapter and HF config mapping)
    from fms.models import get_model

    from granite_speech.checkpoint.files import check_checkpoint_folder

    folder = check_checkpoint_folder(folder)
    device = torch.device(device)
    model = get_model(
        "hf_pretrained",
        model_path=str(folder),
        device_type=device.type,
        data_type=dtype,
        lora_mode=lora_mode,
    )
    return model.eval()
