"""Log-mel feature extractor for Granite Speech, bit-exact with HF's `GraniteSpeechFeatureExtractor` (fp32, CPU).

audio [B, N] (zero-padded on the right) -> torchaudio MelSpectrogram -> log10 (floor 1e-10) -> per-clip dynamic range
of 8 decades below its max -> /4 + 1 -> drop an odd last frame -> stack frame pairs -> input_features [B, T, 2*n_mels].
Token counts and the mask over projector outputs come from `granite_speech.lengths`.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torchaudio

from granite_speech import lengths

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"  # HF 4.x and the Hub checkpoints
PROCESSOR_CONFIG_NAME = "processor_config.json"  # HF 5.x save_pretrained nests the extractor config in here
_NESTED_CONFIG_KEYS = ("audio_processor", "feature_extractor")

# json keys HF writes that carry no information for this extractor
_METADATA_KEYS = ("feature_extractor_type", "processor_class", "_processor_class", "return_attention_mask")


@dataclass(frozen=True)
class GraniteSpeechFeatureConfig:
    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = lengths.HOP_LENGTH
    n_mels: int = 80
    projector_window_size: int = lengths.WINDOW_SIZE
    projector_downsample_rate: int = lengths.DOWNSAMPLE_RATE

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"feature extractor {name} must be a positive int, got {value!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        lengths.tokens_per_window(self.projector_window_size, self.projector_downsample_rate)

    @property
    def melspec_kwargs(self) -> dict:
        return {
            "sample_rate": self.sampling_rate,
            "n_fft": self.n_fft,
            "win_length": self.win_length,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
        }

    @property
    def min_num_samples(self) -> int:
        return lengths.min_num_samples(self.n_fft)

    @classmethod
    def from_dict(cls, config: dict) -> "GraniteSpeechFeatureConfig":
        """Read HF's constructor kwargs or its saved json (melspec_kwargs nested or flat)."""
        config = dict(config)
        melspec = dict(config.pop("melspec_kwargs", None) or {})
        if "sample_rate" in melspec:
            melspec["sampling_rate"] = melspec.pop("sample_rate")
        values = {}
        for name in ("sampling_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            flat, nested = config.pop(name, None), melspec.pop(name, None)
            for value in (flat, nested):  # the type first: '16000' != 16000 would read as a conflict
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(f"feature extractor {name} must be a positive int, got {value!r}")
            if flat is not None and nested is not None and flat != nested:
                raise ValueError(f"feature extractor config gives {name}={flat} but melspec_kwargs gives {nested}")
            if flat is not None or nested is not None:
                values[name] = flat if flat is not None else nested
        if melspec:
            raise ValueError(
                f"unsupported melspec_kwargs {sorted(melspec)}; expected only sample_rate, n_fft, win_length, "
                "hop_length, n_mels (HF uses torchaudio defaults for everything else)"
            )
        for name in ("projector_window_size", "projector_downsample_rate"):
            if name in config:
                values[name] = config.pop(name)
        n_mels = values.get("n_mels", cls.n_mels)
        _expect(config.pop("feature_size", None), (None, n_mels), "feature_size (must equal n_mels)")
        _expect(config.pop("padding_value", None), (None, 0.0), "padding_value (clips are zero-padded)")
        _expect(config.pop("padding_side", None), (None, "right"), "padding_side (clips are padded on the right)")
        extractor_type = config.pop("feature_extractor_type", None)
        _expect(extractor_type, (None, "GraniteSpeechFeatureExtractor"), "feature_extractor_type")
        for key in _METADATA_KEYS:
            config.pop(key, None)
        if config:
            raise ValueError(f"unknown feature extractor config keys {sorted(config)}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The json HF 5.x writes for this extractor (preprocessor_config.json)."""
        return {
            "feature_extractor_type": "GraniteSpeechFeatureExtractor",
            "feature_size": self.n_mels,
            "melspec_kwargs": self.melspec_kwargs,
            "padding_side": "right",
            "padding_value": 0.0,
            "projector_downsample_rate": self.projector_downsample_rate,
            "projector_window_size": self.projector_window_size,
            "return_attention_mask": True,
            "sampling_rate": self.sampling_rate,
        }


def _expect(value: Any, allowed: tuple, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unsupported {what}: got {value!r}, expected one of {[a for a in allowed if a is not None]}")


def read_feature_config(folder: Union[str, Path]) -> dict:
    """The extractor's json from a checkpoint folder: preprocessor_config.json, else processor_config.json's entry."""
    folder = Path(folder)
    preprocessor_path = folder / PREPROCESSOR_CONFIG_NAME
    if preprocessor_path.is_file():
        return json.loads(preprocessor_path.read_text())
    processor_path = folder / PROCESSOR_CONFIG_NAME
    if processor_path.is_file():
        processor_config = json.loads(processor_path.read_text())
        for key in _NESTED_CONFIG_KEYS:
            if isinstance(processor_config.get(key), dict):
                return processor_config[key]
    raise FileNotFoundError(
        f"no feature extractor config in {folder}: expected {PREPROCESSOR_CONFIG_NAME}, or {PROCESSOR_CONFIG_NAME} "
        f"with an {' or '.join(_NESTED_CONFIG_KEYS)} entry"
    )


class GraniteSpeechFeatureExtractor:
    """Raw 16 kHz mono audio -> {input_features, input_features_mask, audio_embed_sizes}, as HF computes them.

    Accepts a 1-D clip, a collated [B, N] batch (all clips length N), or a list/tuple of clips (1-D or [1, N]), each
    as a torch tensor or numpy array of any float dtype (upcast to float32). Clips of different lengths are
    zero-padded on the right before the STFT, as HF does.
    """

    model_input_names = ["input_features"]

    def __init__(self, config: Optional[GraniteSpeechFeatureConfig] = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config if config is not None else GraniteSpeechFeatureConfig.from_dict(kwargs)
        self.mel_spectrogram = torchaudio.transforms.MelSpectrogram(**self.config.melspec_kwargs)

    @classmethod
    def from_dict(cls, config: dict) -> "GraniteSpeechFeatureExtractor":
        return cls(GraniteSpeechFeatureConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path]) -> "GraniteSpeechFeatureExtractor":
        return cls.from_dict(read_feature_config(folder))

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    def num_audio_tokens(self, num_samples: lengths.IntOrTensor) -> lengths.IntOrTensor:
        c = self.config
        return lengths.audio_tokens_from_samples(
            num_samples, c.hop_length, c.projector_window_size, c.projector_downsample_rate
        )

    def __call__(
        self, audio, sampling_rate: Optional[int] = None, device: Optional[Union[str, torch.device]] = "cpu"
    ) -> dict:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz, but this extractor expects {self.sampling_rate} Hz; "
                "resample first (e.g. torchaudio.functional.resample)"
            )
        batch, num_samples = self.collate(audio)
        audio_embed_sizes = [self.num_audio_tokens(n) for n in num_samples]
        return {
            "input_features": self.extract(batch, device=device),
            # built on CPU like HF's, whatever `device` is
            "input_features_mask": lengths.input_features_mask(audio_embed_sizes),
            "audio_embed_sizes": audio_embed_sizes,
        }

    def collate(self, audio) -> tuple[torch.Tensor, list[int]]:
        """Validate the input and return (float32 [B, max N] zero-padded batch, per-clip sample counts)."""
        if isinstance(audio, (np.ndarray, torch.Tensor)):
            tensor = _to_float_tensor(audio, "audio")
            if tensor.ndim == 1:
                tensor = tensor.unsqueeze(0)
            elif tensor.ndim != 2:
                raise ValueError(
                    f"audio tensor has shape {list(tensor.shape)}; expected a mono clip [N] or a collated batch of "
                    "mono clips [B, N] (multi-channel audio must be mixed down first)"
                )
            clips = list(tensor)
            collated = True
        elif isinstance(audio, (list, tuple)):
            if len(audio) == 0:
                raise ValueError("audio is an empty list; expected one or more clips")
            clips = [_mono_clip(clip, i) for i, clip in enumerate(audio)]
            collated = False
        else:
            raise TypeError(
                f"audio of type {type(audio).__name__} is not supported; expected a torch.Tensor or numpy array "
                "(1-D clip or [B, N] batch), or a list of them"
            )
        for i, clip in enumerate(clips):
            _check_clip(clip, i, self.config.min_num_samples)
        num_samples = [clip.shape[-1] for clip in clips]
        if collated:
            return torch.stack(clips), num_samples
        return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True, padding_value=0.0), num_samples

    @torch.no_grad()
    def extract(self, batch: torch.Tensor, device: Optional[Union[str, torch.device]] = "cpu") -> torch.Tensor:
        """float32 [B, N] -> input_features [B, T, 2*n_mels] (same op sequence as HF, for bit-exactness)."""
        if device is not None:
            self.mel_spectrogram = self.mel_spectrogram.to(device)
            batch = batch.to(device)
        mel = self.mel_spectrogram(batch.float())  # [B, n_mels, F]
        logmel = mel.transpose(-1, -2).clip(min=1e-10).log10()
        # dynamic range: floor each clip at 8 decades below its own max, then map to about [-1, 1]
        clip_max = logmel.amax(dim=(-2, -1), keepdim=True)
        logmel = torch.maximum(logmel, clip_max - 8.0).div(4).add(1)
        num_frames = lengths.encoder_frames(logmel.shape[1])
        logmel = logmel[:, : num_frames * lengths.FRAME_STACK]
        return logmel.reshape(logmel.shape[0], num_frames, lengths.FRAME_STACK * logmel.shape[-1])


def _to_float_tensor(audio, what: str) -> torch.Tensor:
    if isinstance(audio, np.ndarray):
        if not (np.issubdtype(audio.dtype, np.floating)):
            raise ValueError(
                f"{what} has numpy dtype {audio.dtype}; expected floating point samples in [-1, 1] "
                "(scale integer PCM first, e.g. int16 / 32768)"
            )
        try:
            audio = torch.from_numpy(np.ascontiguousarray(audio))
        except TypeError as err:  # e.g. float128, which torch has no dtype for
            raise TypeError(f"{what} has numpy dtype {audio.dtype}, which torch cannot hold; use float32") from err
    if not torch.is_floating_point(audio):
        raise ValueError(
            f"{what} has dtype {audio.dtype}; expected floating point samples in [-1, 1] "
            "(scale integer PCM first, e.g. int16 / 32768)"
        )
    return audio.float()


def _mono_clip(clip, index: int) -> torch.Tensor:
    what = f"audio[{index}]"
    if not isinstance(clip, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{what} is a {type(clip).__name__}; expected a torch.Tensor or numpy array per clip "
            "(wrap python floats with torch.tensor(...))"
        )
    clip = _to_float_tensor(clip, what)
    if clip.ndim == 2 and clip.shape[0] == 1:
        clip = clip[0]
    if clip.ndim != 1:
        raise ValueError(
            f"{what} has shape {list(clip.shape)}; expected one mono clip, [N] or [1, N] "
            "(mix multi-channel audio down to mono first)"
        )
    return clip


def _check_clip(clip: torch.Tensor, index: int, min_num_samples: int) -> None:
    if clip.shape[-1] < min_num_samples:
        raise ValueError(
            f"audio[{index}] has {clip.shape[-1]} samples; expected at least {min_num_samples} "
            f"(the centered STFT reflect-pads {min_num_samples - 1} samples on each side)"
        )
    if not bool(torch.isfinite(clip).all()):
        bad = int((~torch.isfinite(clip)).sum())
        raise ValueError(f"audio[{index}] contains {bad} NaN/Inf samples; expected finite samples")
