"""`granite-speech-parity` (also `python -m parity.granite`): FMS against the HF reference.

  compare  one checkpoint and audio, layer by layer: JSON + HTML report, summary on stdout
  diff     two reports of `compare --json`, probe by probe: did an error grow or a probe regress?

Every argument is checked before any model loads (a bad one exits 2 with one line `error: ...`).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from granite_speech.audio import DEFAULT_MAX_SECONDS
from granite_speech.cli_errors import (
    ArgumentParser,
    UsageError,
    adapter_warning,
    exit_codes_epilog,
    growth_factor,
    nonnegative_int,
    positive_int,
    one_line,
    positive_seconds,
    run_main,
    tolerance,
    version_string,
)
from granite_speech.config import VARIANTS
from granite_speech.fast_generate import ENCODERS as FAST_ENCODERS, GEMVS as FAST_GEMVS
from parity.granite.cli_checks import (CompareRun, DiffRun, check_compare_args, check_diff_args,
                                       check_fixture_checkpoint, member_default_cases)
from parity.granite.fixtures.family import FAMILY_VARIANTS

MODEL_CHOICES = tuple(dict.fromkeys((*VARIANTS, *FAMILY_VARIANTS)))  # 3.3 variants, then the family's

PROG = "granite-speech-parity"
DEFAULT_PROMPT = "<|audio|>can you transcribe the speech into a written format?"
INCOMPLETE = ("incomplete: every check that ran passed, but a planned check did not run and was not asked for (the "
              "verdict lists each with why; --allow-partial accepts it)")
COMPARE_EXIT = exit_codes_epilog(ok=": parity holds (every probe within tolerance)",
                                 failed="parity fails: a probe breaks a rule of the verdict (the report says where)",
                                 incomplete=INCOMPLETE)
DIFF_EXIT = exit_codes_epilog(ok=": nothing grew past its bound, stopped passing or disappeared",
                              failed="regressed: a probe's max |diff| grew past its bound or it stopped passing, a "
                                     "section\n     stopped passing, a probe or section of OLD is absent from NEW, or "
                                     "one new in NEW does not pass")
TOP_EXIT = exit_codes_epilog(ok=" (compare: parity holds; diff: nothing grew or regressed)",
                             failed="compare: parity fails; diff: a probe grew past its bound, regressed or "
                                    "disappeared",
                             incomplete=f"compare: {INCOMPLETE}")
VERDICT_EXIT = {"pass": 0, "fail": 1, "incomplete": 4}


def _write_outputs(writes, verdict: str) -> list:
    """Write the outputs after the verdict was printed; a failure keeps the verdict visible and exits 2."""
    written = []
    for option, write, path in writes:
        try:
            written.append(write(path))
        except OSError as err:
            raise UsageError(f"the verdict above ({verdict}) stands, but {option} {path} could not be written: "
                             f"{one_line(err)}") from err
    return written


def run_compare(run: CompareRun, verbosity: int = 0) -> int:
    """The run of a checked `compare`: 0 when parity holds, 1 when it fails, 4 when a planned check did not run
    unasked (the same on every rank with --tp). `verbosity` 0 prints a line per finished input case, the verdict
    line and the report paths; 1 (-v) the per-probe tables and every progress message too; 2 (-vv) also the
    libraries' own output (parity.granite.console)."""
    from parity.granite.console import quiet_libraries

    start = time.monotonic()
    device, dtype = run.device, run.dtype
    with quiet_libraries(enabled=verbosity < 2):
        if run.tp > 1:
            from parity.granite import tp

            device = tp.start(device)
            try:
                return _compare(run, device, dtype, start, quiet=not tp.is_writer(), verbosity=verbosity)
            finally:
                tp.stop()
        return _compare(run, device, dtype, start, verbosity=verbosity)


def _compare(run: CompareRun, device: torch.device, dtype: torch.dtype, start: float, quiet: bool = False,
             verbosity: int = 0) -> int:
    """`compare` in this process; `quiet` (a tensor-parallel rank other than 0) computes the same verdict and
    neither prints nor writes."""
    from granite_speech.checkpoint import CheckpointCoverageError
    from parity.capture import heap_frozen
    from parity.granite.console import StepProgress
    from parity.granite.pipeline import compare_report
    from parity.store import ReferenceMismatch

    steps = StepProgress(verbosity, start=start)

    def _progress(message: str, step: Optional[str] = None) -> None:
        """A progress message (shown under -v); `step` also names a step of the quiet display."""
        if quiet:
            return
        if step is not None and verbosity == 0:
            steps.begin(step)
        else:
            steps.message(message)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    checkpoint = _checkpoint(run, device, quiet, _progress)
    check_fixture_checkpoint(run, checkpoint)  # a cached fixture's shards, before any model loads
    steps.finish()  # before any note of the memory plan, on a line of its own
    cases = _cases(run, checkpoint, quiet)
    phases = _phases(run, checkpoint, device, dtype, quiet)
    try:
        with steps, heap_frozen():  # steps: the last case's line; on an error, the case it stopped in
            report = compare_report(
                checkpoint, seeded=None if run.checkpoint is not None else run.model, cases=cases, dtype=dtype,
                device=device, mode=run.mode, feed=run.feed, floors=run.floors, phases=phases, policy=_policy(run),
                overrides=run.overrides or None, seed=run.seed, save_captures=run.save_captures,
                fast_encoder=run.fast_encoder, fast_gemv=run.fast_gemv, reference_captures=run.reference_captures,
                progress=_progress,
            )
    except CheckpointCoverageError as err:
        raise UsageError(f"checkpoint {checkpoint} does not fit its config.json: {one_line(err)}") from err
    except ReferenceMismatch as err:  # another run's reference: the input is wrong, not the port
        raise UsageError(f"--reference-captures does not belong to this run: {one_line(err)}") from err
    code = VERDICT_EXIT[report["summary"]["verdict"]]
    if not quiet:
        _print_and_write(report, run, verbosity)
        _progress(f"done: {report['summary']['probes']} probes in {len(report['sections'])} sections")
    return code


def _checkpoint(run: CompareRun, device: torch.device, quiet: bool, progress) -> Path:
    """The checkpoint folder: the user's, or the seeded fixture of --model (built or reused)."""
    from parity.granite.fixtures import build_checkpoint

    if run.checkpoint is not None:
        warning = adapter_warning(run.checkpoint, "merged")
        if warning and not quiet:
            print(warning, file=sys.stderr)
        return run.checkpoint
    if run.model in FAMILY_VARIANTS:  # a family member: HF's save_pretrained, drawn on the run's device at real size
        from parity.granite.fixtures.family import REAL_FAMILY, build_family_checkpoint

        where = device if run.model in REAL_FAMILY else torch.device("cpu")
        progress(f"building (or reusing) the seeded {run.model} family checkpoint (weights drawn on {where.type})",
                 step=f"checkpoint: seeded {run.model} (built or reused)")
        checkpoint = build_family_checkpoint(run.model, seed=run.seed, device=where)
    else:
        progress(f"building (or reusing) the seeded {run.model} fixture checkpoint",
                 step=f"checkpoint: seeded {run.model} (built or reused)")
        checkpoint = build_checkpoint(run.model, seed=run.seed)
    progress(f"checkpoint {checkpoint}")
    return checkpoint


def _cases(run: CompareRun, checkpoint: Path, quiet: bool) -> tuple:
    """The run's inputs: the user's clips as one case, or the default set narrowed by --case."""
    from parity.granite.cases import Case, cases_for, select_cases

    if run.clips:  # the user's clips: one case (a padded batch when several), generation included
        names = tuple(name for name, _ in run.clips)
        return (Case(f"given audio ({len(names)} clip{'s' * (len(names) > 1)})", names,
                     instructions=(run.prompt,) * len(names), generate=run.new_tokens),)
    every = member_default_cases(run.checkpoint, run.model)
    cases = select_cases(run.cases, every)
    if not cases_for(checkpoint, cases):  # before any model loads
        raise UsageError(f"--case {' / '.join(run.cases)}: names only inputs of the separate LoRA adapter "
                         "(lora_mode audio_only), and this checkpoint has no adapter files")
    if len(cases) < len(every) and not quiet:  # a verdict on part of the inputs: say so up front
        print(f"--case: {len(cases)} of the {len(every)} default inputs", file=sys.stderr)
    return cases


def _phases(run: CompareRun, checkpoint: Path, device: torch.device, dtype: torch.dtype, quiet: bool) -> str:
    """The memory schedule: --phases, or with auto both models at once (and HF in float64) if they fit."""
    from parity.capture import available_bytes, checkpoint_param_bytes

    if run.tp > 1:  # every rank holds both models (two phases are refused with --tp)
        return "one"
    if run.phases != "auto":
        return run.phases
    needed = checkpoint_param_bytes(checkpoint, dtype) * 2 * 1.25
    free = available_bytes(device)
    if free is None or needed <= free:
        return "one"
    if not quiet:  # the checks two phases drop are listed in the verdict; say it up front
        print(f"memory plan: both models need {needed / 2**30:.1f} GiB, {free / 2**30:.1f} free: two phases, "
              "which drop generation, transcribe, noise floors, the float64 check and the upcast audit "
              "(--allow-partial accepts that; --phases two asks for it)", file=sys.stderr)
    return "two"


def _print_and_write(report: dict, run: CompareRun, verbosity: int) -> None:
    """The verdict (and under -v every section's table) on stdout, then the reports and where they went."""
    from parity.report import headline, not_run_lines, render_terminal, write_html, write_json

    summary = report["summary"]
    if verbosity >= 1:
        print(render_terminal(report))
    print(headline(report), flush=True)
    if verbosity == 0:  # every planned check that did not run, with why (render_terminal has them under -v)
        for line in not_run_lines(summary):
            print(line)
    html_path, json_path = _write_outputs(
        [("--report", lambda p: write_html(report, p), run.report), ("--json", lambda p: write_json(report, p), run.json)],
        summary["verdict"].upper(),
    )
    print(f"report: {html_path}\njson: {json_path}")
    if run.save_captures is not None:
        print(f"captures: {run.save_captures}")


def _policy(run: CompareRun):
    """The verdict's policy: the causes of checks not run that this command line asked for."""
    from parity.verdict import Policy

    accepted = {"floors off"} if run.floors == "off" else set()
    accepted |= {"phases two"} if run.phases_given else set()
    accepted |= {"tensor parallel"} if run.tp > 1 else set()
    accepted |= {"reference"} if run.reference_captures is not None else set()
    return Policy(lenient=run.lenient, accepted=frozenset(accepted), allow_partial=run.allow_partial)


def run_diff(run: DiffRun) -> int:
    """The run of a checked `diff`: 0 when the diff's verdict is ok, 1 when it regressed (a probe grew past its
    bound or stopped passing, a section stopped passing, a probe or section disappeared: parity.report_diff)."""
    import json

    from parity.report import upgrade
    from parity.report_diff import (ReportFieldError, check_report_fields, diff_reports, render_diff_html,
                                    render_diff_terminal)

    for option, path, report in (("OLD", run.old_path, run.old), ("NEW", run.new_path, run.new)):
        try:  # a hand-edited or truncated report: say which file and which field, before any output
            check_report_fields(upgrade(report))
        except ReportFieldError as err:
            raise UsageError(f"{option} {path} is not a complete parity report JSON: {err}") from err
    diff = diff_reports(run.old, run.new, growth=run.growth)
    print(render_diff_terminal(diff), flush=True)
    verdict = diff["summary"]["verdict"]
    writes = []
    if run.report is not None:
        writes.append(("--report", lambda p: _write_text(p, render_diff_html(diff)), run.report))
    if run.json is not None:
        writes.append(("--json", lambda p: _write_text(p, json.dumps(diff, indent=1, allow_nan=False)), run.json))
    for (option, _, _), path in zip(writes, _write_outputs(writes, verdict)):
        print(f"{option.lstrip('-')}: {path}")
    return 0 if verdict == "ok" else 1


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def compare(args: argparse.Namespace) -> int:
    return run_compare(check_compare_args(args), verbosity=args.verbose)


def diff(args: argparse.Namespace) -> int:
    return run_diff(check_diff_args(args))


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(prog=PROG, description=__doc__, epilog=TOP_EXIT, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=version_string(PROG),
                        help="print the version of granite-speech-fms, torch, transformers and ibm-fms, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmp = sub.add_parser("compare", help="FMS vs HF, layer by layer, with a report",
                         description="Compare the FMS model against the HF reference on one checkpoint and audio, "
                                     "probe by probe; write the JSON + HTML report and print the summary.",
                         epilog=COMPARE_EXIT, formatter_class=formatter)
    cmp.add_argument("--checkpoint", type=Path, metavar="DIR",
                     help="local Hugging Face Granite Speech folder (config.json, *.safetensors only, adapter, "
                          "tokenizer, preprocessor_config.json); default: the seeded random fixture of --model")
    cmp.add_argument("--model", default=None, choices=MODEL_CHOICES,
                     help="variant of the seeded random fixture checkpoint, when no --checkpoint (default: tiny): "
                          "3.3 (tiny, 2b, 8b) or a family member (tiny-4.0, tiny-plus, tiny-5 on CPU; 4.0-1b, "
                          "4.1-2b, 4.1-2b-plus, 5.0-470m at real dimensions)")
    cmp.add_argument("--audio", type=Path, nargs="+", action="extend", default=[], metavar="CLIP",
                     help="audio files, down-mixed to mono and resampled to 16 kHz (said on stderr); several clips "
                          "make one padded batch (default: the built-in input set: clips on and past block and "
                          "window boundaries, a padded batch, text only (forward and generated), both LoRA modes, a "
                          "stereo 44.1 kHz file, bf16)")
    cmp.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT",
                     help="prompt of every clip, with <|audio|> exactly once (default: %(default)r)")
    cmp.add_argument("--device", default=None, metavar="DEVICE",
                     help="torch device for both models: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    cmp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype of both models; tolerances follow it (default: %(default)s)")
    cmp.add_argument("--mode", default="teacher-forced", choices=("propagated", "teacher-forced"),
                     help="what is compared: each side's own propagation only, or each FMS module also re-run on "
                          "HF's inputs, which names the module that is wrong (default: %(default)s)")
    cmp.add_argument("--feed", default="own", choices=("own", "hf"),
                     help="model inputs: each side from its own preprocessing (own), or HF's processor output to "
                          "both, which isolates the model from preprocessing faults (default: %(default)s)")
    cmp.add_argument("--floors", default="auto", choices=("auto", "on", "off"),
                     help="measure each probe's noise floor with HF in float64, for localisation and 16-bit gates "
                          "(auto: when an fp64 copy fits in memory; default: %(default)s)")
    rules = cmp.add_mutually_exclusive_group()
    rules.add_argument("--lenient", action="store_true",
                       help="let probes far (8x) above their noise floor, failing the float64 formula check or "
                            "missing an fp32 upcast pass as 'suspect' (the rules before they were measured sound); "
                            "the verdict line says so")
    rules.add_argument("--strict", action="store_true",
                       help="the default: those findings fail (kept for command lines written before it was)")
    cmp.add_argument("--allow-partial", action="store_true",
                     help="exit 0, not 4, when every check that ran passed but a planned one did not run (memory, "
                          "a side that raised); the report still lists each")
    cmp.add_argument("--case", action="append", default=[], metavar="TEXT",
                     help="run only the default inputs whose names contain TEXT (repeatable; a TEXT that names none "
                          "is an error listing the names), e.g. --case 'bf16 as users run it'")
    cmp.add_argument("--new-tokens", type=positive_int, default=8, metavar="N",
                     help="greedy tokens compared with HF generate for --audio clips (default: %(default)s)")
    cmp.add_argument("--fast-encoder", default="eager", choices=FAST_ENCODERS,
                     help="the audio encoder of the fast path's generation section: eager (its default), compiled "
                          "(encoder + projector through torch.compile) or flex (compiled, block attention by "
                          "flex_attention); inductor on CUDA, traced through aot_eager on the CPU (default: "
                          "%(default)s)")
    cmp.add_argument("--fast-gemv", default="cublas", choices=FAST_GEMVS,
                     help="the weight products of the fast path's decode steps in its generation section: cublas "
                          "(F.linear, its default) or splitk (the Triton split-K GEMV; CUDA) (default: %(default)s)")
    cmp.add_argument("--phases", default="auto", choices=("auto", "one", "two"),
                     help="memory schedule: both models at once (one), one at a time with HF captures on disk "
                          "(two), or decide by size (auto, the default)")
    cmp.add_argument("--tp", type=positive_int, default=1, metavar="N",
                     help="shard the FMS decoder over N ranks (FMS tensor parallelism); launch with "
                          "`torchrun --nproc-per-node N -m parity.granite compare --tp N` (default: %(default)s)")
    cmp.add_argument("--atol", type=tolerance, metavar="X",
                     help="absolute tolerance for every floating-point probe instead of the dtype's table (finite, >= 0); "
                          "token ids, lengths, masks and transcripts stay exact")
    cmp.add_argument("--rtol", type=tolerance, metavar="X",
                     help="relative tolerance for every floating-point probe instead of the dtype's table (finite, >= 0); "
                          "token ids, lengths, masks and transcripts stay exact")
    cmp.add_argument("--seed", type=nonnegative_int, default=0, metavar="N",
                     help="seed of the fixture's random weights (default: %(default)s)")
    cmp.add_argument("--max-audio-seconds", type=positive_seconds, default=DEFAULT_MAX_SECONDS, metavar="S",
                     help="refuse clips longer than S seconds (default: %(default)g)")
    cmp.add_argument("--report", type=Path, default=Path("out/report.html"), metavar="FILE",
                     help="HTML report to write (default: %(default)s)")
    cmp.add_argument("--json", type=Path, default=Path("out/report.json"), metavar="FILE",
                     help="JSON report to write, the input of `diff` (default: %(default)s)")
    cmp.add_argument("-v", "--verbose", action="count", default=0,
                     help="-v: also the per-probe tables of every section and each progress message as it comes; "
                          "-vv: also the libraries' own output (transformers' loading bars and warnings). Default: "
                          "one line per input case as it finishes, the verdict line and where the reports went")
    cmp.add_argument("--save-captures", type=Path, default=None, metavar="DIR",
                     help="also save the HF reference's captures as safetensors in DIR (new or empty), to compare "
                          "against later, in another process or on another machine")
    cmp.add_argument("--reference-captures", type=Path, default=None, metavar="DIR",
                     help="compare against HF captures saved by --save-captures in DIR instead of running HF here")

    from parity.verdict import FLOOR_FACTOR  # the diff's floor term: the verdict's floor rule

    dif = sub.add_parser("diff", help="compare two reports: did an error grow or a probe regress?",
                         description="Match the probes of two `compare --json` reports by section and name and flag\n"
                                     "those whose max |diff| grew past their own bound (--growth times the baseline\n"
                                     f"error, or {FLOOR_FACTOR:g} times that probe's baseline noise floor if larger) "
                                     "or went from\npass to not-pass, the sections that went from pass to not-pass, "
                                     "and the probes and sections\nthat disappeared (a regression) or appeared "
                                     "(listed; a regression where not passing).",
                         epilog=DIFF_EXIT, formatter_class=formatter)
    dif.add_argument("old", type=Path, metavar="OLD.json", help="the baseline report (compare --json)")
    dif.add_argument("new", type=Path, metavar="NEW.json", help="the report to check against it")
    dif.add_argument("--growth", type=growth_factor, default=10.0, metavar="X",
                     help=f"flag a probe whose max |diff| grew more than X times its baseline value, unless still "
                          f"within {FLOOR_FACTOR:g}x the probe's baseline noise floor (finite, >= 1; default: "
                          "%(default)g)")
    dif.add_argument("--report", type=Path, default=None, metavar="FILE", help="also write the diff as HTML here")
    dif.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the diff as JSON here")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    return {"compare": compare, "diff": diff}[args.command](args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `granite-speech-parity` command: returns the exit code (0 holds, 1 fails, 2 usage/input, 3 internal)."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
