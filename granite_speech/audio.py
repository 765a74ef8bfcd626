"""Reading audio files: mono float32 samples at the model's sampling rate."""

import sys
from pathlib import Path

import torch


def read_audio(path: Path, sampling_rate: int) -> torch.Tensor:
    """Mono float32 samples at `sampling_rate`; other rates are resampled with torchaudio (said on stderr)."""
    import soundfile
    import torchaudio

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if samples.shape[1] != 1:
        raise ValueError(f"{path}: {samples.shape[1]} channels; Granite Speech takes mono audio, down-mix it first")
    audio = torch.from_numpy(samples[:, 0].copy())
    if rate != sampling_rate:
        print(f"{path}: resampling {rate} Hz -> {sampling_rate} Hz", file=sys.stderr)
        audio = torchaudio.functional.resample(audio, rate, sampling_rate)
    return audio
