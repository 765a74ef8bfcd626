"""The input cases of the `compare` pipeline and the audio they read.

Each member's input set (`default_cases`, `ctc_cases`, `cases_for`), the clip files, each side's reading of them
(and HF's in float64: the preprocessing floors), and what every section builder shares (`Section`, `attempt`).
"""

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from parity.capture import pair_from_values
from parity.diff import ParityResult
from parity.granite.hf import hf_load_audio
from parity.granite.models import member_of, regime_of
from parity.granite.probes_family import CTC5
from parity.probes import Probe
from parity.store import ReferenceMismatch

AUDIO_TOKEN = "<|audio|>"
DEFAULT_INSTRUCTION = f"{AUDIO_TOKEN}can you transcribe the speech into a written format?"
SAMPLING_RATE = 16000


@dataclass(frozen=True)
class Case:
    """One input of the default set: clips (bundled ids or file paths) or text-only instructions."""

    name: str
    clips: Tuple[str, ...] = ()
    instructions: Tuple[str, ...] = ()  # one per row; default: DEFAULT_INSTRUCTION per clip
    lora_mode: str = "merged"  # the FMS model's LoRA regime; HF's adapter is on exactly when audio is given
    generate: int = 0  # greedy new tokens to compare (0: no generation section)
    why: str = ""
    dtype: Optional[str] = None  # run this case in another dtype than the run's (e.g. bf16 as users run it)
    padding_side: str = "left"  # asked of both processors (generation needs left; the forward takes either)
    ends_apart: bool = False  # rows end at a stop token from HF's own path, at different steps (every loop, transcribe)

    def rows(self) -> Tuple[str, ...]:
        return self.instructions or (DEFAULT_INSTRUCTION,) * len(self.clips)


STEREO_44K = "stereo-44k:"  # clip prefix: the bundled clip re-written as a stereo 44.1 kHz wav (reading, resampling)


def default_cases() -> Tuple[Case, ...]:
    """Clips on and just past conformer-block and projector-window boundaries, a padded batch, a text-only prompt,
    both LoRA modes and a file that must be down-mixed and resampled."""
    return (
        Case("clip 201 frames (real block + 1)", ("9003-103-0001",),
             why="one full 200-frame attention block plus one frame; 13 windows + 6 frames"),
        Case("padded batch of 3 (window + 1, on window, tiny block + 1)",
             ("9001-101-0000", "9003-103-0000", "9001-101-0001"), generate=12, ends_apart=True,
             why="clips of 16, 45 and 121 encoder frames: text- and audio-padded, left-padded prompts; greedy rows end "
                 "at different steps (a stop token of HF's own path) in every decoding loop and in transcribe"),
        Case("text only, adapter off, right-padded", instructions=(
            "the quick brown fox", "a much longer prompt about the harbour and the boats that came in at dawn"),
             lora_mode="audio_only", padding_side="right",
             why="no audio: HF's adapter is off, FMS applies no LoRA (audio_only mode); padded on the right, the side "
                 "the tokenizer does not pad on by default"),
        Case("text only, generated (adapter off, left-padded)", instructions=(
            "name three boats", "write one sentence about the tide coming in over the sand"),
             lora_mode="audio_only", generate=4,
             why="a text prompt through every decoding loop: each must keep the adapter off in its prefill and every "
                 "decode step, as HF does without audio"),
        Case("LoRA audio_only mode (on window and tiny block)", ("9004-104-0000",), lora_mode="audio_only",
             generate=6, why="the LoRA kept separate and switched on by the audio, in the prefill and every decode "
                             "step"),
        Case("stereo 44.1 kHz file", (STEREO_44K + "9002-102-0000",),
             why="down-mixing and resampling to 16 kHz before the features"),
        Case("bf16 as users run it (padded batch of 2)", ("9002-102-0000", "9004-104-0001"), generate=8,
             dtype="bfloat16", why="FMS bf16 (eager and fast path) vs HF bf16, judged against HF's own bf16 "
                                   "rounding error (HF float64): a missing fp32 upcast shows here, not in fp32"),
    )


def ctc_cases() -> Tuple[Case, ...]:
    """The CTC (5.0) input set; every case decodes (`generate` > 0 turns the CTC decoding section on). Frame counts
    at the input rate (x1) -> after the two subsampling blocks (x2, x4): odd counts (a stride-2 block drops the
    trailing frame), padded rows at every rate, and one clip long enough for several attention blocks of the real
    model (context 128) at every rate."""
    return (
        Case("clip 201 frames (odd: 201 -> 100 -> 50)", ("9003-103-0001",), generate=1,
             why="an odd frame count at the input rate: the subsampling block drops the trailing frame"),
        Case("padded batch of 3 (16, 45, 121 frames)", ("9001-101-0000", "9003-103-0000", "9001-101-0001"),
             generate=1, why="rows padded at every frame rate: padded keys masked, padded frames zeroed before the "
                             "depthwise convs, masks halved (AND of pairs) after each subsampling block"),
        Case("clip 600 frames (600 -> 300 -> 150)", ("9004-104-0001",), generate=1,
             why="several attention blocks at every rate (the real model's context is 128 frames), a padded last "
                 "block at each"),
        Case("stereo 44.1 kHz file", (STEREO_44K + "9002-102-0000",), generate=1,
             why="down-mixing and resampling to 16 kHz before the features"),
    )


def select_cases(substrings: Sequence[str], cases: Sequence[Case]) -> Tuple[Case, ...]:
    """The `cases` whose names contain one of `substrings` (all of them for none); ValueError naming the cases when
    a substring matches none."""
    if not substrings:
        return tuple(cases)
    for sub in substrings:
        if not any(sub in c.name for c in cases):
            raise ValueError(f"no default case matches {sub!r}; the cases are {[c.name for c in cases]}")
    return tuple(c for c in cases if any(sub in c.name for sub in substrings))


def cases_for(checkpoint: Union[str, Path], cases: Optional[Sequence[Case]] = None) -> Tuple[Case, ...]:
    """The input set of a checkpoint: `default_cases()` (3.3, plus) or `ctc_cases()` (5.0) unless given; on a
    checkpoint with no adapter files (the LoRA merged in the weights, or none) the cases that exercise the separate
    adapter (lora_mode audio_only) run in the one regime there is (merged), and the one that would repeat an
    audio case is left out."""
    member = member_of(checkpoint)
    if cases is None or (member == CTC5 and tuple(cases) == default_cases()):  # the LLM input set means "default"
        cases = ctc_cases() if member == CTC5 else default_cases()
    if member == CTC5:  # no prompt, no LoRA: clips only, each decoded
        return tuple(replace(case, instructions=(), lora_mode="merged", generate=case.generate and 1)
                     for case in cases if case.clips)
    if (Path(checkpoint) / "adapter_config.json").is_file():
        return tuple(cases)
    regime = regime_of(checkpoint)["regime"]
    kept = []
    for case in cases:
        if case.lora_mode != "audio_only":
            kept.append(case)
        elif not case.clips:  # text only: still a case of its own (no audio anywhere)
            kept.append(replace(case, lora_mode="merged", why=f"{case.why}; this checkpoint has no adapter files "
                                                              f"({regime}): the decoder weights as they are"))
    return tuple(kept)


# ---------------------------------------------------------------------------------------------------------------
# audio files


def clip_path(clip: str, workdir: Path) -> Path:
    from parity.granite.fixtures import SPEECH_DIR

    if clip.startswith(STEREO_44K):
        import soundfile
        import torchaudio

        source = clip_path(clip[len(STEREO_44K):], workdir)
        samples, rate = soundfile.read(str(source), dtype="float32")
        mono = torchaudio.functional.resample(torch.from_numpy(samples), rate, 44100)
        stereo = torch.stack([mono, 0.5 * mono + 0.01], dim=1).numpy()  # channels differ: a mean is needed
        target = workdir / f"{clip[len(STEREO_44K):]}-stereo-44k.wav"
        soundfile.write(str(target), stereo, 44100, subtype="FLOAT")
        return target
    bundled = SPEECH_DIR / f"{clip}.flac"
    return bundled if bundled.is_file() else Path(clip)


def attempt(fn: Callable[[], Any]) -> Any:
    """The value, or the exception it raised (recorded on the probe instead of ending the run)."""
    try:
        return fn()
    except ReferenceMismatch:  # a reference saved from another run is the user's input error, not a finding
        raise
    except Exception as err:  # noqa: BLE001 - a failing stage is a finding, reported on its probe
        return err


def audio_rows(paths: Sequence[Path]) -> Tuple[List[Tuple[Probe, Any, Any]], list, list, list]:
    """(probe rows, HF audio, FMS audio, input metadata): each clip read by HF's `load_audio` and FMS `read_audio`."""
    from granite_speech.audio import read_audio

    rows: List[Tuple[Probe, Any, Any]] = []
    hf_audio, fms_audio, inputs_meta = [], [], []
    for i, path in enumerate(paths):
        reference = attempt(lambda: hf_load_audio(path, SAMPLING_RATE))
        # silent: the CLI announced the user's own files when it checked them; the built-in clips need no note
        candidate = attempt(lambda: read_audio(path, SAMPLING_RATE, notify=lambda note: None))
        rows.append((Probe(f"audio.{i}.samples", "load_audio", "read_audio", teacher=(),
                           note=f"{path.name}: decoded, down-mixed to mono, resampled to {SAMPLING_RATE} Hz"),
                     reference, candidate))
        hf_audio.append(reference)
        fms_audio.append(candidate)
        if isinstance(reference, torch.Tensor):
            inputs_meta.append({"audio": path.name, "seconds": round(reference.numel() / SAMPLING_RATE, 3)})
    return rows, hf_audio, fms_audio, inputs_meta


class _Float64Mel(torch.nn.Module):
    """HF's mel filterbank in float64 on the samples it is given (HF's extractor casts them to float32 first, which
    loses nothing: the float32 samples are the input), so the features' floor is the extractor's own rounding."""

    def __init__(self, mel: torch.nn.Module):
        super().__init__()
        self.mel = copy.deepcopy(mel).double()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.mel(audio.double())


def preprocessing_floors(paths: Sequence[Path], hf_audio: list, hf_extractor=None):
    """The rounding-only reference of preprocessing (noise floors): each clip read by HF's recipe in float64 and, for
    an extractor with a torchaudio mel filterbank (the LLM members'), HF's features with that filterbank in float64.
    None where HF's own side failed (its probes already say why)."""
    if any(isinstance(audio, BaseException) for audio in hf_audio):
        return None
    rows = [(Probe(f"audio.{i}.samples", "load_audio", "load_audio", teacher=()), value, value)
            for i, path in enumerate(paths) for value in [hf_load_audio(path, SAMPLING_RATE, torch.float64)]]
    if hf_extractor is not None:
        extractor64 = copy.copy(hf_extractor)
        extractor64.mel_filters = _Float64Mel(hf_extractor.mel_filters)
        features = extractor64([audio.numpy() for audio in hf_audio])["input_features"]
        rows.append((Probe("features.input_features", "feature_extractor", "feature_extractor", teacher=()),
                     features, features))
    return pair_from_values(rows).hf


def field_of(value: Any, key: str) -> Any:
    if isinstance(value, BaseException):
        return value
    got = value.get(key) if hasattr(value, "get") else None
    if isinstance(got, (list, tuple)):
        got = torch.tensor(got)
    return got


# ---------------------------------------------------------------------------------------------------------------
# what every section shares


Section = Tuple[str, str, ParityResult, dict]
