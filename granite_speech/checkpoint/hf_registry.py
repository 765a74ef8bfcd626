"""Maps the HF architecture `GraniteSpeechForConditionalGeneration` to FMS's `granite_speech` so that
`get_model("hf_pretrained", model_path=DIR)` builds the model from any valid HF config.json.

The config-coverage audit (`config_audit`) runs inside `from_hf_config` / `read_lora_config`, i.e. here, before FMS
reads a single weight: an unsupported field stops the load with an error naming it.
"""

from dataclasses import fields
from pathlib import Path

from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

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


_FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(HF_ARCHITECTURE, "granite_speech", build_granite_speech_params)
