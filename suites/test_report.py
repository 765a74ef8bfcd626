"""Parity reports: JSON shape (sections, summary, schema-1 compatibility), HTML (verdict, margin, escaping, plot,
no-JS folding) and terminal output (worst probes first); report diffs over time: test_report_diff.py. CPU only,
no models."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from parity.diff import Comparison, ParityResult, ProbeResult, Status, compare
from parity.report import (SCHEMA, build_multi_report, build_report, read_json, render_html, render_terminal,
                           result_from_report, results_from_report, write_json)
from parity.tolerances import Tolerance

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # hand-made and committed reports

REAL = Path(__file__).resolve().parent.parent / "results" / "gpu-h100-2b" / "report.json"
FP32 = Tolerance(1e-3, 1e-3, 0.0, 0.0, "fp32 target atol=rtol=1e-3")
EXACT = Tolerance(0.0, 0.0, 0.0, 0.0, "integers: must be equal")
HOSTILE = "<script>x</script>"


# ---------------------------------------------------------------------------------------------------------------
# synthetic results: real `compare` metrics on small float64 tensors with a planted error of known size


def _pair(seed: int, eps: float, at=(1, 3), shape=(4, 8)) -> tuple:
    hf = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fms = hf.clone()
    fms[at] += eps
    return hf, fms


def expected_ratio(seed: int, eps: float, at=(1, 3), tol: Tolerance = FP32) -> float:
    """The error/tolerance of `_pair` computed by hand: eps / (atol + rtol |hf|) at the planted element."""
    hf, _ = _pair(seed, eps, at)
    return abs(eps) / (tol.atol + tol.rtol * abs(float(hf[at])))


def _probe(index: int, name: str, eps: float, *, tol=FP32, cls="activation", teacher_eps=None,
           ints=False) -> ProbeResult:
    if ints:  # token ids: exact class
        hf = torch.arange(8, dtype=torch.int64)
        fms = hf.clone()
        fms[3] += int(eps)
    else:
        hf, fms = _pair(index, eps)
    prop = compare(hf, fms, tol)
    if teacher_eps is None:
        teacher = Comparison(Status.NOT_RUN, "propagated run (no teacher forcing)")
        attribution = "ok" if prop.passed else "unknown"
    else:
        teacher = compare(*_pair(index + 1000, teacher_eps), tol)
        attribution = ("own" if not teacher.passed else "ok") if prop.passed else (
            "inherited" if teacher.passed else "own")
    return ProbeResult(index=index, name=name, hf_path=f"hf.{name}", fms_path=f"fms.{name}", hf_take="output",
                       fms_take="output", hf_adapter="identity", fms_adapter="identity", tolerance_class=cls,
                       tolerance=tol, order=index, calls_hf=1, calls_fms=1, propagated=prop, teacher=teacher,
                       attribution=attribution)


def _result(mode: str, rows) -> ParityResult:
    probes = [_probe(i, name, eps, **kw) for i, (name, eps, kw) in enumerate(rows)]
    order = sorted(probes, key=lambda p: p.order)
    first = next((p.name for p in order if p.status != Status.PASS), None)
    own = next((p.name for p in order if p.teacher.status == Status.FAIL), None)
    return ParityResult(mode, probes, first, own)


def model_rows(fail_at: int = 5):  # 99: nothing fails
    """An encoder (4 blocks) -> projector -> decoder (8 layers) -> logits table; decoder layer `fail_at` has its own
    error in attn, everything downstream inherits it."""
    rows = [("encoder.input_linear", 0.0, {})]
    for b in range(4):
        rows += [(f"encoder.block.{b}.{s}", 1e-7 * (b + 1), {}) for s in ("ff1", "attn", "conv")]
        rows.append((f"encoder.block.{b}", 2e-7 * (b + 1), {}))
    rows.append(("projector.out", 3e-7, {}))
    for layer in range(8):
        broken = layer >= fail_at
        own = layer == fail_at
        for s in ("attn", "mlp"):
            eps = 1e-2 * (layer - fail_at + 1) if broken else 1e-6 * (layer + 1)
            rows.append((f"decoder.layer.{layer}.{s}", eps, {"teacher_eps": 5e-3 if own and s == "attn" else 1e-7}))
        rows.append((f"decoder.layer.{layer}", (1e-2 * (layer - fail_at + 1.5)) if broken else 1.5e-6 * (layer + 1),
                     {"teacher_eps": 1e-7}))
    rows.append(("logits", 5e-2 if fail_at < 8 else 5e-6, {"teacher_eps": 1e-7}))
    return rows


def _with_floors(result: ParityResult, suspect: str) -> dict:
    """The result dict with the optional noise-floor / validity-mask fields a newer parity.diff adds."""
    data = result.to_dict()
    for probe in data["probes"]:
        m = probe["propagated"]["metrics"]
        floor = 1e-8 if probe["name"] == suspect else max(float(m["max_abs"]) / 3, 1e-9)
        probe.update(noise_floor=floor, floor_ratio=float(m["max_abs"]) / floor, suspect=probe["name"] == suspect)
        m.update(valid_elements=m["numel"] - 2, masked_out=2)
    data["first_suspect"] = suspect
    return data


def synthetic_report(*, fail: bool = True, hostile: bool = False) -> dict:
    """Three sections: preprocessing (pass, exact ids), model (decoder layer 5 fails when `fail`), generation
    (token ids, exact tolerance class; step 4 differs when `fail`)."""
    pre = _result("propagated", [("features.waveform", 0.0, {}), ("features.fbank", 2e-7, {}),
                                 ("features.stacked", 2e-7, {}), ("input_ids", 0, {"tol": EXACT, "cls": "exact",
                                                                                   "ints": True})])
    rows = model_rows(5 if fail else 99)
    if hostile:
        rows[2] = (HOSTILE, rows[2][1], rows[2][2])
    model = _with_floors(_result("teacher_forced", rows), suspect="decoder.layer.2.mlp")
    gen = _result("propagated", [(f"generate.step.{i}", 1 if fail and i == 4 else 0,
                                  {"tol": EXACT, "cls": "exact", "ints": True}) for i in range(6)])
    meta = {"mode": "teacher_forced", "dtype": "float64", "device": "cpu", "device_name": "x86_64",
            "weights": "seeded-random", "checkpoint": "/tmp/tiny", "checkpoint_sha256": "ab" * 32,
            "git_commit": "0123456789abcdef", "versions": {"python": "3.12", "torch": "2.9.1", "peft": "0.21.0"},
            "inputs": [{"audio": "9001-101-0000.flac", "seconds": 3.25, "tokens": 41},
                       {"audio": HOSTILE if hostile else "9002-102-0001.flac", "seconds": 1.5, "tokens": 23}]}
    return build_multi_report([("features", "preprocessing", pre, {"sample_rate": 16000}),
                               ("clip 9001-101-0000", "model", model, {"audio": "9001-101-0000.flac"}),
                               ("greedy decode", "generation", gen, None)], meta)


@pytest.fixture(scope="module")
def real():
    return read_json(REAL)


@pytest.fixture(scope="module")
def failing():
    return synthetic_report()


def _text(page: str) -> str:
    """The page's visible text (tags dropped), for checks that must not be fooled by attribute values."""
    return re.sub(r"<[^>]+>", " ", page)


# ---------------------------------------------------------------------------------------------------------------
# JSON shape


def test_schema_1_report_loads_as_one_section(real, tmp_path):
    assert real["schema"] == SCHEMA and real["upgraded_from"] == "granite-speech-parity-report/1"
    assert [(s["title"], s["kind"], s["summary"]["probes"]) for s in real["sections"]] == [("model", "model", 345)]
    assert real["summary"]["verdict"] == "pass" and real["summary"]["probes"] == 345
    assert len(result_from_report(real).probes) == 345
    [(title, kind, result)] = results_from_report(real)
    assert (title, kind, result.passed) == ("model", "model", True)
    again = read_json(write_json(real, tmp_path / "upgraded.json"))  # an upgraded report re-reads as schema 2
    assert again["sections"][0]["summary"] == real["sections"][0]["summary"]
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"schema": "something-else/1"}))
    with pytest.raises(ValueError, match="not a parity report"):
        read_json(bogus)


def test_multi_section_summary_takes_the_worst_section(failing):
    s = failing["summary"]
    assert s["verdict"] == "fail" and s["sections"] == 3
    assert s["probes"] == sum(len(sec["result"]["probes"]) for sec in failing["sections"]) == 4 + 43 + 6
    assert [sec["summary"]["verdict"] for sec in failing["sections"]] == ["pass", "fail", "fail"]
    # the first failing section is the model: its firsts, tagged with the section title
    assert s["first_divergence"]["name"] == "decoder.layer.5.attn"
    assert s["first_divergence"]["section"] == "clip 9001-101-0000"
    assert s["first_own_error"]["name"] == "decoder.layer.5.attn"
    assert s["first_suspect"]["name"] == "decoder.layer.2.mlp"
    assert failing["result"] is failing["sections"][0]["result"]  # compatibility key: the first section
    assert [(t, k) for t, k, _ in results_from_report(failing)] == [
        ("features", "preprocessing"), ("clip 9001-101-0000", "model"), ("greedy decode", "generation")]
    assert result_from_report(failing).probes[0].name == "features.waveform"
    gen = failing["sections"][2]["summary"]
    assert gen["first_divergence"]["name"] == "generate.step.4" and gen["margin"]["tol_ratio"] == "inf"
    with pytest.raises(ValueError, match="kind must be one of"):
        build_multi_report([("x", "decoding", result_from_report(failing), None)])


def test_one_section_report_has_the_multi_section_shape():
    result = _result("propagated", [("a.layer.0", 1e-6, {}), ("a.layer.1", 2e-3, {})])
    report = build_report(result, {"mode": "propagated"})
    assert report["schema"] == SCHEMA and len(report["sections"]) == 1
    assert set(report["sections"][0]) == {"title", "kind", "extra", "summary", "result"}
    assert report["summary"]["first_divergence"]["name"] == "a.layer.1"
    assert report["result"] == result.to_dict()
    json.dumps(report, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _worst(report: dict) -> tuple:
    """Independently of parity.report: the probe with the largest tol_ratio, straight from the JSON."""
    probes = [p for s in report["sections"] for p in s["result"]["probes"]]
    best = max(probes, key=lambda p: float(p["propagated"]["metrics"]["tol_ratio"]))
    return best["name"], float(best["propagated"]["metrics"]["tol_ratio"])


def test_real_report_header_has_verdict_margin_and_a_fitting_plot(real):
    page = render_html(real)
    name, ratio = _worst(real)
    assert name == "decoder.layer.39"
    assert "<title>PASS · Parity report · 345 probes</title>" in page
    assert f"worst probe uses {ratio * 100:.3g}% of its tolerance ({name})" in page
    assert "1.66%" in page
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert 'width="100%"' in svg and 'viewBox="0 0 ' in svg and "1240" not in svg
    labels = re.findall(r"<text [^>]*>([^<]+)</text>", svg)
    assert {"encoder", "decoder", "block.5", "layer.10", "layer.35"} <= set(labels)  # component / layer ticks
    assert "<script" not in page and "http" not in page.replace('http-equiv', '')
    assert "not recorded" in page and "NVIDIA H100 80GB HBM3" in page  # provenance, even from an old report
    assert render_html(real, title="Granite Speech parity").startswith("<!DOCTYPE html>")
    assert "<title>PASS · Granite Speech parity · 345 probes</title>" in render_html(real, title="Granite Speech parity")


def test_failing_report_header_plot_markers_and_folding(failing):
    page = render_html(failing)
    assert "<title>FAIL · Parity report · 53 probes</title>" in page
    text = _text(page)
    # the margin names the first divergence (the culprit) first, then the worst probe over all sections (the
    # generation section's exact mismatch is infinite)
    assert "worst probe is at ∞ of its tolerance (generate.step.4 in greedy decode): outside" in text
    ratio = expected_ratio(42, 5e-2)  # logits: probe index 42 of the model section, eps 5e-2
    assert ratio > 1 and f"{ratio * 100:.0f}%" in text  # percentages >= 100% are printed as integers
    assert page.count("<svg") == 3  # one plot per section
    model_svg = page.split("<svg")[2].split("</svg>")[0]
    assert "first divergence" in model_svg and "first own error" in model_svg and "first suspect" in model_svg
    assert 'stroke-dasharray="3 2"' in model_svg  # the measured noise floor series
    # folding without JavaScript: the failing layer's group is open, a passing one is closed
    assert re.search(r'<details class="grp bad"[^>]* open>\s*<summary><span class="mono">decoder\.layer\.5</span>', page)
    assert re.search(r'<details class="grp">\s*<summary><span class="mono">decoder\.layer\.1</span>', page)
    assert 'class="hz"' in page and ".hz:checked ~ .layers .zero" in page
    # the failing-only list comes before the per-layer view and holds the failing element
    failing_list = page[page.index("Failing probes in execution order", page.index('id="s1"')):page.index("All probes", page.index('id="s1"'))]
    assert "decoder.layer.5.attn" in failing_list and "[1, 3]" in failing_list
    assert "seeded random weights" in text and "ab" * 32 in text and "0123456789abcdef" in text
    assert "9001-101-0000.flac" in text and "3.25" in text and "peft" in text
    assert "masked out" in text and "suspect" in text


def test_html_escapes_names_and_hand_edited_fields(tmp_path):
    report = synthetic_report(hostile=True)
    edited = json.loads(json.dumps(report))
    probe = edited["sections"][1]["result"]["probes"][3]
    probe["index"] = "<b evil>7</b>"  # integer fields replaced by strings in a hand-edited JSON
    probe["calls_hf"] = "<img evil src=x onerror=alert(1)>"
    probe["propagated"]["metrics"]["numel"] = "<i evil>n</i>"
    probe["propagated"]["metrics"]["outside_count"] = "<u evil>9</u>"
    probe["tolerance"]["atol"] = "<s evil>0</s>"
    edited["sections"][1]["extra"]["note"] = "\"'><svg evil onload=x>"
    edited["meta"]["versions"]["<em evil>pkg</em>"] = "<em evil>1</em>"
    edited["meta"]["inputs"][0]["tokens"] = "<q evil>41</q>"
    path = write_json(edited, tmp_path / "edited.json")
    page = render_html(read_json(path), title="<h1 evil>t</h1>")
    assert HOSTILE not in page and not re.search(r"<\w+ evil", page)  # no hostile tag made it through raw
    for escaped in ("&lt;script&gt;x&lt;/script&gt;", "&lt;img evil src=x onerror=alert(1)&gt;", "&lt;b evil&gt;7",
                    "&lt;i evil&gt;n", "&lt;u evil&gt;9", "&lt;s evil&gt;0", "&#x27;&gt;&lt;svg evil onload=x&gt;",
                    "&lt;em evil&gt;pkg", "&lt;q evil&gt;41", "&lt;h1 evil&gt;t"):
        assert escaped in page, escaped
    render_terminal(read_json(path))  # the terminal renderer survives the same edits


def test_nonfinite_numbers_are_shown_as_nan_and_infinity(failing):
    edited = copy.deepcopy(failing)
    edited["sections"][1]["result"]["probes"][7]["propagated"]["metrics"]["cosine"] = "nan"
    edited["sections"][1]["result"]["probes"][8]["propagated"]["metrics"]["max_abs"] = "nan"
    page, term = render_html(edited), render_terminal(edited)
    assert not re.search(r"\bnan\b", _text(page)) and not re.search(r"\bnan\b", term)
    assert "NaN" in _text(page) and "∞" in _text(page) and "∞" in term


# ---------------------------------------------------------------------------------------------------------------
# terminal


def test_terminal_shows_the_worst_probes_not_the_first_ones(real):
    text = render_terminal(real)
    assert text.splitlines()[0].startswith("PARITY PASS  worst probe uses 1.66% of its tolerance (decoder.layer.39)")
    probes = real["sections"][0]["result"]["probes"]
    worst = sorted(probes, key=lambda p: -float(p["propagated"]["metrics"]["tol_ratio"]))
    for p in worst[:15]:
        assert re.search(rf"^\s*{p['index']} {re.escape(p['name'])}\s", text, re.M), p["name"]
    assert worst[15]["name"] + " " not in text
    assert probes[0]["name"] == "encoder.input_linear" and probes[0]["propagated"]["metrics"]["max_abs"] == 0
    assert "encoder.input_linear" not in text


def test_terminal_lists_every_failing_probe_per_section(failing):
    text = render_terminal(failing, max_rows=5)
    assert text.startswith("PARITY FAIL")
    assert "first divergence: #33 decoder.layer.5.attn [fail] (clip 9001-101-0000)" in text
    assert "first suspect: #25 decoder.layer.2.mlp" in text
    assert "== greedy decode (generation): FAIL" in text and "== features (preprocessing): PASS" in text
    failing_names = [p["name"] for s in failing["sections"] for p in s["result"]["probes"]
                     if p["propagated"]["status"] != "pass"]
    assert len(failing_names) == 11
    for name in failing_names:
        assert re.search(rf"^\s*\d+ {re.escape(name)}\s", text, re.M), name
    assert "suspect" in text and "×" in text  # floor ratios when present


# ---------------------------------------------------------------------------------------------------------------
# the culprit first: margin line, failing table, passing sections, the one-line verdict (issue #24)


def _section_html(page: str, k: int) -> str:
    """The HTML of section `k` (from its anchor to the next section's)."""
    start = page.index(f'id="s{k}"')
    end = page.find('<details class="sec"', start)
    return page[start:end if end != -1 else len(page)]


def _margin_line(page: str) -> str:
    return _text(re.search(r'<div class="margin"><b>Margin:</b>(.*?)</div>', page, re.S).group(1)).strip()


def test_margin_line_names_the_first_divergence_not_the_worst_probe_downstream(failing):
    """The margin named generate.step.4 (infinite, downstream) while the fault was decoder.layer.5.attn."""
    line = _margin_line(render_html(failing))
    gate = expected_ratio(33, 1e-2)  # decoder.layer.5.attn: index 33, eps 1e-2 (model_rows)
    own = expected_ratio(33 + 1000, 5e-3)  # its teacher-forced re-run: _pair(index + 1000, 5e-3)
    assert line.startswith(f"first divergence decoder.layer.5.attn (clip 9001-101-0000): gate: {gate:.2g}x its "
                           f"tolerance; own: its own (teacher-forced) error {own:.2g}x its tolerance"), line
    assert line.endswith("worst probe is at ∞ of its tolerance (generate.step.4 in greedy decode): outside"), line
    real = read_json(REAL)
    name, ratio = _worst(real)
    expected = f"worst probe at {ratio:.2g} of its tolerance ({name}); no noise floor measured"
    assert _margin_line(render_html(real)) == expected


def test_failing_table_starts_with_the_first_divergence_then_model_order(failing):
    """Worst-first put the culprit at row 17 of 19 behind the larger errors it caused downstream."""
    section = _section_html(render_html(failing), 1)
    table = section[section.index("<tbody>"):section.index("</tbody>")]
    rows = re.findall(r'<tr class="([^"]*)"><td>(\d+)</td><td class="l"><a class="mono"[^>]*>([^<]+)</a>', table)
    names = [name for _, _, name in rows]
    assert names[0] == "decoder.layer.5.attn" and "first" in rows[0][0].split()
    assert '<span class="chip s-first">first divergence</span>' in table and table.count("s-first") == 1
    probes = {p["name"]: p for p in failing["sections"][1]["result"]["probes"]}
    # a rule breaks them: outside tolerance, or (strict) more than 8x above the noise floor (the planted suspect)
    broken = [n for n in probes if probes[n]["propagated"]["status"] != "pass"
              or float(probes[n].get("floor_ratio") or 0) > 8]
    rest = sorted((n for n in broken if n != "decoder.layer.5.attn"), key=lambda n: probes[n]["order"])
    assert names[:len(broken)] == ["decoder.layer.5.attn"] + rest  # the recorded culprit, then execution order
    assert all(probes[n]["propagated"]["status"] == "pass" for n in names[len(broken):])  # then non-zero passing
    ratios = [float(probes[n]["propagated"]["metrics"]["tol_ratio"]) for n in names[:len(broken)]]
    assert ratios != sorted(ratios, reverse=True)  # not worst-first: the culprit is not the largest error here


def _lenient_report_with_a_suspect() -> dict:
    """A passing (lenient) report whose model section records a first divergence: its suspect, far above the floor."""
    from parity.verdict import Policy

    data = _with_floors(_result("teacher_forced", model_rows(99)), suspect="decoder.layer.2.mlp")
    data.update(first_divergence="decoder.layer.2.mlp", lenient=True)
    pre = _result("propagated", [("features.fbank", 2e-7, {})])
    return build_multi_report([("features", "preprocessing", pre, None), ("clip", "model", data, None)],
                              {"mode": "teacher_forced"}, policy=Policy(lenient=True))


def test_a_passing_section_shows_no_first_divergence():
    report = _lenient_report_with_a_suspect()
    assert report["sections"][1]["summary"]["verdict"] == "pass"
    assert report["sections"][1]["summary"]["first_divergence"]["name"] == "decoder.layer.2.mlp"  # in the record
    page = render_html(report)
    section = _section_html(page, 1)
    assert "first divergence" not in _text(section).lower(), "a passing section names a first divergence"
    assert "first suspect" in section  # what it is: a suspect, still marked
    sections_table = page[page.index("<h2>Sections</h2>"):page.index("<h2>Provenance</h2>")]
    assert "decoder.layer.2.mlp</a>" not in sections_table
    assert "first divergence" not in render_terminal(report).lower()


def test_inputs_card_spans_the_whole_row(failing):
    """The inputs table (audio, seconds, tokens, ...) was squeezed into one grid column."""
    page = render_html(failing)
    assert re.search(r'<div class="card wide"><h3>Inputs</h3>', page)
    assert re.search(r"\.prov \.card\.wide \{ grid-column: 1 / -1; \}", page)


def test_headline_passes_with_the_margin_of_each_rule(real):
    from parity.report import headline

    name, ratio = _worst(real)
    assert headline(real) == f"PASS: worst probe at {ratio:.2g} of its tolerance ({name}); no noise floor measured"
    report = _lenient_report_with_a_suspect()
    report["summary"]["verdict"] = "pass"
    line = headline(report)
    # the planted suspect: max |d| 3e-6 (decoder layer 2, 1e-6 * (2 + 1)) over its floor 1e-8 (_with_floors)
    assert "errors at most 300x their noise floor, 8x allowed (decoder.layer.2.mlp)" in line
    assert line.endswith("lenient: floor, formula and upcast findings do not fail")


def test_headline_of_a_16_bit_pass_names_the_gate_that_passed_probes_outside_the_table(real):
    from parity.report import headline

    report = copy.deepcopy(real)
    probes = report["sections"][0]["result"]["probes"]
    gated = {"decoder.layer.3": 3.2, "decoder.layer.7": 5.5}
    for probe in probes:
        if probe["name"] in gated:  # what parity.diff records on a bf16 probe outside the table inside the gate
            probe["propagated"]["metrics"]["tol_ratio"] = 40.0
            probe["propagated"]["detail"] = (f"max |d| above tolerance; needs {gated[probe['name']]:.3g} x HF's own "
                                             "rounding error (the largest row floor, 0.26); passes the measured "
                                             "16-bit gate")
    inside = max(float(p["propagated"]["metrics"]["tol_ratio"]) for p in probes if p["name"] not in gated)
    line = headline(report)
    assert line.startswith(f"PASS: worst probe at {inside:.2g} of its tolerance"), line  # not the gated 40x
    assert "2 16-bit probe(s) outside the dtype table within 5.5x HF's own rounding error, 8x allowed " \
           "(decoder.layer.7)" in line


def test_headline_of_an_incomplete_run_names_the_checks_not_run(real):
    from parity.report import headline

    report = copy.deepcopy(real)
    missing = {"check": "noise floors", "why": "HF in float64 does not fit", "cause": "memory"}
    report["summary"].update(verdict="incomplete", not_run=[missing], unaccepted=[missing])
    line = headline(report)
    assert line.startswith("INCOMPLETE: 1 planned check(s) did not run, not asked for: noise floors (memory)")
    assert "every check that ran passed: worst probe at" in line
    report["summary"].update(verdict="pass", unaccepted=[])  # asked for (--floors off): the line still counts it
    assert headline(report).endswith("; 1 planned check(s) not run (0 not asked for)")


def test_headline_of_a_failure_without_recorded_firsts_finds_the_first_rule_broken(failing):
    from parity.report import headline

    report = copy.deepcopy(failing)
    report["summary"]["first_divergence"] = None  # an older or hand-made report
    for section in report["sections"]:
        section["summary"]["first_divergence"] = None
    # by the rules, not by status: the planted suspect (300x its floor, strict) comes before decoder.layer.5.attn
    assert headline(report) == ("FAIL: first divergence decoder.layer.2.mlp (clip 9001-101-0000): floor: 300x its "
                                "noise floor, 8x allowed; 2 of 3 section(s) fail")
