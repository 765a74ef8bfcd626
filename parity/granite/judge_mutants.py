"""Mutants of the judge: realistic mistakes planted in `parity/` itself, each of which the harness's own tests must
catch. A harness whose verdict code can be broken without a red test is a harness that can be talked into PASS.

    python -m parity.granite.judge_mutants [--only NAME ...] [--json FILE]

For each mutant the checkout's `parity/`, `granite_speech/`, suites and pytest config are copied into a fresh
folder, the one edit is applied to the copy of `parity/`, and `JUDGE_SUITES` run there (`pytest -x`, in a fork of a
warm interpreter that has imported torch and transformers: `parity.granite.zygote`): the copy is the one imported
(the runner checks `parity.__file__` first). Caught = a test fails. Exit 0 when every mutant was
caught, 1 otherwise. The unmutated copy runs first: a red baseline stops the run (exit 3).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

from parity.granite.mutants import Mutant, by_name_in
from parity.granite.zygote import WORKER_PRELOAD, Zygote

REPO_ROOT = Path(__file__).resolve().parents[2]
PARITY_DIR = REPO_ROOT / "parity"
# the tests of the judge: rules, comparisons, floors, ties, reports, report diffs (about a minute on 2 CPU cores)
JUDGE_SUITES = ("suites/test_verdict.py", "suites/test_generation_ties.py", "suites/test_sharper_judgements.py",
                "suites/test_report.py", "suites/test_report_diff.py", "suites/test_harness_mechanics.py")
# fails on every mutated copy by construction (the mutated snippet is gone from the copy it reads): never counted
SELF_CHECK = "suites/test_verdict.py::test_every_judge_mutant_applies_to_the_current_sources"


def _judge(name: str, file: str, old: str, new: str, why: str) -> Mutant:
    return Mutant(name, file, old, new, ("(a test)",), "judge", why)


CATALOGUE = (
    _judge("verdict_teacher_raised_ignored", "verdict.py",
           'not in (PASS, *NO_VERDICT):\n        broken.append("own")',
           'in ("fail",):\n        broken.append("own")',
           "only a teacher-forced FAIL counts: a module whose re-run raised or compared nothing passes"),
    _judge("verdict_empty_section_passes", "verdict.py",
           'return {"verdict": FAIL, "why": "no probe was judged in this section"',
           'return {"verdict": PASS, "why": "no probe was judged in this section"',
           "a section with no probe passes"),
    _judge("verdict_nan_ratio_below_floor", "verdict.py",
           "(value > factor or value != value)", "value > factor",
           "a NaN floor ratio compares False and passes"),
    _judge("verdict_lenient_excuses_everything", "verdict.py",
           "if not (policy.lenient and rule in SHARP_RULES)]", "if not policy.lenient]",
           "--lenient also excuses the gate and own errors"),
    _judge("verdict_not_run_never_counted", "verdict.py",
           'if record.get("cause") not in policy.accepted]', 'if record.get("cause") in policy.accepted]',
           "the accepted causes inverted: checks dropped unasked leave the run PASS"),
    _judge("tolerance_exact_loosened_by_overrides", "tolerances.py",
           'if tolerance_class == "exact":  #', 'if tolerance_class == "exact" and not overrides:  #',
           "the old rule: any --atol/--rtol loosens token ids, lengths and masks"),
    _judge("compare_integers_not_forced_exact", "diff.py",
           "        tol = EXACT\n    shapes = dict(", "        pass\n    shapes = dict(",
           "integer tensors judged with a float tolerance: ids 130 and 131 equal under --rtol 0.01"),
    _judge("floor_gate_tensor_wide", "diff.py",
           "(diff > factor * floors[:, None])", "(diff > factor * floors.max())",
           "the 16-bit floor gate from the largest rounding error anywhere in the tensor"),
    _judge("near_tie_excused_in_float32", "diff.py",
           "    if run_dtype not in FLOOR_GATED_DTYPES:\n        return {}\n    ties, parted",
           "    ties, parted",
           "a flipped greedy token excused in float32, where no rounding explains it"),
    _judge("nonfinite_patterns_not_checked", "diff.py",
           "    if patterns_differ:\n        status = Status.NONFINITE",
           "    if False:\n        status = Status.NONFINITE",
           "a NaN on one side only is dropped from the comparison and the rest passes"),
    _judge("first_divergence_in_table_order", "diff.py",
           "    for result in _execution_sorted(results):\n        if probe_rules(",
           "    for result in results:\n        if probe_rules(",
           "the first divergence named in table order, not in the order the modules ran"),
    _judge("report_section_verdict_gate_only", "report.py",
           '        "verdict": judged["verdict"],\n        "why": judged["why"],\n        "rules"',
           '        "verdict": "pass" if all(p["propagated"]["status"] == "pass" for p in probes) else "fail",\n'
           '        "why": judged["why"],\n        "rules"',
           "a second verdict in the report from the gate alone: sharp and own failures print PASS"),
    _judge("report_run_verdict_first_section_only", "report.py",
           'judged = run_verdict([s["summary"]["verdict"] for s in sections], not_run, policy)',
           'judged = run_verdict([s["summary"]["verdict"] for s in sections[:1]], not_run, policy)',
           "the run's verdict from its first section: a later failing section leaves it PASS"),
    _judge("diff_disappeared_probe_passes", "report_diff.py",
           '"fails": new is None or (old is None and new["status"] != _PASS)}',
           '"fails": old is None and new["status"] != _PASS}',
           "`diff`: a probe of the baseline that vanished from the new report is listed but passes"),
    _judge("diff_bound_from_the_new_floor", "report_diff.py",
           'bound = _bound(old_abs, _float(o["noise_floor"]),', 'bound = _bound(old_abs, _float(n.get("noise_floor")),',
           "`diff`: the bound taken from the new report's floor, which a regression can itself inflate"),
    _judge("masked_elements_compared", "diff.py",
           "        finite &= in_mask\n", "",
           "masked positions compared like any other: a fully masked probe passes instead of 'empty', and padding "
           "that matches counts as a match"),
)


def by_name(names: Sequence[str]) -> List[Mutant]:
    return by_name_in(CATALOGUE, names)


def _tree(workdir: Path) -> Path:
    """A mini checkout: parity/ (to mutate), granite_speech/, the suites, the pytest configuration, results/."""
    for name in ("parity", "granite_speech", "suites", "fixtures"):  # fixtures/: the data parity's builders read
        shutil.copytree(REPO_ROOT / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / name, workdir / name)
    (workdir / "results").symlink_to(REPO_ROOT / "results")  # reports of earlier runs some tests read
    return workdir / "parity"


def _env() -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


def run_suites(zygote: Zygote, workdir: Path, timeout: float) -> dict:
    """JUDGE_SUITES on the copy in `workdir`, in a fork of the zygote: {"failed", "first_failure", "wall_s"}."""
    check = subprocess.run([sys.executable, "-c", "import parity; print(parity.__file__)"], cwd=workdir, env=_env(),
                           capture_output=True, text=True)
    if not check.stdout.strip().startswith(str(workdir)):
        raise RuntimeError(f"the copy is not the one imported: parity from {check.stdout.strip() or check.stderr}")
    start = time.monotonic()
    cmd = ["-m", "pytest", *JUDGE_SUITES, "--model", "tiny", "-x", "-q", "-p", "no:cacheprovider", "-rfE",
           "--rootdir", str(workdir), "--deselect", SELF_CHECK]
    proc = zygote.run(cmd, cwd=workdir, env=_env(), timeout=timeout)
    failures = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"failed": proc.returncode not in (0, 5), "returncode": proc.returncode,
            "first_failure": failures[0] if failures else None, "wall_s": round(time.monotonic() - start, 1)}


def run_one(zygote: Zygote, mutant, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"judge-{mutant.name if mutant else 'baseline'}-") as tmp:
        parity_copy = _tree(Path(tmp))
        if mutant is not None:
            mutant.apply(parity_copy)
        return run_suites(zygote, Path(tmp), timeout)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.granite.judge_mutants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run these mutants only")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the rows here")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per pytest run")
    args = parser.parse_args(argv)
    mutants = by_name(args.only) if args.only else list(CATALOGUE)
    with Zygote(WORKER_PRELOAD, _env()) as zygote:
        return _run_all(zygote, mutants, args)


def _run_all(zygote: Zygote, mutants: Sequence, args: argparse.Namespace) -> int:
    baseline = run_one(zygote, None, args.timeout)
    print(f"baseline: {'RED' if baseline['failed'] else 'green'} in {baseline['wall_s']} s", flush=True)
    if baseline["failed"]:
        print(f"the unmutated judge fails {baseline['first_failure']}: fix that first", file=sys.stderr)
        return 3
    rows = []
    for mutant in mutants:
        row = {"name": mutant.name, "file": f"parity/{mutant.file}", "why": mutant.why,
               **run_one(zygote, mutant, args.timeout)}
        rows.append(row)
        print(f"{'caught' if row['failed'] else 'MISSED':7} {mutant.name:42} {row['first_failure'] or ''} "
              f"({row['wall_s']} s)", flush=True)
    caught = sum(r["failed"] for r in rows)
    print(f"{caught} / {len(rows)} judge mutants caught by {', '.join(JUDGE_SUITES)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suites": JUDGE_SUITES, "baseline": baseline, "rows": rows,
                                         "caught": caught, "mutants": len(rows)}, indent=1))
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
