"""Mutation testing of the parity harness: is every source-level porting mistake of `parity.granite.mutants` caught by
`compare` (and by the suites), and is it localised to the module that was mutated?

    python -m parity.granite.mutate [--only NAME ...] [--jobs 2] [--suites] [--json out.json] [--lenient]

For each mutant the `granite_speech` package is copied to a temporary directory, the one edit is applied, and
`compare` (`parity.granite.pipeline.compare_report` on its default inputs, the seeded tiny fixture, CPU) runs in a
worker whose `sys.path` starts with that directory, so the mutated package is the one imported (each worker checks
`granite_speech.__file__`; `parity` comes from the run's snapshot of this checkout). Each worker is a fork of one warm
interpreter that has imported torch and transformers but neither package (`parity.granite.zygote`), which is the
fresh `python -m` it replaces less the import time. The unmutated package goes through the
same path first: the baseline. A mutant counts as caught only where its report differs from the baseline's: a
section that passed at baseline fails now (sections already red at baseline cannot count; a regression inside them
is listed, as `red-only`, but not counted).

`compare` runs as users run it: default flags, where noise-floor, float64-formula and upcast findings fail. Per
mutant: caught (a baseline-green section fails), sharp-only (caught, but every newly failing section fails only by
those sharp rules: `compare --lenient` would miss it), suspect-only (with --lenient: a new suspect in a
baseline-green section, never counted as caught), crash (compare raised instead of reporting: counted as caught but listed
separately, since a mutant that makes compare crash is a harness weakness), the first divergence / own error /
suspect of the first newly failing section, localised (either of the first two matches the mutant's `expect`), wall
time; with `--suites`, whether `pytest suites/ --model tiny -x -q -p no:cacheprovider` fails on the mutated copy
(tests already failing at baseline deselected) and its first failing test.

Exit status: 0 when every selected mutant was caught by compare and
localised at the 90% bar, 1 otherwise, 2 on bad usage, 3 when the baseline itself could not run.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from parity.granite.mutants import CATALOGUE, PACKAGE_DIR, Mutant, by_name
from parity.granite.zygote import WORKER_PRELOAD, Zygote, ZygoteError
from parity.verdict import SHARP_RULES

REPO_ROOT = PACKAGE_DIR.parent
PACKAGE_ENV = "PARITY_MUTATE_PACKAGE_DIR"  # the worker refuses to run unless granite_speech is imported from here
PARITY_ENV = "PARITY_MUTATE_PARITY_DIR"  # ... and parity from the run's snapshot of this checkout's parity
LOCALISED_BAR = 0.9
GROWTH = 10.0  # a probe of a baseline-red section whose max |diff| grew this much counts as a regression there
SUITES_ARGS = ("suites/", "--model", "tiny", "-x", "-q", "-p", "no:cacheprovider")
# the catalogue's own test fails on every mutated copy by construction (the mutated snippet is gone) and would run
# the runner recursively: never part of a mutant's suite run
SUITES_IGNORE = ("suites/test_mutants.py",)
EXIT_ISOLATION = 4
WORKER_TIMEOUT_S = 900
SUITES_TIMEOUT_S = 900


class IsolationError(RuntimeError):
    """A worker imported another copy of the packages than its own: every row of the run would be void."""


# ---------------------------------------------------------------------------------------------------------------
# worker: one compare run inside the subprocess


def _compact(report: dict) -> dict:
    """What the runner needs of a report: per section the verdict, the firsts, and per probe status / max |diff|."""
    sections = []
    for section in report["sections"]:
        summary = section["summary"]
        probes = {}
        for probe in section["result"]["probes"]:
            prop = probe.get("propagated") or {}
            metrics = prop.get("metrics") or {}
            probes[probe["name"]] = {
                "status": prop.get("status"),
                "max_abs": metrics.get("max_abs"),
                "mean_abs": metrics.get("mean_abs"),
                "floor_ratio": probe.get("floor_ratio"),
                "own_floor_ratio": probe.get("own_floor_ratio"),
                "teacher_status": (probe.get("teacher") or {}).get("status"),
                "suspect": bool(probe.get("suspect")),
                "detail": str(prop.get("detail", ""))[:300],
            }
        firsts = {key: (summary.get(key) or {}).get("name")
                  for key in ("first_divergence", "first_own_error", "first_suspect")}
        sections.append({"title": section["title"], "kind": section["kind"], "verdict": summary["verdict"],
                         "rules": summary.get("rules") or {}, **firsts, "probes": probes})
    return {"verdict": report["summary"]["verdict"], "sections": sections}


def select_cases(substrings: Sequence[str]):
    """The default cases of compare whose names contain one of `substrings` (all of them for none)."""
    from parity.granite.cases import default_cases
    from parity.granite.cases import select_cases as select

    return select(substrings, default_cases())


def _worker(args: argparse.Namespace) -> int:
    import granite_speech
    import parity

    expected = os.environ.get(PACKAGE_ENV)
    where = Path(granite_speech.__file__).resolve()
    if not expected or Path(expected).resolve() not in where.parents:
        print(f"isolation failure: granite_speech imported from {where}, expected under {expected}", file=sys.stderr)
        return EXIT_ISOLATION
    parity_dir = Path(os.environ.get(PARITY_ENV) or REPO_ROOT / "parity").resolve()
    if Path(parity.__file__).resolve().parent != parity_dir:
        print(f"isolation failure: parity imported from {parity.__file__}, expected {parity_dir}", file=sys.stderr)
        return EXIT_ISOLATION
    import torch

    from parity.granite.pipeline import compare_report
    from parity.verdict import Policy

    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    cases = select_cases(args.case) if args.case else None
    report = compare_report(Path(args.checkpoint), seeded="tiny", cases=cases, dtype=torch.float32, device="cpu",
                            policy=Policy(lenient=args.lenient), seed=0, fast_encoder=args.fast_encoder,
                            fast_gemv=args.fast_gemv,
                            progress=lambda message: print(message, file=sys.stderr, flush=True))
    record = _compact(report)
    record["granite_speech"] = str(where.parent)
    Path(args.out).write_text(json.dumps(record))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# runner: copies, subprocesses, classification


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


class Snapshot:
    """The checkout as it was when the run started: granite_speech (the source of every mutant copy), parity (what
    every worker imports) and the suites with their pytest config. Others may edit the checkout during a run of
    minutes; the baseline and every mutant must see the same harness and the same unmutated sources."""

    def __init__(self, root: Path):
        self.root = root
        self.package = root / "granite_speech"
        self.parity_path = root / "harness"  # on PYTHONPATH: holds parity/ only, so granite_speech never comes from it
        shutil.copytree(PACKAGE_DIR, self.package, ignore=_IGNORE)
        shutil.copytree(REPO_ROOT / "parity", self.parity_path / "parity", ignore=_IGNORE)
        # the fixtures' data, where the copy of parity/granite/fixtures/paths.py looks (the checkout's fixtures/)
        shutil.copytree(REPO_ROOT / "fixtures", self.parity_path / "fixtures", ignore=_IGNORE)
        shutil.copytree(REPO_ROOT / "suites", root / "suites", ignore=_IGNORE)
        for name in ("conftest.py", "pyproject.toml"):
            shutil.copy2(REPO_ROOT / name, root / name)


def _copy_package(snapshot: Snapshot, destination: Path) -> Path:
    target = destination / "granite_speech"
    shutil.copytree(snapshot.package, target)
    return target


def _base_environment(threads: int) -> dict:
    """What every worker's interpreter needs before torch and transformers are imported (the zygote's too)."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    # Triton kernels (`--fast-gemv splitk`) run on the CPU through Triton's interpreter, which Triton reads when it is
    # first imported: by the zygote, with torch._dynamo
    env["TRITON_INTERPRET"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _environment(snapshot: Snapshot, workdir: Path, threads: int) -> dict:
    env = _base_environment(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), str(snapshot.parity_path)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env[PACKAGE_ENV] = str(workdir / "granite_speech")
    env[PARITY_ENV] = str(snapshot.parity_path / "parity")
    return env


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def crash_site(stderr: str, package_dir: Path) -> Optional[str]:
    """'model.py:210 embed_inputs': the innermost traceback frame inside the (mutated) granite_speech copy."""
    prefix = str(package_dir)
    sites = [f"{Path(f).relative_to(prefix)}:{line} {fn}" for f, line, fn in _FRAME.findall(stderr)
             if f.startswith(prefix + os.sep)]
    return sites[-1] if sites else None


def _run_compare(zygote: Zygote, snapshot: Snapshot, workdir: Path, checkpoint: Path, lenient: bool, threads: int,
                 timeout: float, cases: Sequence[str] = (), compare_args: Sequence[str] = ()) -> dict:
    """compare on the package copy in `workdir`, in a fork of the zygote: {"record": compact report} or
    {"crash": why, "stderr": tail}."""
    out = workdir / "report.json"
    cmd = ["-m", "parity.granite.mutate", "--worker", "--checkpoint", str(checkpoint),
           "--out", str(out), *compare_args] + (["--lenient"] if lenient else [])
    for case in cases:
        cmd += ["--case", case]
    try:
        proc = zygote.run(cmd, cwd=workdir, env=_environment(snapshot, workdir, threads), timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"crash": f"timeout after {timeout:g} s", "stderr": _tail(str(err.stderr or ""))}
    if proc.returncode == EXIT_ISOLATION:
        raise IsolationError(f"the worker did not import the mutated copy: {_tail(proc.stderr, 3)}")
    if proc.returncode != 0 or not out.is_file():
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"crash": last[-1][:300] if last else f"exit {proc.returncode}", "returncode": proc.returncode,
                "crash_site": crash_site(proc.stderr, workdir / "granite_speech"), "stderr": _tail(proc.stderr, 25)}
    return {"record": json.loads(out.read_text())}


def _prepare_suite_tree(snapshot: Snapshot, workdir: Path) -> None:
    """A mini checkout around the package copy: conftest, pytest config and the suites (copied from the snapshot,
    so their REPO_ROOT is the copy), results/ linked."""
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy2(snapshot.root / name, workdir / name)
    shutil.copytree(snapshot.root / "suites", workdir / "suites")
    for name in ("results", "fixtures"):
        if (REPO_ROOT / name).exists() and not (workdir / name).exists():
            (workdir / name).symlink_to(REPO_ROOT / name)
    if not (workdir / "parity").exists():  # suites that read the checkout's layout (test_architecture) find it
        (workdir / "parity").symlink_to(snapshot.parity_path / "parity")


_FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")


def _run_suites(snapshot: Snapshot, workdir: Path, threads: int, timeout: float, deselect: Sequence[str] = (),
                stop_first: bool = True) -> dict:
    _prepare_suite_tree(snapshot, workdir)
    args = list(SUITES_ARGS) if stop_first else [a for a in SUITES_ARGS if a != "-x"]
    cmd = [sys.executable, "-m", "pytest", *args, "-rfE", "--rootdir", str(workdir), "-c",
           str(workdir / "pyproject.toml")]
    for path in SUITES_IGNORE:
        cmd += ["--ignore", path]
    for node in deselect:
        cmd += ["--deselect", node]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=_environment(snapshot, workdir, threads), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": True, "first_failure": f"timeout after {timeout:g} s", "failures": [], "returncode": None,
                "wall_s": round(time.monotonic() - start, 1)}
    failures = [m.group(2) for m in map(_FAILED_LINE.match, proc.stdout.splitlines()) if m]
    failed = proc.returncode not in (0, 5)
    first = failures[0] if failures else (_tail(proc.stdout + proc.stderr, 1) if failed else None)
    return {"failed": failed, "first_failure": first, "failures": failures, "returncode": proc.returncode,
            "wall_s": round(time.monotonic() - start, 1), "tail": _tail(proc.stdout, 3)}


def _grew(base: Optional[float], now: Optional[float]) -> bool:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    base, now = num(base), num(now)
    if now is None or base is None:
        return False
    if now != now:  # NaN now, a number before
        return True
    return now > GROWTH * max(base, 1e-12)


def classify(mutant: Mutant, baseline: dict, outcome: dict) -> dict:
    """Caught (sharp-only or not) / suspect-only / crash / red-only / missed, the firsts of the first newly failing
    section, localised."""
    row: Dict[str, object] = {"caught": False, "sharp_only": False, "suspect_only": False, "crash": None,
                              "red_only": False,
                              "new_fail_sections": [], "first_divergence": None, "first_own_error": None,
                              "first_suspect": None, "section": None, "localised": False, "red_regressions": []}
    if "crash" in outcome:
        row.update(caught=True, crash=outcome["crash"], crash_site=outcome.get("crash_site"),
                   stderr=outcome.get("stderr"))
        return row
    base = {s["title"]: s for s in baseline["sections"]}
    record = outcome["record"]
    first_new = None
    new_suspect = None
    for section in record["sections"]:
        before = base.get(section["title"])
        green_before = before is None or before["verdict"] == "pass"
        if section["verdict"] != "pass" and green_before:
            row["new_fail_sections"].append(section["title"])
            first_new = first_new or section
        elif section["verdict"] != "pass" and not green_before:
            for name, probe in section["probes"].items():
                old = before["probes"].get(name) or {}
                if probe["status"] != "pass" and (old.get("status") == "pass" or _grew(old.get("max_abs"),
                                                                                      probe["max_abs"])):
                    row["red_regressions"].append(f"{_short(section['title'])}: {name}")
        if green_before and new_suspect is None:
            old_suspects = {n for n, p in (before or {"probes": {}})["probes"].items() if p.get("suspect")}
            fresh = [n for n, p in section["probes"].items() if p.get("suspect") and n not in old_suspects]
            if fresh:
                new_suspect = (section, fresh[0])
    if first_new is not None:
        row.update(caught=True, section=first_new["title"], first_divergence=first_new["first_divergence"],
                   first_own_error=first_new["first_own_error"], first_suspect=first_new["first_suspect"])
        row["sharp_only"] = all(set(s.get("rules") or {"gate": 1}) <= set(SHARP_RULES) for s in record["sections"]
                                if s["title"] in row["new_fail_sections"])
        row["localised"] = mutant.localised(first_new["first_divergence"]) or mutant.localised(
            first_new["first_own_error"])
        name = first_new["first_divergence"] or first_new["first_own_error"]
        if name and name in first_new["probes"]:
            row["detail"] = first_new["probes"][name]["detail"]
    elif new_suspect is not None:
        section, name = new_suspect
        row.update(suspect_only=True, section=section["title"], first_suspect=name,
                   localised=mutant.localised(name))
    elif row["red_regressions"]:
        row["red_only"] = True
    return row


def _short(title: str) -> str:
    """'padded batch of 3 (...) · generation: fast path vs HF generate' -> 'padded batch of 3 · fast'."""
    case, _, part = title.partition(" · ")
    case = re.sub(r"\s*\(.*?\)", "", case).strip()
    part = {"preprocessing": "pre", "model": "model"}.get(part, "eager" if "eager" in part else
                                                          "fast, static prefill" if "static prefill" in part else
                                                          "fast, flex encoder" if "flex encoder" in part else
                                                          "fast, compiled encoder" if "compiled encoder" in part else
                                                          "fast" if "fast" in part else part)
    return f"{case} · {part}"


def _outcome_label(row: dict) -> str:
    if row.get("crash"):
        return "crash"
    if row["caught"]:
        return "caught"
    if row["suspect_only"]:
        return "suspect-only"
    if row["red_only"]:
        return "red-only"
    return "MISSED"


def run_mutant(mutant: Mutant, *, zygote: Zygote, snapshot: Snapshot, checkpoint: Path, baseline: dict,
               lenient: bool, suites: bool, suite_baseline_failures: Sequence[str], threads: int, timeout: float,
               keep: Optional[Path], cases: Sequence[str] = ()) -> dict:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        workdir = Path(tmp)
        package = _copy_package(snapshot, workdir)
        mutant.apply(package)
        outcome = _run_compare(zygote, snapshot, workdir, checkpoint, lenient, threads, timeout, cases,
                               mutant.compare_args)
        compare_s = time.monotonic() - start
        row = {"name": mutant.name, "file": mutant.file, "kind": mutant.kind, "expect": list(mutant.expect),
               "why": mutant.why}
        row.update(classify(mutant, baseline, outcome))
        row["outcome"] = _outcome_label(row)
        row["compare_s"] = round(compare_s, 1)
        if keep is not None and "record" in outcome:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{mutant.name}.json").write_text(json.dumps(outcome["record"]))
        if suites:
            row["suites"] = _run_suites(snapshot, workdir, threads, timeout, deselect=suite_baseline_failures)
    row["wall_s"] = round(time.monotonic() - start, 1)
    return row


def run_baseline(zygote: Zygote, snapshot: Snapshot, checkpoint: Path, lenient: bool, threads: int,
                 timeout: float, cases: Sequence[str] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        workdir = Path(tmp)
        _copy_package(snapshot, workdir)
        outcome = _run_compare(zygote, snapshot, workdir, checkpoint, lenient, threads, timeout, cases)
    if "crash" in outcome:
        raise RuntimeError(f"compare crashed on the unmutated package: {outcome['crash']}\n"
                           f"{outcome.get('stderr', '')}")
    return outcome["record"]


def run_suite_baseline(snapshot: Snapshot, threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-suites-") as tmp:
        workdir = Path(tmp)
        _copy_package(snapshot, workdir)
        return _run_suites(snapshot, workdir, threads, timeout, stop_first=False)


# ---------------------------------------------------------------------------------------------------------------
# reporting


def counts(rows: Sequence[dict], *, suites: bool = False) -> dict:
    total = len(rows)
    caught = [r for r in rows if r["caught"]]
    reported = [r for r in rows if r["caught"] and not r.get("crash")]
    out = {
        "mutants": total,
        "caught_by_compare": len(caught),
        "caught_reported": len(reported),
        "caught_crash": sum(1 for r in rows if r.get("crash")),
        "sharp_only": sum(1 for r in rows if r.get("sharp_only")),
        "suspect_only": sum(1 for r in rows if r.get("suspect_only")),
        "red_only": sum(1 for r in rows if r["red_only"]),
        "missed": sum(1 for r in rows if r["outcome"] == "MISSED"),
        "localised": sum(1 for r in rows if r["localised"] and not r.get("crash")),
    }
    out["caught_pct"] = round(100.0 * out["caught_by_compare"] / total, 1) if total else 0.0
    out["localised_pct"] = round(100.0 * out["localised"] / total, 1) if total else 0.0
    if suites:
        out["caught_by_suites"] = sum(1 for r in rows if (r.get("suites") or {}).get("failed"))
        out["caught_by_either"] = sum(1 for r in rows if r["caught"] or (r.get("suites") or {}).get("failed"))
    return out


def table(rows: Sequence[dict], *, suites: bool = False, markdown: bool = False) -> str:
    head = ["mutant", "kind", "file", "compare", "localised", "first divergence / own error", "section"]
    if suites:
        head.append("suites")
    head.append("s")
    lines = []
    for r in rows:
        if r.get("crash"):
            where = f"crash at {r.get('crash_site')}: {r['crash']}"
        elif r["caught"]:
            where = " / ".join(str(x) for x in (r["first_divergence"], r["first_own_error"]))
        elif r["suspect_only"]:
            where = f"suspect {r['first_suspect']}"
        elif r["red_only"]:
            where = "only in red: " + ", ".join(r["red_regressions"][:2])
        else:
            where = "-"
        cells = [r["name"], r["kind"], r["file"], r["outcome"], "yes" if r["localised"] else "no",
                 where[:90], _short(r["section"]) if r.get("section") else ""]
        if suites:
            s = r.get("suites") or {}
            cells.append(("FAIL " + str(s.get("first_failure") or "")).strip()[:70] if s.get("failed") else "pass")
        cells.append(f"{r['wall_s']:.0f}")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in lines])


def _machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parity.granite.mutate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default: %(default)s)")
    parser.add_argument("--suites", action="store_true", help="also run the suites on every mutant")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as markdown here")
    parser.add_argument("--lenient", action="store_true",
                        help="compare --lenient (noise-floor, formula and upcast findings only mark suspects, never "
                             "counted as caught): what the harness caught before those rules failed by default")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S, metavar="S",
                        help="per compare / suites run (default: %(default)g)")
    parser.add_argument("--keep-reports", type=Path, metavar="DIR", help="keep each mutant's compact report here")
    parser.add_argument("--case", action="append", default=[], metavar="TEXT",
                        help="run compare on the default cases whose name contains TEXT only (repeatable; default: "
                             "every case). For quick checks: the results are not comparable with full runs")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument("--check", action="store_true", help="check every snippet applies to the sources and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--fast-encoder", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--fast-gemv", default="cublas", help=argparse.SUPPRESS)
    return parser


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    try:
        mutants = by_name(args.only) if args.only else list(CATALOGUE)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:48} {m.kind:13} {m.file:18} {m.why}")
        return 0
    problems = [p for p in (m.check() for m in mutants) if p]
    if args.check or problems:
        for problem in problems:
            print(f"stale: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(f"{len(mutants)} mutants apply to {PACKAGE_DIR}")
        return 0
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        select_cases(args.case)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from parity.granite.fixtures import build_checkpoint

    start = time.monotonic()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    checkpoint = build_checkpoint("tiny")
    _say(f"[{time.monotonic() - start:6.1f}s] checkpoint {checkpoint}; {len(mutants)} mutants, {args.jobs} jobs x "
         f"{threads} threads")
    with tempfile.TemporaryDirectory(prefix="mutation-run-") as run_dir, \
            Zygote(WORKER_PRELOAD, _base_environment(threads)) as zygote:
        snapshot = Snapshot(Path(run_dir))
        return _run_all(args, mutants, snapshot, checkpoint, threads, start, zygote)


def _run_all(args: argparse.Namespace, mutants: Sequence[Mutant], snapshot: Snapshot, checkpoint: Path,
             threads: int, start: float, zygote: Zygote) -> int:
    try:
        baseline, suite_baseline = _baselines(args, snapshot, checkpoint, zygote, start)
    except Exception as err:  # noqa: BLE001 - the baseline must run, or nothing can be judged
        print(f"error: {err}", file=sys.stderr)
        return 3
    kwargs = dict(zygote=zygote, snapshot=snapshot, checkpoint=checkpoint, baseline=baseline, lenient=args.lenient,
                  suites=args.suites, suite_baseline_failures=(suite_baseline or {}).get("failures", []),
                  threads=threads, timeout=args.timeout, keep=args.keep_reports, cases=args.case)
    try:
        rows = _mutant_rows(args, mutants, kwargs, start)
    except (IsolationError, ZygoteError) as err:  # every row of the run would be void
        print(f"error: {err}", file=sys.stderr)
        return 3
    total_s = round(time.monotonic() - start, 1)
    tally = counts(rows, suites=args.suites)
    print(table(rows, suites=args.suites))
    print()
    print(summary_line(tally, total_s, suites=args.suites))
    red = [s["title"] for s in baseline["sections"] if s["verdict"] != "pass"]
    if red:
        print(f"baseline is red in {len(red)} sections, which cannot count: {', '.join(map(_short, red))}")
    _write_results(args, rows, tally, baseline, suite_baseline, checkpoint=checkpoint, threads=threads,
                   total_s=total_s)
    caught_all = tally["caught_by_compare"] == tally["mutants"]
    return 0 if caught_all and tally["localised"] >= LOCALISED_BAR * tally["mutants"] else 1


def _baselines(args: argparse.Namespace, snapshot: Snapshot, checkpoint: Path, zygote: Zygote,
               start: float) -> Tuple[dict, Optional[dict]]:
    """(compare's compact report, the suites' run or None) on the unmutated package."""
    _say(f"[{time.monotonic() - start:6.1f}s] baseline compare on the unmutated package")
    baseline = run_baseline(zygote, snapshot, checkpoint, args.lenient, os.cpu_count() or 1, args.timeout, args.case)
    if args.keep_reports is not None:
        args.keep_reports.mkdir(parents=True, exist_ok=True)
        (args.keep_reports / "_baseline.json").write_text(json.dumps(baseline))
    red = [s["title"] for s in baseline["sections"] if s["verdict"] != "pass"]
    _say(f"[{time.monotonic() - start:6.1f}s] baseline: {baseline['verdict']}"
         + (f"; red sections (cannot count): {red}" if red else ""))
    if not args.suites:
        return baseline, None
    _say(f"[{time.monotonic() - start:6.1f}s] baseline suites on the unmutated package")
    suite_baseline = run_suite_baseline(snapshot, os.cpu_count() or 1, args.timeout)
    _say(f"[{time.monotonic() - start:6.1f}s] baseline suites: {suite_baseline['tail']!r}; failing at "
         f"baseline (deselected for the mutants): {suite_baseline['failures']}")
    return baseline, suite_baseline


def _mutant_rows(args: argparse.Namespace, mutants: Sequence[Mutant], kwargs: dict, start: float) -> List[dict]:
    """Each mutant's row, `args.jobs` at a time, in catalogue order; a runner error is a MISSED row of its own."""
    rows: List[dict] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_mutant, m, **kwargs): m for m in mutants}
        for future in as_completed(futures):
            mutant = futures[future]
            try:
                row = future.result()
            except (IsolationError, ZygoteError):
                raise
            except Exception as err:  # noqa: BLE001 - one broken mutant must not end the run
                row = {"name": mutant.name, "file": mutant.file, "kind": mutant.kind, "expect": list(mutant.expect),
                       "why": mutant.why, "caught": False, "sharp_only": False, "suspect_only": False,
                       "red_only": False, "localised": False, "crash": None, "section": None,
                       "runner_error": "".join(traceback.format_exception_only(type(err), err)).strip(),
                       "outcome": "MISSED", "wall_s": 0.0}
            rows.append(row)
            suites_note = ""
            if args.suites:
                s = row.get("suites") or {}
                suites_note = f"; suites {'FAIL ' + str(s.get('first_failure')) if s.get('failed') else 'pass'}"
            _say(f"[{time.monotonic() - start:6.1f}s] {len(rows)}/{len(mutants)} {mutant.name}: {row['outcome']}"
                 f"{' localised' if row['localised'] else ''} ({row.get('first_divergence') or row.get('crash')})"
                 f"{suites_note}")
    order = {m.name: i for i, m in enumerate(mutants)}
    return sorted(rows, key=lambda r: order[r["name"]])


def _write_results(args: argparse.Namespace, rows: List[dict], tally: dict, baseline: dict,
                   suite_baseline: Optional[dict], *, checkpoint: Path, threads: int, total_s: float) -> None:
    result = {
        "schema": "parity-mutation/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "jobs": args.jobs, "threads_per_job": threads, "lenient": args.lenient,
        "checkpoint": str(checkpoint), "cases": args.case or "all default cases", "wall_s": total_s,
        "counts": tally,
        "baseline": {"verdict": baseline["verdict"],
                     "sections": [{"title": s["title"], "verdict": s["verdict"],
                                   "first_divergence": s["first_divergence"]} for s in baseline["sections"]]},
        "suite_baseline": suite_baseline, "mutants": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"json: {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table(rows, suites=args.suites, markdown=True) + "\n")
        print(f"markdown: {args.markdown}")


def summary_line(tally: dict, total_s: float, *, suites: bool = False) -> str:
    line = (f"caught by compare: {tally['caught_by_compare']}/{tally['mutants']} ({tally['caught_pct']}%; "
            f"{tally['caught_crash']} by a crash, {tally['sharp_only']} only by sharp rules (missed with --lenient), {tally['suspect_only']} suspect-only, {tally['red_only']} only in "
            f"baseline-red sections, {tally['missed']} missed); localised: {tally['localised']}/{tally['mutants']} "
            f"({tally['localised_pct']}%)")
    if suites:
        line += f"; caught by suites: {tally['caught_by_suites']}/{tally['mutants']}"
    return line + f"; wall {total_s:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
