"""Loading the FMS model the way an FMS user does: `fms.models.get_model("hf_pretrained")` on a checkpoint folder."""

from pathlib import Path
from typing import Optional, Union

import torch


def load_model(
    folder: Union[str, Path],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    lora_mode: str = "merged",
    distributed_strategy: Optional[str] = None,
    group=None,
):
    """The FMS Granite Speech model of a local HF checkpoint folder, in eval mode. `distributed_strategy="tp"`
    (FMS's default once a process group of several ranks exists) shards the decoder over `group`'s ranks."""
    from granite_speech import model as _model  # noqa: F401  (registers the architecture)
    from granite_speech.checkpoint import adapter as _adapter, hf_registry as _registry  # noqa: F401  (and its loading)
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
        distributed_strategy=distributed_strategy,
        group=group,
    )
    return model.eval()
