"""Maps the HF architecture `GraniteSpeechForConditionalGeneration` to FMS's `granite_speech` so that
`get_model("hf_pretrained", model_path=DIR)` builds the model from any valid HF config.json."""

from pathlib import Path

from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY

from granite_speech.checkpoint.files import check_checkpoint_folder
from granite_speech.config import from_hf_config, read_lora_config

HF_ARCHITECTURE = "GraniteSpeechForConditionalGeneration"


def build_granite_speech_params(config) -> dict:
    """FMS kwargs for an HF GraniteSpeechConfig; the adapter settings come from the checkpoint folder's
    adapter_config.json (rank 0 when the folder has none)."""
    folder = Path(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or ".")
    lora = read_lora_config(check_checkpoint_folder(folder)) if folder.is_dir() else {}
    fms_config = from_hf_config(config, lora or {"lora_rank": 0, "lora_alpha": 0.0})
    return {
        "encoder_config": fms_config.encoder_config,
        "projector_config": fms_config.projector_config,
        "text_config": fms_config.text_config,
        "audio_token_index": fms_config.audio_token_index,
        "lora_rank": fms_config.lora_rank,
        "lora_alpha": fms_config.lora_alpha,
        "lora_target_modules": fms_config.lora_target_modules,
    }


_FMS_MODEL_CONFIG_REGISTRY.register_model_arch_info(HF_ARCHITECTURE, "granite_speech", build_granite_speech_params)
