"""Report diffs over time (`parity.report_diff`, `granite-speech-parity diff`): per-probe bounds from each probe's own
baseline error and noise floor, probes and sections that disappeared or appeared, section verdicts that went from
pass to not-pass. CPU only, no models: reports are built from hand-made results or edited from a real one."""

import copy
import json
import re
from pathlib import Path
from typing import Optional

import pytest
import torch

from parity.diff import Comparison, ParityResult, ProbeResult, Status, compare
from parity.granite.cli import main
from parity.report import build_multi_report, read_json, write_json
from parity.report_diff import (ReportFieldError, assert_no_growth, diff_reports, render_diff_html,
                                render_diff_terminal)
from parity.tolerances import Tolerance, regression_bound

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # hand-made reports

REAL = Path(__file__).resolve().parent.parent / "results" / "gpu-h100-2b" / "report.json"
FP32 = Tolerance(1e-3, 1e-3, 0.0, 0.0, "fp32 target atol=rtol=1e-3")


# ---------------------------------------------------------------------------------------------------------------
# hand-made reports: one planted error of exactly `max_abs` per probe (the reference is all zeros)


def _probe(index: int, name: str, max_abs: float, floor: Optional[float] = None) -> ProbeResult:
    hf = torch.zeros(4, 8, dtype=torch.float64)
    fms = hf.clone()
    fms[1, 3] = max_abs
    prop = compare(hf, fms, FP32)
    return ProbeResult(index=index, name=name, hf_path=f"hf.{name}", fms_path=f"fms.{name}", hf_take="output",
                       fms_take="output", hf_adapter="identity", fms_adapter="identity",
                       tolerance_class="logits" if name == "logits" else "activation", tolerance=FP32, order=index,
                       calls_hf=1, calls_fms=1, propagated=prop,
                       teacher=Comparison(Status.NOT_RUN, "propagated run (no teacher forcing)"),
                       attribution="ok" if prop.passed else "unknown", noise_floor=floor)


def _result(errors: dict, floors: Optional[dict] = None) -> ParityResult:
    """{probe name: max |diff|} in execution order; `floors` {name: noise floor} where measured."""
    probes = [_probe(i, name, eps, (floors or {}).get(name)) for i, (name, eps) in enumerate(errors.items())]
    first = next((p.name for p in probes if p.status != Status.PASS), None)
    return ParityResult("propagated", probes, first, None)


def report(sections: dict, floors: Optional[dict] = None) -> dict:
    """{section title: {probe name: max |diff|}} -> a parity report (every section of kind 'model')."""
    return build_multi_report([(title, "model", _result(errors, floors), None) for title, errors in sections.items()],
                              {"dtype": "float32", "device": "cpu", "git_commit": "0123456789abcdef"})


MODEL = {"encoder.block.0": 3e-7, "decoder.layer.0": 1e-6, "logits": 2e-7}
BASELINE = {"features": {"features.fbank": 2e-7, "input_ids": 0.0}, "clip A": MODEL}


def _rows(diff: dict) -> dict:
    return {(r["section"], r["name"]): r for r in diff["probes"]}


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def _flagged_table(page: str) -> str:
    """The visible text of the page's flagged table (between its heading and the matched-probes fold)."""
    return _text(page.split("<h2>Flagged probes")[1].split("<details>")[0])


# ---------------------------------------------------------------------------------------------------------------
# probes and sections that disappeared or appeared


def test_a_probe_that_disappeared_regresses_and_is_named():
    old = report(BASELINE)
    new = report({**BASELINE, "clip A": {k: v for k, v in MODEL.items() if k != "decoder.layer.0"}})
    diff = diff_reports(old, new)
    assert diff["summary"]["verdict"] == "regressed" and diff["summary"]["only_in_old"] == 1
    lost = _rows(diff)[("clip A", "decoder.layer.0")]
    assert lost["only_in_old"] and lost["fails"] and lost["new"] is None
    term = render_diff_terminal(diff)
    assert term.startswith("REPORT DIFF REGRESSED")
    assert "probes that disappeared (1, each a regression): clip A / decoder.layer.0" in term
    assert "clip A / decoder.layer.0 pass absent" in _flagged_table(render_diff_html(diff))
    with pytest.raises(AssertionError, match="decoder.layer.0"):
        assert_no_growth(old, new)


def test_a_section_that_disappeared_regresses_and_is_named():
    old = report(BASELINE)
    new = report({"features": BASELINE["features"]})
    diff = diff_reports(old, new)
    s = diff["summary"]
    assert s["verdict"] == "regressed" and s["sections_only_in_old"] == 1 and s["only_in_old"] == 3
    assert s["matched"] == 2 and s["grew"] == s["regressed"] == 0  # nothing else to blame
    assert [sec["title"] for sec in diff["sections"] if sec["fails"]] == ["clip A"]  # the section fails itself
    term = render_diff_terminal(diff)
    assert "sections that disappeared (1, each a regression): clip A (3 probes, pass)" in term
    assert "probes that disappeared (3, each a regression): the 3 of the sections above" in term
    assert "section clip A (3 probes) pass absent" in _flagged_table(render_diff_html(diff))


def test_a_probe_that_appeared_is_listed_and_fails_only_when_not_passing():
    old = report(BASELINE)
    new = report({**BASELINE, "clip A": {**MODEL, "decoder.layer.1": 2e-6}})
    diff = diff_reports(old, new)
    assert diff["summary"]["verdict"] == "ok" and diff["summary"]["only_in_new"] == 1  # new coverage: listed
    term = render_diff_terminal(diff)
    assert "probes that appeared (1, a regression where not passing): clip A / decoder.layer.1" in term
    assert "clip A / decoder.layer.1 absent pass" in _flagged_table(render_diff_html(diff))
    broken = diff_reports(old, report({**BASELINE, "clip A": {**MODEL, "decoder.layer.1": 5e-2}}))
    assert broken["summary"]["verdict"] == "regressed" and broken["summary"]["only_in_new_failing"] == 1
    assert "clip A / decoder.layer.1 [fail]" in render_diff_terminal(broken)


def test_a_section_that_appeared_is_listed_and_fails_only_when_not_passing():
    old = report(BASELINE)
    diff = diff_reports(old, report({**BASELINE, "clip B": MODEL}))
    assert diff["summary"]["verdict"] == "ok" and diff["summary"]["sections_only_in_new"] == 1
    assert "sections that appeared (1, a regression where not passing): clip B (3 probes, pass)" in \
        render_diff_terminal(diff)
    assert "section clip B (3 probes) absent pass" in _flagged_table(render_diff_html(diff))
    failing = diff_reports(old, report({**BASELINE, "clip B": {**MODEL, "logits": 5e-2}}))
    assert failing["summary"]["verdict"] == "regressed"
    assert [sec["title"] for sec in failing["sections"] if sec["fails"]] == ["clip B"]
    assert "clip B (3 probes, fail)" in render_diff_terminal(failing)


def test_a_section_whose_verdict_went_to_fail_regresses_though_every_probe_matched():
    old = report(BASELINE)
    new = copy.deepcopy(old)
    new["sections"][1]["summary"]["verdict"] = "fail"  # e.g. a sharp rule failed it; no probe status changed
    diff = diff_reports(old, new)
    assert diff["summary"]["matched"] == 5 and diff["summary"]["status_changed"] == 0
    assert diff["summary"]["verdict"] == "regressed" and diff["summary"]["sections_regressed"] == 1
    term = render_diff_terminal(diff)
    assert "sections whose verdict went from pass to not-pass (1, each a regression): clip A (pass -> fail)" in term
    back = diff_reports(new, old)  # fail -> pass is listed, not a regression
    assert back["summary"]["verdict"] == "ok" and back["summary"]["sections_fixed"] == 1


def test_a_report_whose_verdict_went_to_incomplete_regresses_though_every_section_passes():
    old = report(BASELINE)
    new = copy.deepcopy(old)
    new["summary"]["verdict"] = "incomplete"  # a planned check (e.g. the noise floors) no longer ran
    diff = diff_reports(old, new)
    assert all(not sec["fails"] for sec in diff["sections"]) and diff["summary"]["report_regressed"]
    assert diff["summary"]["verdict"] == "regressed"
    assert "report verdict went from pass to incomplete (a regression)" in render_diff_terminal(diff)
    assert "whole report pass incomplete" in _flagged_table(render_diff_html(diff))


def test_a_renamed_section_is_one_that_disappeared_plus_one_that_appeared():
    old = report(BASELINE)
    renamed = copy.deepcopy(old)
    renamed["sections"][1]["title"] = "clip 2"
    diff = diff_reports(old, renamed)
    assert diff["summary"]["only_in_old"] == diff["summary"]["only_in_new"] == 3
    assert diff["summary"]["verdict"] == "regressed"
    term = render_diff_terminal(diff)
    assert "sections that disappeared (1, each a regression): clip A" in term and "appeared (1, " in term


# ---------------------------------------------------------------------------------------------------------------
# per-probe bounds


def test_logits_at_2e7_growing_100x_are_flagged_under_every_global_bound():
    old = report(BASELINE, floors={"logits": 1e-7})
    new = report({**BASELINE, "clip A": {**MODEL, "logits": 2e-5}})
    # every global number still holds: the dtype table's tolerance and the fp32 regression bound
    assert new["summary"]["verdict"] == "pass" and 2e-5 < regression_bound("float32", "cpu", "logits").atol
    diff = diff_reports(old, new)
    logits = _rows(diff)[("clip A", "logits")]
    assert logits["growth"] == pytest.approx(100.0)
    assert logits["bound"] == pytest.approx(2e-6) and logits["noise_floor"] == 1e-7  # 10 x 2e-7 > 8 x 1e-7
    assert logits["grew"] and logits["fails"] and diff["summary"]["verdict"] == "regressed"
    assert re.search(r"^  \[clip A\]\n! logits ", render_diff_terminal(diff), re.M)  # under its section


def test_a_2x_growth_is_not_flagged():
    old = report(BASELINE, floors={"logits": 1e-7})
    diff = diff_reports(old, report({**BASELINE, "clip A": {**MODEL, "logits": 4e-7}}))
    logits = _rows(diff)[("clip A", "logits")]
    assert logits["growth"] == pytest.approx(2.0) and not logits["grew"]
    assert diff["summary"]["verdict"] == "ok"


def test_the_bound_is_the_baselines_noise_floor_where_that_is_larger():
    """A probe measured below its floor (1e-10 against 1e-7) may move inside rounding noise (to 5e-7 < 8 x 1e-7)
    although that is a 500x growth; without a measured floor the same move is flagged, and the new report's own
    floor never loosens the bound."""
    quiet = {**MODEL, "decoder.layer.0": 1e-10}
    moved = report({**BASELINE, "clip A": {**MODEL, "decoder.layer.0": 5e-7}})
    with_floor = _rows(diff_reports(report({**BASELINE, "clip A": quiet}, floors={"decoder.layer.0": 1e-7}), moved))
    row = with_floor[("clip A", "decoder.layer.0")]
    assert row["growth"] == pytest.approx(500.0) and row["bound"] == pytest.approx(8e-7) and not row["grew"]
    no_floor = diff_reports(report({**BASELINE, "clip A": quiet}), moved)
    assert _rows(no_floor)[("clip A", "decoder.layer.0")]["grew"] and no_floor["summary"]["verdict"] == "regressed"
    loose_new = report({**BASELINE, "clip A": {**MODEL, "decoder.layer.0": 5e-7}}, floors={"decoder.layer.0": 1.0})
    assert diff_reports(report({**BASELINE, "clip A": quiet}), loose_new)["summary"]["verdict"] == "regressed"


def test_values_near_zero_use_floor_abs_not_a_huge_factor():
    old = report(BASELINE)  # input_ids: 0
    diff = diff_reports(old, report({**BASELINE, "features": {"features.fbank": 2e-7, "input_ids": 1e-12}}))
    row = _rows(diff)[("features", "input_ids")]
    assert row["growth"] == pytest.approx(1.0) and not row["grew"] and diff["summary"]["verdict"] == "ok"


def test_a_growth_from_zero_is_shown_as_an_absolute_change_not_a_ratio():
    """0 -> 0.16 read as 'largest growth 1.6e+08x' (0.16 over the 1e-9 floor): a ratio from zero measures nothing."""
    old = report(BASELINE)  # input_ids: 0
    new = report({**BASELINE, "features": {"features.fbank": 4e-7, "input_ids": 0.16}})
    diff = diff_reports(old, new)
    row = _rows(diff)[("features", "input_ids")]
    assert row["from_zero"] and row["grew"] and diff["summary"]["verdict"] == "regressed"
    assert diff["summary"]["max_from_zero"] == {"section": "features", "name": "input_ids", "old": 0.0, "new": 0.16}
    assert diff["summary"]["max_growth"]["name"] == "features.fbank"  # the largest real factor: 2x
    term, page = render_diff_terminal(diff), _text(render_diff_html(diff))
    for text in (term, page):
        assert "largest error from zero 0 → 0.16 at input_ids (features)" in text
        assert "largest growth 2× at features.fbank (features)" in text
        assert not re.search(r"1\.60?\s?e\+?0?8|160000000", text), "a growth from zero printed as a ratio"
    assert re.search(r"^! input_ids +pass +fail +0 +0\.16 .* 0 → 0\.16 ", term, re.M)
    assert "features / input_ids pass fail 0 0.16 0 → 0.16" in page  # the flagged table: old -> new, no factor


def test_terminal_names_sections_and_probes_whole():
    """Names longer than the column were cut from the left ('…processing / features.audio_embed_sizes'), which hid
    the section."""
    long = "padded batch of 3 (window + 1, on window, tiny block + 1) · preprocessing"
    name = "features.audio_embed_sizes.of.a.rather.long.probe.name"
    old = report({long: {name: 1e-7, "input_ids": 0.0}, "clip A": MODEL})
    diff = diff_reports(old, report({long: {name: 1e-4, "input_ids": 0.0}, "clip A": MODEL}))
    term = render_diff_terminal(diff)
    assert f"  [{long}]" in term and re.search(rf"^! {re.escape(name)} ", term, re.M)
    assert "…" not in term


def test_a_report_missing_a_field_is_named_not_a_key_error():
    old = report(BASELINE)
    broken = copy.deepcopy(old)
    del broken["sections"][1]["result"]["probes"][2]["propagated"]["status"]
    with pytest.raises(ReportFieldError, match=r"field sections\[1\]\.result\.probes\[2\]\.propagated\.status "
                                               r"is missing") as err:
        diff_reports(old, broken)
    assert err.value.field == "sections[1].result.probes[2].propagated.status"
    broken = copy.deepcopy(old)
    broken["sections"][0]["summary"]["verdict"] = ["pass"]
    with pytest.raises(ReportFieldError, match=r"field sections\[0\]\.summary\.verdict is list, expected a string"):
        diff_reports(broken, old)


def test_a_probe_that_stops_passing_regresses():
    old = report(BASELINE)
    diff = diff_reports(old, report({**BASELINE, "clip A": {**MODEL, "decoder.layer.0": 5e-3}}))
    row = _rows(diff)[("clip A", "decoder.layer.0")]
    assert row["regressed"] and row["status_changed"] and diff["summary"]["verdict"] == "regressed"


# ---------------------------------------------------------------------------------------------------------------
# the `diff` command


def test_cli_diff_exits_1_on_a_section_that_disappeared(tmp_path, capsys):
    old = write_json(report(BASELINE), tmp_path / "old.json")
    new = write_json(report({"features": BASELINE["features"]}), tmp_path / "new.json")
    assert main(["diff", str(old), str(old)]) == 0
    capsys.readouterr()
    html, js = tmp_path / "diff.html", tmp_path / "diff.json"
    assert main(["diff", str(old), str(new), "--report", str(html), "--json", str(js)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("REPORT DIFF REGRESSED") and "sections that disappeared (1, each a regression): clip A" in out
    assert "section clip A (3 probes)" in _text(html.read_text())
    assert json.loads(js.read_text())["summary"]["sections_only_in_old"] == 1


# ---------------------------------------------------------------------------------------------------------------
# the real 2b report (schema 1, one section) as a baseline


@pytest.fixture(scope="module")
def real():
    return read_json(REAL)


def _scaled(report: dict, factors: dict) -> dict:
    new = copy.deepcopy(report)
    for probe in new["sections"][0]["result"]["probes"]:
        if probe["name"] in factors:
            m = probe["propagated"]["metrics"]
            m["max_abs"] *= factors[probe["name"]]
            m["tol_ratio"] *= factors[probe["name"]]
    return new


def test_diff_flags_a_100x_growth_and_not_a_2x_one(real):
    new = _scaled(real, {"decoder.layer.20.mlp": 100.0, "decoder.layer.21.mlp": 2.0})
    diff = diff_reports(real, new)
    json.dumps(diff, allow_nan=False)
    rows = {r["name"]: r for r in diff["probes"]}
    assert rows["decoder.layer.20.mlp"]["grew"] and not rows["decoder.layer.21.mlp"]["grew"]
    assert rows["decoder.layer.20.mlp"]["growth"] == pytest.approx(100.0)
    assert diff["summary"]["verdict"] == "regressed" and diff["summary"]["grew"] == 1
    assert diff["summary"]["matched"] == 345 and diff["summary"]["max_growth"]["name"] == "decoder.layer.20.mlp"
    term = render_diff_terminal(diff)
    assert term.startswith("REPORT DIFF REGRESSED") and "decoder.layer.20.mlp" in term.split("largest growth among")[0]
    page = render_diff_html(diff)
    assert "<title>REGRESSED · Parity report diff · 345 probes matched</title>" in page
    assert page.count("<svg") == 1 and "decoder.layer.20.mlp" in page
    assert diff_reports(real, real)["summary"]["verdict"] == "ok"


def test_assert_no_growth(real, tmp_path):
    baseline = write_json(real, tmp_path / "baseline.json")
    assert assert_no_growth(baseline, real)["summary"]["verdict"] == "ok"
    with pytest.raises(AssertionError, match=r"(?s)REPORT DIFF REGRESSED.*decoder\.layer\.3\.attn\.q"):
        assert_no_growth(baseline, _scaled(real, {"decoder.layer.3.attn.q": 1000.0}))
    assert_no_growth(real, _scaled(real, {"decoder.layer.3.attn.q": 1000.0}), growth=2000.0)


# the three sessions of `pytest --parity-baseline` in one interpreter (pytest's exit code and terminal summary are
# what is tested, not the interpreter: two more would only repeat the imports); between the second and the third, a
# baseline whose errors and noise floors are 1e-6 of today's
BASELINE_SESSIONS = """
import contextlib, io, json, sys
import pytest

args, today, old = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]


def session(*extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = int(pytest.main(args + list(extra)))
    return {"code": code, "stdout": out.getvalue()}


runs = {"first": session("--parity-json", today), "again": session("--parity-baseline", today)}
shrunk = json.load(open(today))
for section in shrunk["sections"]:
    for probe in section["result"]["probes"]:
        metrics = probe["propagated"].get("metrics") or {}
        if isinstance(metrics.get("max_abs"), float):
            metrics["max_abs"] *= 1e-6
        if isinstance(probe.get("noise_floor"), float):  # else the floor term would call today's error noise
            probe["noise_floor"] *= 1e-6
shrunk["result"] = shrunk["sections"][0]["result"]
json.dump(shrunk, open(old, "w"))
runs["grown"] = session("--parity-baseline", old)
print(json.dumps(runs))
"""


def test_pytest_baseline_fails_on_growth(tmp_path):
    """`pytest --parity-baseline OLD.json` fails the layer suite when a probe's error grew past its bound: a baseline
    whose errors and noise floors are 1e-6 of today's makes every non-zero probe a 1e6x growth."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["suites/test_layers.py", "--model", "tiny", "-q", "-p", "no:cacheprovider", "--parity-mode",
            "teacher-forced"]
    # one thread: the tiny model is no faster on two, and the suite's workers hold both cores
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", BASELINE_SESSIONS, json.dumps(args), str(tmp_path / "today.json"),
                           str(tmp_path / "old.json")], cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.splitlines()[-1])
    assert runs["first"]["code"] == 0, runs["first"]["stdout"][-2000:]
    assert runs["again"]["code"] == 0, runs["again"]["stdout"][-2000:]  # no growth against itself
    assert "grew" not in runs["again"]["stdout"].lower(), runs["again"]["stdout"][-2000:]
    grown = runs["grown"]
    assert grown["code"] == 1 and "grew" in grown["stdout"].lower(), grown["stdout"][-2000:]
