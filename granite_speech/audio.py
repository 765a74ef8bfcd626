"""Reading audio files: mono float32 samples at the model's sampling rate, or one clear error.

Multi-channel audio is down-mixed to mono (the mean of the channels) and any rate is resampled with soxr at its
"HQ" quality to ceil(n * rate / source rate) samples, each said on stderr: the recipe of HF's own audio loading
(`transformers.audio_utils.load_audio`, soundfile backend, itself equal to `librosa.load`), so that FMS and HF
see the same samples (the parity report compares them). Refused with `AudioInputError` (a ValueError, and the CLIs'
exit code 2): a missing file or a folder, anything libsndfile cannot read, no samples or fewer than one mel frame,
NaN/Inf samples, and clips longer than `max_seconds` (`--max-audio-seconds` on the command lines).
"""

import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from granite_speech.cli_errors import UsageError
from granite_speech.lengths import min_num_samples

DEFAULT_MAX_SECONDS = 600.0
FORMATS = "WAV, FLAC, OGG/Vorbis, MP3 or another format libsndfile reads"


class AudioInputError(UsageError):
    """An audio file that cannot be used; the message is one line naming the file, the problem and what is expected."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_audio(
    path: Union[str, Path],
    sampling_rate: int,
    *,
    max_seconds: Optional[float] = DEFAULT_MAX_SECONDS,
    notify: Callable[[str], None] = _stderr,
) -> torch.Tensor:
    """Mono float32 samples of `path` at `sampling_rate`. Down-mixing and resampling are reported through `notify`
    (stderr by default); unusable files raise AudioInputError. `max_seconds=None` lifts the length limit."""
    import soundfile

    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a number of seconds > 0 (or None for no limit), got {max_seconds!r}")
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"no such audio file: {path}")
    if path.is_dir():
        raise AudioInputError(f"{path} is a folder; expected an audio file ({FORMATS})")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.SoundFileError) as err:
        reason = str(err).split(": ", 1)[-1] if ": " in str(err) else str(err)
        raise AudioInputError(f"{path} is not a readable audio file ({reason.strip()}); expected {FORMATS}") from None
    minimum = min_num_samples()
    if info.frames == 0:
        raise AudioInputError(f"{path} holds no audio samples; expected at least {minimum} samples at "
                              f"{sampling_rate} Hz ({1000 * minimum / sampling_rate:.1f} ms, one mel frame)")
    duration = info.frames / info.samplerate
    if max_seconds is not None and duration > max_seconds:
        raise AudioInputError(
            f"{path} is {duration:.1f} s long, over the {max_seconds:g} s limit; split it, or raise the limit with "
            f"--max-audio-seconds (read_audio(..., max_seconds=...))"
        )
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.SoundFileError) as err:
        raise AudioInputError(f"{path} could not be decoded ({err}); expected {FORMATS}") from None
    audio = torch.from_numpy(samples)
    bad = int((~torch.isfinite(audio)).sum())
    if bad:
        raise AudioInputError(f"{path} contains {bad} NaN/Inf samples; expected finite samples")
    if audio.shape[1] != 1:
        notify(f"{path}: {audio.shape[1]} channels down-mixed to mono (mean of the channels)")
        audio = audio.mean(dim=1)
    else:
        audio = audio[:, 0].clone()
    if rate != sampling_rate:
        import math

        import soxr

        notify(f"{path}: resampling {rate} Hz -> {sampling_rate} Hz")
        length = math.ceil(audio.numel() * sampling_rate / rate)
        resampled = torch.from_numpy(soxr.resample(audio.numpy(), rate, sampling_rate, quality="soxr_hq"))
        audio = torch.nn.functional.pad(resampled, (0, max(0, length - resampled.numel())))[:length].contiguous()
    if audio.numel() < minimum:
        raise AudioInputError(
            f"{path} is too short: {audio.numel()} samples at {sampling_rate} Hz "
            f"({1000 * audio.numel() / sampling_rate:.1f} ms); expected at least {minimum} samples "
            f"({1000 * minimum / sampling_rate:.1f} ms, one mel frame)"
        )
    return audio.contiguous()
