"""Feature extractor and processor of Granite Speech 5.0, equal to HF's `GraniteSpeech5FeatureExtractor` (fp32, CPU).

audio [B, N] (zero-padded on the right to the batch length) -> right-pad the waveform so the mel frame count is even
-> torchaudio MelSpectrogram (80 mels, Hann 400 in a 512 FFT, hop 160, centered) sliced to 2 * ceil((N // hop) / 2)
frames -> log10 (floor 1e-10) -> per-clip floor 8 decades below its max -> /4 + 1 -> deltas over 3 frames
(torchaudio compute_deltas) appended on the mel axis -> stack frame pairs -> input_features [B, T, 4 * n_mels].
The attention mask marks ceil((n_samples // hop) / 2) frames of each clip valid.

What differs from the 3.3 extractor (`granite_speech.features`): deltas (160 -> 320 features), an odd mel frame is
kept (the waveform is padded to fill the pair) instead of dropped, the STFT's extra centered frame is dropped for an
even count, the mask is over encoder input frames (not projector outputs), and there is no prompt to expand: the
processor only pairs the extractor with the tokenizer for CTC decoding.
"""

import json
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torchaudio

from granite_speech.features import PREPROCESSOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME

FEATURE_EXTRACTOR_TYPE = "GraniteSpeech5FeatureExtractor"
DELTA_EXPANSION = 2  # every mel frame is concatenated with its delta
FRAME_STACKING = 2  # pairs of consecutive frames are stacked

# json keys HF writes that carry no information for this extractor
_METADATA_KEYS = ("feature_extractor_type", "processor_class", "_processor_class", "return_attention_mask")


@dataclass(frozen=True)
class GraniteSpeech5FeatureConfig:
    num_mel_bins: int = 80
    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    delta_win_length: int = 3
    logmel_floor_db: float = 8.0  # decades of dynamic range kept below each clip's maximum (log10 units)
    padding_value: float = 0.0

    def __post_init__(self):
        for name in ("num_mel_bins", "sampling_rate", "n_fft", "win_length", "hop_length", "delta_win_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"feature extractor {name} must be a positive int, got {value!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        if self.delta_win_length < 3:
            raise ValueError(f"delta_win_length must be >= 3 (torchaudio compute_deltas), got {self.delta_win_length}")

    @property
    def feature_size(self) -> int:
        return self.num_mel_bins * DELTA_EXPANSION * FRAME_STACKING

    @property
    def min_num_samples(self) -> int:
        """Shortest batch the centered STFT accepts: reflect padding of n_fft // 2 needs more samples than that."""
        return self.n_fft // 2 + 1

    @classmethod
    def from_dict(cls, config: dict) -> "GraniteSpeech5FeatureConfig":
        """Read HF's constructor kwargs or its saved json."""
        config = dict(config)
        extractor_type = config.pop("feature_extractor_type", None)
        if extractor_type not in (None, FEATURE_EXTRACTOR_TYPE):
            raise ValueError(f"feature_extractor_type {extractor_type!r} is not {FEATURE_EXTRACTOR_TYPE}")
        values = {name: config.pop(name) for name in cls.__dataclass_fields__ if name in config}
        num_mel_bins = values.get("num_mel_bins", cls.num_mel_bins)
        feature_size = config.pop("feature_size", None)
        if feature_size not in (None, num_mel_bins * DELTA_EXPANSION * FRAME_STACKING):
            raise ValueError(
                f"feature_size {feature_size} != num_mel_bins {num_mel_bins} x {DELTA_EXPANSION * FRAME_STACKING}"
            )
        padding_side = config.pop("padding_side", None)
        if padding_side not in (None, "right"):
            raise ValueError(f"unsupported padding_side {padding_side!r}: clips are padded on the right")
        for key in _METADATA_KEYS:
            config.pop(key, None)
        if config:
            raise ValueError(f"unknown feature extractor config keys {sorted(config)}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The json HF writes for this extractor (preprocessor_config.json)."""
        return {
            "feature_extractor_type": FEATURE_EXTRACTOR_TYPE,
            "feature_size": self.feature_size,
            "padding_side": "right",
            "return_attention_mask": True,
            **asdict(self),
        }


def read_feature_config(folder: Union[str, Path]) -> dict:
    """The extractor's json from a checkpoint folder: preprocessor_config.json, else processor_config.json's entry."""
    folder = Path(folder)
    if (folder / PREPROCESSOR_CONFIG_NAME).is_file():
        return json.loads((folder / PREPROCESSOR_CONFIG_NAME).read_text())
    if (folder / PROCESSOR_CONFIG_NAME).is_file():
        nested = json.loads((folder / PROCESSOR_CONFIG_NAME).read_text()).get("feature_extractor")
        if isinstance(nested, dict):
            return nested
    raise FileNotFoundError(
        f"no feature extractor config in {folder}: expected {PREPROCESSOR_CONFIG_NAME}, or {PROCESSOR_CONFIG_NAME} "
        "with a feature_extractor entry"
    )


class GraniteSpeech5FeatureExtractor:
    """Raw 16 kHz audio -> {input_features [B, T, 4*n_mels] float32, attention_mask [B, T] int64}, as HF computes them.

    Accepts a 1-D clip, a batch [B, N] (or [B, N, channels]), or a list/tuple of clips, each a torch tensor or numpy
    array of floats; a clip with a trailing channel axis is averaged to mono (HF does the same, with a warning).
    Integer PCM is refused (HF would take int16 samples as floats 32768x too loud)."""

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, config: Optional[GraniteSpeech5FeatureConfig] = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config if config is not None else GraniteSpeech5FeatureConfig.from_dict(kwargs)
        c = self.config
        self.mel_spectrogram = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sampling_rate, n_fft=c.n_fft, win_length=c.win_length, hop_length=c.hop_length,
            n_mels=c.num_mel_bins,
        )

    @classmethod
    def from_dict(cls, config: dict) -> "GraniteSpeech5FeatureExtractor":
        return cls(GraniteSpeech5FeatureConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path]) -> "GraniteSpeech5FeatureExtractor":
        return cls.from_dict(read_feature_config(folder))

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    def num_frames(self, num_samples: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """Valid encoder input frames of a clip of `num_samples`: ceil((num_samples // hop) / FRAME_STACKING)."""
        mel = num_samples // self.config.hop_length
        return -(-mel // FRAME_STACKING)

    def __call__(
        self,
        audio,
        sampling_rate: Optional[int] = None,
        padding: Union[bool, str] = "longest",
        max_length: Optional[int] = None,
        truncation: bool = False,
        pad_to_multiple_of: Optional[int] = None,
        return_attention_mask: bool = True,
        device: Optional[Union[str, torch.device]] = "cpu",
    ) -> dict:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz, but this extractor expects {self.sampling_rate} Hz; "
                "resample first (e.g. torchaudio.functional.resample)"
            )
        clips = self.mono_clips(audio)
        batch, lengths = self.pad(clips, padding, max_length, truncation, pad_to_multiple_of)
        features = self.extract(batch, device=device)
        out = {"input_features": features}
        if return_attention_mask:
            counts = torch.tensor([self.num_frames(n) for n in lengths], device=features.device)
            mask = torch.arange(features.shape[1], device=features.device)[None, :] < counts[:, None]
            out["attention_mask"] = mask.long()
        return out

    def mono_clips(self, audio) -> List[torch.Tensor]:
        """Any accepted input -> a list of 1-D float32 clips (HF `_as_mono_clips`, with type checks)."""
        if isinstance(audio, (np.ndarray, torch.Tensor)):
            clips = list(audio) if audio.ndim > 1 else [audio]
        elif isinstance(audio, (list, tuple)):
            if len(audio) == 0:
                raise ValueError("audio is an empty list; expected one or more clips")
            clips = list(audio)
        else:
            raise TypeError(
                f"audio of type {type(audio).__name__} is not supported; expected a torch.Tensor or numpy array "
                "(1-D clip or [B, N] batch), or a list of them"
            )
        out = []
        for index, clip in enumerate(clips):
            what = f"audio[{index}]"
            if isinstance(clip, np.ndarray):
                if not np.issubdtype(clip.dtype, np.floating):
                    raise ValueError(f"{what} has numpy dtype {clip.dtype}; expected float samples in [-1, 1]")
                clip = torch.from_numpy(np.require(clip, requirements=["W"]))
            elif not isinstance(clip, torch.Tensor):
                raise TypeError(f"{what} is a {type(clip).__name__}; expected a torch.Tensor or numpy array per clip")
            if not torch.is_floating_point(clip):
                raise ValueError(f"{what} has dtype {clip.dtype}; expected float samples in [-1, 1]")
            if clip.ndim > 1:
                clip = clip.mean(-1)  # channels last, as HF
            if clip.ndim != 1:
                raise ValueError(f"{what} has shape {list(clip.shape)}; expected [N] or [N, channels]")
            if not bool(torch.isfinite(clip).all()):
                raise ValueError(f"{what} contains NaN/Inf samples")
            out.append(clip.to(torch.float32))
        return out

    def pad(
        self,
        clips: Sequence[torch.Tensor],
        padding: Union[bool, str] = "longest",
        max_length: Optional[int] = None,
        truncation: bool = False,
        pad_to_multiple_of: Optional[int] = None,
    ) -> tuple:
        """(float32 [B, target] batch padded with padding_value, per-clip lengths after truncation): HF `_pad_clips`."""
        lengths = [int(clip.shape[0]) for clip in clips]
        if padding is True or padding == "longest":
            strategy = "longest"
        elif padding is False or padding == "do_not_pad":
            strategy = "do_not_pad"
        elif padding == "max_length":
            strategy = "max_length"
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
        else:
            raise ValueError(f"padding must be True/'longest', False/'do_not_pad' or 'max_length', got {padding!r}")
        if truncation and max_length is not None:
            lengths = [min(n, max_length) for n in lengths]
        if strategy == "max_length":
            target = max_length
        else:
            target = max(lengths)
            if strategy == "do_not_pad" and min(lengths) != target:
                raise ValueError("clips of different lengths need padding ('longest' or 'max_length')")
        if pad_to_multiple_of is not None:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if max(lengths) > target:
            raise ValueError(
                f"a clip of {max(lengths)} samples does not fit the batch length {target}; pass truncation=True or a "
                "larger max_length"
            )
        if target < self.config.min_num_samples:
            raise ValueError(
                f"the batch is {target} samples long; expected at least {self.config.min_num_samples} (the centered "
                f"STFT reflect-pads {self.config.n_fft // 2} samples on each side)"
            )
        batch = torch.full((len(clips), target), float(self.config.padding_value), dtype=torch.float32)
        for row, (clip, n) in enumerate(zip(clips, lengths, strict=True)):
            batch[row, :n] = clip[:n].detach().cpu()
        return batch, lengths

    @torch.no_grad()
    def extract(self, batch: torch.Tensor, device: Optional[Union[str, torch.device]] = "cpu") -> torch.Tensor:
        """float32 [B, N] -> input_features [B, T, 4 * n_mels] (same op sequence as HF, for bit-exactness)."""
        if device is not None:
            self.mel_spectrogram = self.mel_spectrogram.to(device)
            batch = batch.to(device)
        hop = self.config.hop_length
        mel_frames = batch.shape[1] // hop
        num_frames = FRAME_STACKING * -(-mel_frames // FRAME_STACKING)
        needed = (num_frames - 1) * hop + 1  # fill the last frame pair instead of dropping an odd frame
        if batch.shape[1] < needed:
            batch = torch.nn.functional.pad(batch, (0, needed - batch.shape[1]))
        mel = self.mel_spectrogram(batch.float())[..., :num_frames]  # [B, n_mels, F]
        logmel = mel.clamp_min(1e-10).log10()
        clip_max = logmel.amax(dim=(-2, -1), keepdim=True)
        logmel = torch.maximum(logmel, clip_max - self.config.logmel_floor_db).div(4).add(1)
        deltas = torchaudio.functional.compute_deltas(logmel, win_length=self.config.delta_win_length)
        logmel = torch.cat((logmel, deltas), dim=-2).transpose(-1, -2)  # [B, F, 2 * n_mels]
        return logmel.reshape(logmel.shape[0], -1, FRAME_STACKING * logmel.shape[-1])


class GraniteSpeech5Processor:
    """Feature extractor + the checkpoint's tokenizer, for CTC transcription (HF `GraniteSpeech5Processor`).

    `batch_decode` takes per-frame ids (what `GraniteSpeech5ForCTC.generate` returns) and applies the CTC collapse
    (merge repeats, drop the blank) once; `decode_collapsed` takes ids already collapsed (`ctc_decode`)."""

    def __init__(self, feature_extractor: GraniteSpeech5FeatureExtractor, tokenizer=None, blank_id: int = 0):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        if tokenizer is not None and pad is not None and pad != blank_id:
            raise ValueError(f"the tokenizer's pad token {pad} is not the CTC blank {blank_id}")
        self.blank_id = blank_id

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], **tokenizer_kwargs) -> "GraniteSpeech5Processor":
        """Feature extractor json + tokenizer files of a checkpoint folder (local only, never the hub)."""
        from transformers import AutoTokenizer  # the tokenizer is HF's; only this constructor needs transformers

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        blank_id = 0
        if (folder / "config.json").is_file():
            blank_id = json.loads((folder / "config.json").read_text()).get("pad_token_id", 0)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
        return cls(GraniteSpeech5FeatureExtractor.from_pretrained(folder), tokenizer, blank_id=blank_id)

    def __call__(self, audio, text=None, sampling_rate: Optional[int] = None, **feature_kwargs) -> dict:
        """input_features and attention_mask; with `text`, also `labels` (the tokenizer's ids, for a CTC loss)."""
        out = self.feature_extractor(audio, sampling_rate=sampling_rate, **feature_kwargs)
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("text given but this processor has no tokenizer")
            out["labels"] = self.tokenizer(text)["input_ids"]
        return out

    def collapse(self, frame_ids) -> List[List[int]]:
        """Per-frame ids -> CTC token ids: merge consecutive repeats, then drop the blank (as `ctc5.ctc_collapse`)."""
        rows = frame_ids.tolist() if isinstance(frame_ids, torch.Tensor) else [list(r) for r in frame_ids]
        return [[int(t) for t, _ in groupby(row) if t != self.blank_id] for row in rows]

    def decode_collapsed(self, token_ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> List[str]:
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer to decode with")
        # a ParakeetTokenizer would collapse a second time ([a, blank, a] -> [a, a] -> [a]): tell it not to
        kwargs = {"group_tokens": False} if _decodes_ctc(self.tokenizer) else {}
        skip = skip_special_tokens
        return [self.tokenizer.decode(list(ids), skip_special_tokens=skip, **kwargs) for ids in token_ids]

    def batch_decode(self, frame_ids, skip_special_tokens: bool = True) -> List[str]:
        return self.decode_collapsed(self.collapse(frame_ids), skip_special_tokens=skip_special_tokens)

    def decode(self, frame_ids, skip_special_tokens: bool = True) -> str:
        rows = frame_ids.unsqueeze(0) if isinstance(frame_ids, torch.Tensor) and frame_ids.dim() == 1 else [frame_ids]
        return self.batch_decode(rows, skip_special_tokens=skip_special_tokens)[0]


def _decodes_ctc(tokenizer) -> bool:
    import inspect

    decode = getattr(tokenizer, "_decode", None)
    return decode is not None and "group_tokens" in inspect.signature(decode).parameters
