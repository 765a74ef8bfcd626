"""The checks of `granite-speech-parity` arguments, all before any model loads: each bad input becomes a `UsageError`
(exit code 2, one line `error: ...`). `check_compare_args` / `check_diff_args` turn parsed argparse namespaces into
checked, typed runs; the CLI then hands those to the run (`cli.run_compare`, `cli.run_diff`).
"""

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from granite_speech.audio import read_audio
from granite_speech.cli_errors import (
    UsageError,
    check_device,
    check_distinct_outputs,
    check_dtype,
    check_feature_config,
    check_model_folder,
    check_output_file,
    check_output_folder,
    check_prompt,
    check_utf8_path,
    one_line,
)
from granite_speech.fast_generate import splitk_refusal
from parity.store import REFERENCE_FILE, ReferenceMismatch, read_fingerprint

DEFAULT_SAMPLING_RATE = 16000
REFERENCE_CAPTURES_FILE = REFERENCE_FILE  # what --save-captures writes and --reference-captures reads
CAPTURES_METADATA_KEY = "parity_captures"


@dataclass(frozen=True)
class CompareRun:
    """A checked `compare`: nothing here needed a model. `clips` empty: the bundled clip."""

    checkpoint: Optional[Path]  # None: the seeded fixture of `model`
    model: str
    clips: Tuple[Tuple[str, torch.Tensor], ...]
    prompt: str
    device: torch.device
    dtype: torch.dtype
    mode: str
    phases: str
    overrides: Dict[str, float]
    seed: int
    report: Path
    json: Path
    save_captures: Optional[Path]
    reference_captures: Optional[Path]
    max_audio_seconds: Optional[float]
    feed: str = "own"
    floors: str = "auto"
    lenient: bool = False
    allow_partial: bool = False
    phases_given: bool = False  # --phases two was asked for (not picked by the memory plan)
    new_tokens: int = 8
    tp: int = 1  # ranks the FMS decoder is sharded over (torchrun launched this process)
    cases: Tuple[str, ...] = ()  # --case: run only the default inputs whose names contain one of these
    fast_encoder: str = "eager"  # the audio encoder of the fast path's generation section
    fast_gemv: str = "cublas"  # the weight products of its decode steps


@dataclass(frozen=True)
class DiffRun:
    old_path: Path
    new_path: Path
    old: dict
    new: dict
    growth: float
    report: Optional[Path]
    json: Optional[Path]


def _audio_config(checkpoint: Optional[Path], model: str) -> Tuple[int, str, int, int]:
    """(sampling rate, audio token, projector window, downsample rate) of the checkpoint (or the fixture variant)."""
    if checkpoint is None:
        from granite_speech.config import VARIANTS

        if model not in VARIANTS:  # a family fixture (parity.granite.fixtures.family): the 3.3 audio settings
            return DEFAULT_SAMPLING_RATE, "<|audio|>", 15, 5
        projector = VARIANTS[model].projector_config
        return DEFAULT_SAMPLING_RATE, "<|audio|>", projector.window_size, projector.downsample_rate
    config = json.loads((checkpoint / "config.json").read_text())
    rate = check_feature_config(checkpoint).sampling_rate  # checked: a whole number > 0
    token = "<|audio|>"
    if (checkpoint / "processor_config.json").is_file():
        token = json.loads((checkpoint / "processor_config.json").read_text()).get("audio_token") or token
    return int(rate), token, int(config.get("window_size", 15)), int(config.get("downsample_rate", 5))


def check_reference_captures(folder: Path, option: str = "--reference-captures") -> Path:
    """A folder written by `--save-captures`: it holds a readable parity capture file of the HF side."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise UsageError(f"{option} {folder} does not exist; expected a folder written by --save-captures")
    if not folder.is_dir():
        raise UsageError(f"{option} {folder} is a file; expected a folder written by --save-captures")
    path = folder / REFERENCE_CAPTURES_FILE
    if not path.is_file():
        raise UsageError(f"{option} {folder} has no {REFERENCE_CAPTURES_FILE}; expected a folder written by "
                         f"--save-captures")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(CAPTURES_METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{option}: {path} is truncated or not safetensors ({one_line(err)})") from err
    if raw is None:
        raise UsageError(f"{option}: {path} is not a parity capture file (no '{CAPTURES_METADATA_KEY}' metadata)")
    try:
        side = json.loads(raw).get("side")
    except (ValueError, AttributeError) as err:
        raise UsageError(f"{option}: {path} has unreadable capture metadata ({one_line(err)})") from err
    if side != "hf":
        raise UsageError(f"{option}: {path} holds the {side!r} side's captures; expected the HF reference's ('hf')")
    try:  # the checkpoint and inputs it was saved from are checked against the run's once they are known
        read_fingerprint(path)
    except ReferenceMismatch as err:
        raise UsageError(f"{option}: {one_line(err)}") from err
    return folder


def check_fixture_cache_limit() -> None:
    """The fixture cache's bound (an environment variable) read now, not when the fixture is built after the checks;
    and its folder (GRANITE_SPEECH_FIXTURE_CACHE) one the fixture can be written in."""
    from parity.granite.fixtures import CACHE_ENV, cache_limit_bytes, default_cache_dir

    try:
        cache_limit_bytes()
    except ValueError as err:
        raise UsageError(one_line(err)) from err
    cache = default_cache_dir()
    try:
        if cache.exists() and not cache.is_dir():
            raise UsageError(f"{CACHE_ENV}={cache} is a file; expected a folder (new or existing) for the seeded "
                             f"fixture checkpoints")
        if not cache.exists():
            check_output_folder(cache, CACHE_ENV)
        elif not os.access(cache, os.W_OK | os.X_OK):
            raise UsageError(f"{CACHE_ENV}={cache}: cannot write in it (permission denied)")
    except OSError as err:
        raise UsageError(f"{CACHE_ENV}={cache} cannot be used ({err.strerror or err}); expected a writable folder")\
            from None


def check_fixture_checkpoint(run: "CompareRun", checkpoint: Path) -> None:
    """A seeded fixture taken from the cache is checked before a model loads: a shard truncated or deleted since
    it was built (a full disk, an interrupted copy) is named, with the fix. A --checkpoint was checked already."""
    from granite_speech.checkpoint.files import check_checkpoint_folder

    if run.checkpoint is not None:
        return
    try:
        check_checkpoint_folder(checkpoint)
    except (OSError, ValueError) as err:
        raise UsageError(f"the cached fixture checkpoint {checkpoint} is damaged: {one_line(err)}; delete that "
                         f"folder and run again (it is rebuilt)") from err


def check_compare_args(args: argparse.Namespace) -> CompareRun:
    """Every check of `compare`, in the order a user fixes them; raises UsageError."""
    dtype = check_dtype(args.dtype)
    device = check_device(args.device, dtype)
    if args.checkpoint is not None and args.model is not None:
        raise UsageError("--model picks a seeded random fixture and --checkpoint a real folder; pass one of them")
    model = args.model or "tiny"
    if args.checkpoint is None:
        check_fixture_cache_limit()
    report = check_output_file(args.report, "--report", "out/report.html")
    json_path = check_output_file(args.json, "--json", "out/report.json")
    save = None if args.save_captures is None else check_output_folder(args.save_captures, "--save-captures")
    reference = None if args.reference_captures is None else check_reference_captures(args.reference_captures)
    if save is not None and reference is not None and save.resolve() == reference.resolve():
        raise UsageError("--save-captures and --reference-captures are the same folder; saving would overwrite the "
                         "reference")
    check_distinct_outputs(**{"--report": report, "--json": json_path})
    checkpoint = None if args.checkpoint is None else check_model_folder(args.checkpoint)
    rate, audio_token, _, _ = _audio_config(checkpoint, model)
    prompt = check_prompt(args.prompt, audio_token)
    for path in args.audio or ():  # FMS reads any POSIX name; the HF reference's load_audio opens UTF-8 paths only
        check_utf8_path(path, "--audio", "the HF reference's audio loading (transformers load_audio)")
    clips: List[Tuple[str, torch.Tensor]] = [
        (str(path), read_audio(path, rate, max_seconds=args.max_audio_seconds)) for path in args.audio or ()
    ]
    overrides = {k: v for k in ("atol", "rtol") if (v := getattr(args, k)) is not None}
    check_case_args(args, checkpoint, model)
    check_tensor_parallel_args(args, checkpoint, model, save, reference, device)
    check_fast_path_args(args, checkpoint, model, device)
    return CompareRun(
        checkpoint=checkpoint, model=model, clips=tuple(clips), prompt=prompt, device=device, dtype=dtype,
        mode=args.mode, phases=args.phases, overrides=overrides, seed=args.seed, report=report, json=json_path,
        save_captures=save, reference_captures=reference, max_audio_seconds=args.max_audio_seconds,
        feed=args.feed, floors=args.floors, lenient=args.lenient, allow_partial=args.allow_partial,
        phases_given=args.phases == "two", new_tokens=args.new_tokens, tp=args.tp, cases=tuple(args.case or ()),
        fast_encoder=args.fast_encoder, fast_gemv=args.fast_gemv,
    )


def check_fast_path_args(args: argparse.Namespace, checkpoint: Optional[Path], model: str,
                         device: torch.device) -> None:
    """`--fast-encoder` / `--fast-gemv` pick the fast path of the generation section: refused where no such section
    runs, rather than ignored; the split-K GEMV (Triton) off CUDA too."""
    flags = [f"--fast-encoder {args.fast_encoder}"] * (args.fast_encoder != "eager") + [
        f"--fast-gemv {args.fast_gemv}"] * (args.fast_gemv != "cublas")
    if not flags:
        return
    flag = " ".join(flags)
    refusal = splitk_refusal(device) if args.fast_gemv == "splitk" else None
    if refusal:
        raise UsageError(f"--fast-gemv splitk: {refusal}")
    if is_ctc_member(checkpoint, model):
        raise UsageError(f"{flag}: granite-speech-5.0 (CTC) has no fast decode path; its encoder is judged by the "
                         "model and CTC sections")
    if args.tp > 1:
        raise UsageError(f"{flag}: the fast path is single-device and a --tp run does not run it")
    if args.phases == "two":
        raise UsageError(f"{flag}: --phases two leaves generation out, the fast path's section with it")


def is_ctc_member(checkpoint: Optional[Path], model: str) -> bool:
    """Whether the run's member is granite-speech-5.0 (CTC): from the folder's config.json, else the fixture name."""
    config = json.loads((checkpoint / "config.json").read_text()) if checkpoint is not None else {}
    return config.get("model_type") == "granite_speech5_ctc" or (checkpoint is None and model in ("5.0-470m",
                                                                                                 "tiny-5"))


def member_default_cases(checkpoint: Optional[Path], model: str) -> tuple:
    """compare's default inputs for the run's member: the CTC set for granite-speech-5.0, else the LLM set."""
    from parity.granite.cases import ctc_cases, default_cases

    return tuple(ctc_cases() if is_ctc_member(checkpoint, model) else default_cases())


def check_case_args(args: argparse.Namespace, checkpoint: Optional[Path], model: str) -> None:
    """`--case TEXT` picks among the member's default inputs: each TEXT must name one, and --audio (which replaces
    the default inputs) cannot come with it."""
    if not args.case:
        return
    if args.audio:
        raise UsageError("--case picks among the default inputs and --audio replaces them; pass one of them")
    from parity.granite.cases import select_cases

    try:
        select_cases(args.case, member_default_cases(checkpoint, model))
    except ValueError as err:
        raise UsageError(f"--case: {err}") from None


def check_tensor_parallel_args(args: argparse.Namespace, checkpoint: Optional[Path], model: str,
                               save: Optional[Path], reference: Optional[Path], device: torch.device) -> None:
    """`--tp N` needs N processes from torchrun and a member with a decoder to shard; what stays single-process is
    refused here rather than run in N copies."""
    from parity.granite.tp import launched_ranks

    ranks = launched_ranks()
    if args.tp == 1:
        if ranks > 1:
            raise UsageError(f"launched as {ranks} processes (WORLD_SIZE={ranks}) but --tp is 1; pass --tp {ranks}")
        return
    if ranks != args.tp:
        raise UsageError(f"--tp {args.tp} needs {args.tp} processes, this is {ranks}; launch with "
                         f"`torchrun --nproc-per-node {args.tp} -m parity.granite compare --tp {args.tp} ...`")
    if args.phases == "two":
        raise UsageError("--tp runs both models side by side on every rank; --phases two is single-process")
    if save is not None or reference is not None:
        raise UsageError("--save-captures / --reference-captures are single-process; run them without --tp")
    if is_ctc_member(checkpoint, model):
        raise UsageError("--tp shards a decoder; granite-speech-5.0 (CTC) has none")
    if device.type == "cuda" and torch.cuda.device_count() < args.tp:
        # one rank per device: on fewer devices a rank would address a card that is not there (a device-side assert)
        raise UsageError(f"--tp {args.tp} on cuda needs {args.tp} CUDA devices, this machine sees "
                         f"{torch.cuda.device_count()}; pass --device cpu to shard over CPU processes (gloo)")


def _read_report(path: Path, option: str) -> dict:
    from parity.report import read_json

    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{option} {path} does not exist; expected a parity report JSON (compare --json)")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; expected a parity report JSON (compare --json)")
    try:
        report = read_json(path)
    except (ValueError, OSError, KeyError, AttributeError) as err:  # JSONDecodeError / UnicodeDecodeError: ValueError
        raise UsageError(f"{option} {path} is not a parity report JSON ({one_line(err)})") from err
    if not isinstance(report.get("summary"), dict) or not isinstance(report.get("sections"), list):
        raise UsageError(f"{option} {path} is not a parity report JSON (it has the schema but no summary / sections)")
    return report


def check_diff_args(args: argparse.Namespace) -> DiffRun:
    """Output paths first (cheap, and never one of the inputs), then both reports read and recognised."""
    report = None if args.report is None else check_output_file(args.report, "--report", "out/diff.html")
    json_path = None if args.json is None else check_output_file(args.json, "--json", "out/diff.json")
    check_distinct_outputs(**{"--report": report, "--json": json_path, "OLD": Path(args.old)})
    check_distinct_outputs(**{"--report": report, "--json": json_path, "NEW": Path(args.new)})
    old = _read_report(args.old, "OLD")
    new = _read_report(args.new, "NEW")
    return DiffRun(Path(args.old), Path(args.new), old, new, args.growth, report, json_path)
