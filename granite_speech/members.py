"""Which family member a checkpoint folder holds, and its config checked the way loading will check it (nothing
loaded). Kept apart from `family`, `plus` and `ctc5` because it dispatches to all of them (they import `family`)."""

import json
from pathlib import Path
from typing import Union

MEMBER_ARCHITECTURES = {
    "granite_speech": "granite_speech",  # 3.3, 4.0-1b, 4.1-2b
    "granite_speech_plus": "granite_speech_plus",  # 4.1-2b-plus
    "granite_speech5_ctc": "granite_speech5",  # 5.0-470m (CTC only)
}


def member_of_folder(folder: Union[str, Path]) -> str:
    """config.json's model_type of a checkpoint folder (one of MEMBER_ARCHITECTURES), or a ValueError."""
    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as JSON: {err}") from err
    if model_type not in MEMBER_ARCHITECTURES:
        raise ValueError(
            f"{path}: model_type={model_type!r} is not a Granite Speech family member; supported: "
            f"{sorted(MEMBER_ARCHITECTURES)}"
        )
    return model_type


def check_member_config(folder: Union[str, Path]):
    """Parse and check a folder's config.json (and adapter_config.json) the way loading will, nothing loaded: the
    FMS config of its member. The 3.3 classes: `config.from_pretrained_folder`; plus: the 3.3 checks on the config
    inside plus, then the concatenation width; 5.0: `ctc5.from_hf_config`."""
    from granite_speech.config import from_pretrained_folder

    folder = Path(folder)
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        data = None
    member = data.get("model_type") if isinstance(data, dict) else None
    if member not in ("granite_speech_plus", "granite_speech5_ctc"):
        return from_pretrained_folder(folder)  # 3.3 classes; its errors for anything else (unreadable, other types)
    if member == "granite_speech5_ctc":
        from granite_speech import ctc5

        return ctc5.from_hf_config(data)
    import transformers

    from granite_speech import plus

    HFPlusConfig = getattr(transformers, "GraniteSpeechPlusConfig", None)
    if HFPlusConfig is None:  # the 4.57 line: the member's config cannot even be read
        raise ValueError(f"{folder / 'config.json'} is a granite_speech_plus checkpoint (4.1-plus), which transformers "
                         f"{transformers.__version__} does not know; expected transformers >= 5.x for this member")

    hf_config = HFPlusConfig.from_dict(data)
    hf_config._name_or_path = str(folder)
    return plus.GraniteSpeechPlusConfig(**plus.build_granite_speech_plus_params(hf_config))
