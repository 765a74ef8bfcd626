"""Reading HF Granite Speech checkpoints into FMS: folder checks (`files`), the key-layout map (`layout`), the
registered adapter steps (`adapter`), the weight-coverage audit (`coverage`), the HF architecture registry
(`hf_registry`) and `load_model` (`loading`)."""

from granite_speech.checkpoint.config_audit import UnauditedConfigWarning, UnsupportedConfigError
from granite_speech.checkpoint.coverage import CheckpointCoverageError
from granite_speech.checkpoint.files import check_checkpoint_folder
from granite_speech.checkpoint.loading import load_model

__all__ = ["CheckpointCoverageError", "UnauditedConfigWarning", "UnsupportedConfigError", "check_checkpoint_folder",
           "load_model"]
