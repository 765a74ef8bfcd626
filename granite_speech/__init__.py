"""IBM Granite Speech native in IBM Foundation Model Stack.

Importing this package registers the `granite_speech` architecture (variants `tiny`, `2b`, `8b`, `4.0-1b`, `4.1-2b`),
`granite_speech_plus` (`4.1-2b-plus`) and `granite_speech5` (`5.0-470m`, CTC only) with
`fms.models`, its `hf` checkpoint adapter with `fms.utils.serialization`, and the HF architecture
`GraniteSpeechForConditionalGeneration` with FMS's HF config registry, so that both
`get_model("hf_pretrained", model_path=DIR)` and `get_model("granite_speech", "2b", model_path=DIR, source="hf")` work.
The HF registrations wait for FMS's first import of its HF registry (`checkpoint.hf_registry`): importing this package
imports neither `fms.models.hf` nor transformers' modeling code.
"""

from granite_speech.torch_pair import check_torch_pair

check_torch_pair()  # before anything loads torchaudio (transformers does, once FMS's HF registry loads)

from granite_speech.config import (  # noqa: E402
    ConformerConfig,
    GraniteSpeechConfig,
    QFormerProjectorConfig,
    from_hf_config,
    from_pretrained_folder,
)
from granite_speech.model import GraniteSpeech
from granite_speech.checkpoint import adapter as _adapter  # noqa: F401  (registers the checkpoint adapter)
from granite_speech.checkpoint import hf_registry as _hf_registry  # noqa: F401  (registers the HF architecture)
from granite_speech.checkpoint import load_model
from granite_speech import family as _family  # noqa: F401  (4.0-1b / 4.1-2b variants of the 3.3 classes)
from granite_speech import plus as _plus  # noqa: F401  (granite_speech_plus: 4.1-2b-plus)
from granite_speech import ctc5 as _ctc5  # noqa: F401  (granite_speech5: 5.0-470m, CTC only)

__all__ = [
    "ConformerConfig",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "QFormerProjectorConfig",
    "from_hf_config",
    "from_pretrained_folder",
    "load_model",
]
