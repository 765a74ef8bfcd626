"""The verdict's rules (`parity.verdict`), each planted where it must fail, on hand-made records: exact checks stay
exact whatever the overrides, a teacher-forced failure fails, an empty section fails, a 16-bit element is judged
against its own row's floor, sharp findings fail unless --lenient, a planned check that did not run makes the run
incomplete unless asked for, and every reader of a report gets the one verdict."""

import math

import pytest
import torch

from parity.capture import pair_from_values
from parity.diff import FLOOR_GATE, Comparison, Status, compare, diff_captures
from parity.probes import Probe
from parity.report import build_multi_report, render_terminal, verdict_line
from parity.tolerances import EXACT, tolerance_for
from parity.verdict import (FAIL, INCOMPLETE, PASS, Policy, failing_rules, not_run_record, run_verdict,
                            section_verdict)

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # rules on hand-made records; the CLI test is marked on its own

LOOSE = {"atol": 0.01, "rtol": 0.01}


# ---------------------------------------------------------------------------------------------- exact is exact
@pytest.mark.parametrize("overrides", [None, {"rtol": 0.01}, {"atol": 0.01}, LOOSE, {"atol": 1000.0}])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_exact_class_ignores_overrides_and_dtype(overrides, dtype):
    assert tolerance_for(dtype, "cpu", "exact", overrides=overrides) == EXACT


@pytest.mark.parametrize("hf, fms", [([130], [131]), ([48400], [49000]), ([True, False], [True, True])])
def test_integer_tensors_compare_exactly_under_a_loose_tolerance(hf, fms):
    """Token ids 130 and 131 were equal under --rtol 0.01, 48400 and 49000 under a bf16 --atol 0.01 run."""
    loose = tolerance_for("bfloat16", "cpu", "activation", overrides=LOOSE)
    result = compare(torch.tensor(hf), torch.tensor(fms), loose)
    assert result.status == Status.FAIL, result.detail
    assert compare(torch.tensor(hf), torch.tensor(hf), loose).passed


def test_an_exact_probe_fails_through_diff_captures_with_overrides():
    rows = [(Probe("step.0.token", "g", "g", teacher=(), tolerance_class="exact"), torch.tensor([130]),
             torch.tensor([131]))]
    result = diff_captures(pair_from_values(rows), dtype="float32", overrides=LOOSE)
    assert not result.passed and result.probes[0].tolerance == EXACT


def test_masked_positions_are_not_compared_and_all_masked_is_empty():
    """Padded positions are undefined on both sides: never counted as matches, and nothing left is no pass."""
    hf, fms = torch.ones(2, 3), torch.ones(2, 3)
    fms[1] = 5.0  # the padded row differs: it must not matter, nor count as compared
    tol = tolerance_for("float32", "cpu")
    some = compare(hf, fms, tol, valid=torch.tensor([True, False]))
    assert some.passed and some.metrics.numel == 3 and some.metrics.masked_out == 3
    nothing = compare(hf, fms, tol, valid=torch.tensor([False, False]))
    assert nothing.status == Status.EMPTY and section_verdict([_probe(propagated=nothing.status)])["verdict"] == FAIL


# ---------------------------------------------------------------------------------------------- probe rules
def _probe(propagated=Status.PASS, teacher=Status.NOT_RUN, **fields):
    record = {"name": fields.pop("name", "p"), "index": 0, "propagated": {"status": propagated},
              "teacher": {"status": teacher}, "floor_ratio": None, "own_floor_ratio": None, "float64": None,
              "missing_upcast": []}
    record.update(fields)
    return record


@pytest.mark.parametrize("teacher", [Status.FAIL, Status.NONFINITE, Status.RAISED, Status.EMPTY,
                                     Status.SHAPE_MISMATCH, Status.CAPTURE_ERROR])
def test_a_teacher_forced_failure_beside_a_propagated_pass_fails(teacher):
    assert failing_rules(_probe(teacher=teacher)) == ["own"]
    assert section_verdict([_probe(), _probe(teacher=teacher)])["verdict"] == FAIL


@pytest.mark.parametrize("teacher", [Status.PASS, Status.NOT_APPLICABLE, Status.NOT_RUN])
def test_teacher_statuses_without_a_finding_pass(teacher):
    assert section_verdict([_probe(teacher=teacher)])["verdict"] == PASS


def test_a_section_with_no_probe_fails():
    judged = section_verdict([])
    assert judged["verdict"] == FAIL and "no probe" in judged["why"]


@pytest.mark.parametrize("fields, rule", [
    ({"floor_ratio": 8.5}, "floor"), ({"own_floor_ratio": "inf"}, "floor"), ({"floor_ratio": "nan"}, "floor"),
    ({"float64": {"status": Status.FAIL}}, "formula"), ({"float64": {"status": Status.RAISED}}, "formula"),
    ({"missing_upcast": ["softmax in bfloat16"]}, "upcast"),
])
def test_sharp_findings_fail_by_default_and_pass_as_suspects_when_lenient(fields, rule):
    probe = _probe(**fields)
    assert failing_rules(probe) == [rule]
    assert section_verdict([probe])["verdict"] == FAIL
    assert section_verdict([probe], Policy(lenient=True))["verdict"] == PASS


def test_lenient_never_excuses_the_gate_or_own_error():
    for probe in (_probe(propagated=Status.FAIL), _probe(teacher=Status.FAIL, floor_ratio=20.0)):
        assert section_verdict([probe], Policy(lenient=True))["verdict"] == FAIL


def test_a_ratio_at_the_factor_passes_and_just_above_fails():
    assert section_verdict([_probe(floor_ratio=8.0)])["verdict"] == PASS
    assert section_verdict([_probe(floor_ratio=8.0001)])["verdict"] == FAIL


# ---------------------------------------------------------------------------------------------- 16-bit row floors
def _bf16_pair(bad_element: bool):
    """HF in bf16, HF in float64 (its rounding-only reference) and FMS in bf16 over [rows, width], where one row
    holds large values (so the tensor's largest rounding error is large) and another only small ones."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(4, 64, generator=g, dtype=torch.float64)
    exact[0] *= 200.0  # large values: bf16 rounds them by up to ~0.5
    hf = exact.to(torch.bfloat16)
    fms = (exact + 1e-3 * torch.randn(4, 64, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    if bad_element:
        fms[3, 5] = hf[3, 5].double() * 0.1 if abs(float(hf[3, 5])) > 0.5 else 1.5  # 90% wrong (or far off)
    return hf, exact, fms


def _judged_bf16(bad_element: bool, own: bool):
    """The probe judged with the bf16 pair as its propagated (`own=False`) or its teacher-forced output."""
    from parity.capture import teacher_output_key, value_key

    probe = Probe("block", "b", "b")
    hf, exact, fms = _bf16_pair(bad_element)
    pair = pair_from_values([(probe, hf, hf if own else fms)], mode="teacher_forced")
    pair.fms.put(teacher_output_key("block"), fms if own else hf)
    floors = pair_from_values([(probe, exact, exact)]).hf
    assert value_key("block") in floors.keys()
    return diff_captures(pair, dtype="bfloat16", floors=floors).probes[0]


def test_a_correct_bf16_tensor_passes_and_one_badly_wrong_element_fails_as_its_own_error():
    """A module's own error is judged against the rounding error of the element's own row: the element fails,
    where the per-tensor rule it replaces (under FLOOR_GATE x the largest rounding error anywhere) passed it."""
    for own in (False, True):
        assert not failing_rules(_judged_bf16(False, own).to_dict())
    probe = _judged_bf16(True, own=True)
    assert probe.teacher.status == Status.FAIL, probe.teacher.detail
    assert probe.teacher.metrics.max_abs <= FLOOR_GATE * probe.noise_floor
    assert not section_verdict([probe.to_dict()])["verdict"] == PASS


def test_a_propagated_error_is_judged_against_the_largest_row_floor():
    """Propagated errors compound every upstream rounding difference (fuzzed correct bf16 ports need up to 9.6x a
    row's floor there, 4.9x the largest): the propagated column takes the largest row floor."""
    probe = _judged_bf16(True, own=False)
    assert probe.propagated.status == Status.PASS, probe.propagated.detail
    assert "passes the measured 16-bit gate" in probe.propagated.detail and "largest row floor" in probe.propagated.detail


# ---------------------------------------------------------------------------------------------- the run
def _report(not_run=(), policy=None, probes=None):
    rows = [(Probe("x", "x", "x", teacher=()), torch.ones(3), torch.ones(3))]
    result = diff_captures(pair_from_values(rows), dtype="float32") if probes is None else probes
    extra = {"not_run": list(not_run)}
    return build_multi_report([("case · model", "model", result, extra)], {}, policy=policy)


FLOORS_SHORT = not_run_record("noise floors", "an fp64 copy needs 9 GiB, 2 free", "memory")
FLOORS_OFF = not_run_record("noise floors", "noise floors off (--floors off)", "floors off")


def test_a_check_not_run_unasked_makes_the_run_incomplete():
    report = _report([FLOORS_SHORT])
    summary = report["summary"]
    assert summary["verdict"] == INCOMPLETE and summary["unaccepted"][0]["section"] == "case · model"
    text = render_terminal(report)
    assert text.startswith("PARITY INCOMPLETE") and "not run: noise floors in case · model" in text
    assert "NOT asked for" in text


def test_a_check_the_user_turned_off_or_allow_partial_passes():
    assert _report([FLOORS_OFF], Policy(accepted=frozenset({"floors off"})))["summary"]["verdict"] == PASS
    assert _report([FLOORS_SHORT], Policy(allow_partial=True))["summary"]["verdict"] == PASS
    # accepting one cause does not accept another
    assert _report([FLOORS_SHORT], Policy(accepted=frozenset({"floors off"})))["summary"]["verdict"] == INCOMPLETE


def test_a_failing_section_outranks_incomplete():
    assert run_verdict([PASS, FAIL], [FLOORS_SHORT])["verdict"] == FAIL
    assert run_verdict([], [])["verdict"] == FAIL


def test_unknown_causes_are_refused():
    with pytest.raises(ValueError, match="unknown cause"):
        not_run_record("floors", "why", "because")


def test_the_verdict_line_says_lenient_flips_and_checks_not_run():
    line = verdict_line({"verdict": "pass", "lenient": True, "near_tie_flips": 3, "not_run": [FLOORS_OFF],
                         "unaccepted": []})
    assert line.startswith("PARITY PASS") and "lenient" in line and "3 near-tie flip" in line
    assert "1 planned check(s) not run, 0 not asked for" in line


@pytest.mark.parametrize("lenient", [False, True])
def test_every_reader_gets_the_same_verdict(lenient):
    """ParityResult.passed, the section summary and the run summary come from one function."""
    rows = [(Probe(f"p{i}", "x", "x", teacher=()), torch.ones(3), torch.ones(3) + shift)
            for i, shift in enumerate((0.0, 1e-6, 1.0))]
    for keep in (1, 2, 3):
        result = diff_captures(pair_from_values(rows[:keep]), dtype="float32", lenient=lenient)
        report = _report(probes=result)
        expected = PASS if result.passed else FAIL
        assert report["sections"][0]["summary"]["verdict"] == expected == report["summary"]["verdict"]
        assert (expected == PASS) == (keep < 3)


def test_old_reports_keep_the_rules_they_were_judged_by():
    """A report written before sharp findings failed (`strict: false`) is read back as lenient."""
    rows = [(Probe("x", "x", "x", teacher=()), torch.ones(3), torch.ones(3))]
    data = diff_captures(pair_from_values(rows), dtype="float32").to_dict()
    data.pop("lenient")
    data["strict"] = False
    data["probes"][0]["floor_ratio"] = 50.0
    assert build_multi_report([("old", "model", data, {})])["summary"]["verdict"] == PASS
    data["strict"] = True
    assert build_multi_report([("old", "model", data, {})])["summary"]["verdict"] == FAIL


def test_comparison_records_survive_json():
    """Non-finite ratios are written as strings: the rules read them back as numbers."""
    assert failing_rules(_probe(floor_ratio="inf")) == ["floor"]
    assert not failing_rules(_probe(floor_ratio=str(math.pi)))
    assert Comparison.from_dict(Comparison(Status.PASS).to_dict()).passed


# ---------------------------------------------------------------------------------------------- the judge's mutants
def test_every_judge_mutant_applies_to_the_current_sources():
    """`python -m parity.granite.judge_mutants` plants each in a copy of parity/; a snippet that moved would make
    it a no-op that nobody notices."""
    from parity.granite.judge_mutants import CATALOGUE, PARITY_DIR

    assert len(CATALOGUE) >= 12 and len({m.name for m in CATALOGUE}) == len(CATALOGUE)
    problems = [m.check(PARITY_DIR) for m in CATALOGUE]
    assert problems == [None] * len(CATALOGUE), [p for p in problems if p]


# ---------------------------------------------------------------------------------------------- the CLI's exit code
@pytest.mark.runs_at("tiny", device="cpu", dtype="float32")
def test_compare_exits_4_when_the_floors_do_not_fit_and_0_with_allow_partial(tmp_path, monkeypatch, capsys):
    """Short of memory for HF's float64 copy, the floors and the formula check do not run: the run is INCOMPLETE
    (exit 4), the terminal, the HTML and the JSON list both checks with their cause; --allow-partial accepts it."""
    import json

    import parity.granite.models as models
    from parity.granite.cli import main
    from parity.granite.fixtures import SPEECH_DIR

    monkeypatch.setattr(models, "available_bytes", lambda device: 1)  # nothing fits beside the loaded models
    clip = str(SPEECH_DIR / "9003-103-0000.flac")
    common = ["compare", "--audio", clip, "--new-tokens", "2", "--phases", "one", "--report", str(tmp_path / "r.html")]
    assert main([*common, "--json", str(tmp_path / "r.json")]) == 4
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    checks = {(r["check"], r["cause"]) for r in summary["unaccepted"]}
    assert summary["verdict"] == INCOMPLETE and {("noise floors", "memory"), ("float64 formula check", "memory")} <= checks
    assert out.startswith("INCOMPLETE: ") and "float64 formula check (memory)" in out.splitlines()[0]
    assert "not run: float64 formula check" in out  # every check not run on its own line, with why
    assert "<b>noise floors</b>" in (tmp_path / "r.html").read_text()
    # --allow-partial reaches the verdict's policy, which then accepts those very records
    from parity.granite.cli import _policy, build_parser
    from parity.granite.cli_checks import check_compare_args

    policy = _policy(check_compare_args(build_parser().parse_args([*common, "--allow-partial"])))
    assert run_verdict(["pass"], summary["not_run"], policy)["verdict"] == PASS
