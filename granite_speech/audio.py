"""Reading audio files: mono float32 samples at the model's sampling rate, or one clear error.

Multi-channel audio is down-mixed to mono (the mean of the channels) and any rate is resampled with soxr at its
"HQ" quality to ceil(n * rate / source rate) samples, each said on stderr: the recipe of HF's own audio loading
(`transformers.audio_utils.load_audio`, soundfile backend, itself equal to `librosa.load`), so that FMS and HF
see the same samples (the parity report compares them). Refused with `AudioInputError` (a ValueError, and the CLIs'
exit code 2): a missing file, a folder or anything else that is not a regular file (a named pipe would block the
read forever), anything libsndfile cannot read, no samples or fewer than one mel frame, NaN/Inf samples, samples
beyond +-MAX_AMPLITUDE, and clips longer than `max_seconds` (`--max-audio-seconds` on the command lines). A file name
that is not UTF-8 (POSIX allows any bytes) is read through its bytes and shown with backslash escapes.
"""

import os
import stat
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from granite_speech.cli_errors import UsageError
from granite_speech.lengths import min_num_samples

DEFAULT_MAX_SECONDS = 600.0
FORMATS = "WAV, FLAC, OGG/Vorbis, MP3 or another format libsndfile reads"
# Decoded samples are in [-1, 1] (libsndfile scales integer PCM by its full range); float WAV/FLAC may exceed it a
# little (clipping headroom), but 1e3 is 60 dB beyond full scale: such a file holds samples in another unit (integer
# PCM stored as float, a mis-scaled export) and would give features far outside anything the model was trained on.
MAX_AMPLITUDE = 1e3


def display_path(path: Union[str, Path]) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 (kept by Python as lone surrogates) as
    backslash escapes, e.g. `clip-\\xff.flac`."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
    name = display_path(path)
    _check_regular_file(path, name)
    raw = os.fsencode(str(path))  # soundfile takes bytes as they are; a str it would encode strictly
    try:
        info = soundfile.info(raw)
    except (RuntimeError, soundfile.SoundFileError) as err:
        reason = str(err).split(": ", 1)[-1] if ": " in str(err) else str(err)
        raise AudioInputError(f"{name} is not a readable audio file ({reason.strip()}); expected {FORMATS}") from None
    minimum = min_num_samples()
    if info.frames == 0:
        raise AudioInputError(f"{name} holds no audio samples; expected at least {minimum} samples at "
                              f"{sampling_rate} Hz ({1000 * minimum / sampling_rate:.1f} ms, one mel frame)")
    duration = info.frames / info.samplerate
    if max_seconds is not None and duration > max_seconds:
        raise AudioInputError(
            f"{name} is {duration:.1f} s long, over the {max_seconds:g} s limit; split it, or raise the limit with "
            f"--max-audio-seconds (read_audio(..., max_seconds=...))"
        )
    try:
        samples, rate = soundfile.read(raw, dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.SoundFileError) as err:
        raise AudioInputError(f"{name} could not be decoded ({err}); expected {FORMATS}") from None
    audio = torch.from_numpy(samples)
    _check_samples(audio, name)
    if audio.shape[1] != 1:
        notify(f"{name}: {audio.shape[1]} channels down-mixed to mono (mean of the channels)")
        audio = audio.mean(dim=1)
    else:
        audio = audio[:, 0].clone()
    if rate != sampling_rate:
        import math

        import soxr

        notify(f"{name}: resampling {rate} Hz -> {sampling_rate} Hz")
        length = math.ceil(audio.numel() * sampling_rate / rate)
        resampled = torch.from_numpy(soxr.resample(audio.numpy(), rate, sampling_rate, quality="soxr_hq"))
        audio = torch.nn.functional.pad(resampled, (0, max(0, length - resampled.numel())))[:length].contiguous()
    if audio.numel() < minimum:
        raise AudioInputError(
            f"{name} is too short: {audio.numel()} samples at {sampling_rate} Hz "
            f"({1000 * audio.numel() / sampling_rate:.1f} ms); expected at least {minimum} samples "
            f"({1000 * minimum / sampling_rate:.1f} ms, one mel frame)"
        )
    return audio.contiguous()


def _check_regular_file(path: Path, name: str) -> None:
    """Only a regular file (or a link to one) is read: a named pipe or a device would block or never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AudioInputError(f"no such audio file: {name}") from None
    except OSError as err:
        raise AudioInputError(f"{name} cannot be read ({err.strerror}); expected an audio file ({FORMATS})") from None
    if stat.S_ISDIR(mode):
        raise AudioInputError(f"{name} is a folder; expected an audio file ({FORMATS})")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise AudioInputError(f"{name} is {kind}, not a regular file; expected an audio file ({FORMATS}) on disk")
    if not os.access(path, os.R_OK):
        raise AudioInputError(f"{name} cannot be read (permission denied); expected a readable audio file")


def _check_samples(audio: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(audio)).sum())
    if bad:
        raise AudioInputError(f"{name} contains {bad} NaN/Inf samples; expected finite samples")
    peak = float(audio.abs().max()) if audio.numel() else 0.0
    if peak > MAX_AMPLITUDE:
        raise AudioInputError(f"{name} has samples of amplitude {peak:.3g}, beyond +-{MAX_AMPLITUDE:g}; expected "
                              f"samples in [-1, 1] (full scale), as audio files decode to")
