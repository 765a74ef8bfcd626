"""Reports over time: two parity reports compared probe by probe, to catch an error that grows while still inside
tolerance (a 100x jump from 1e-7 to 1e-5 passes every tolerance check yet says something changed).

Probes are matched by (section title, probe name); when both reports have a single section the title is ignored, so
a schema-1 report (one unnamed section) can serve as the baseline of a schema-2 one. The diff is a JSON-able dict
(non-finite numbers as strings, like the reports); renderers read only that dict. Model-agnostic.

Each matched probe gets its own bound, from its own baseline measurement, never one global number: its new max |Δ|
may reach `growth` x its baseline max |Δ| (values below `floor_abs` count as `floor_abs`, so 0 -> 1e-12 is no
change), or, where the baseline measured the probe's noise floor (max |HF - HF float64|), `floor_factor` x that floor
if larger: an error still inside rounding noise (the verdict's floor rule, parity.verdict, fails an error only
past FLOOR_FACTOR x its floor) has not grown in any way that matters, while logits measured at 2e-7 that grow to
2e-5 are flagged although every global bound (tolerance 1e-3, regression bound 1e-4) still holds. The new report's
floors are never used: a report cannot loosen its own bound.

The verdict is 'regressed' (`diff` exits 1) when any of these holds, else 'ok':
- a matched probe grew past its bound, or went from pass to not-pass;
- a section's verdict went from pass to not-pass, even when every probe matched (a sharp rule, e.g. the noise
  floor, fails a section without any probe status changing), or the report's own verdict did (pass -> incomplete:
  a planned check no longer ran);
- a probe or a whole section of the baseline is absent from the new report (disappeared): a check that vanished
  cannot be counted as passing, and a renamed probe is one that disappeared plus one that appeared;
- a probe or section that appeared (absent from the baseline) does not pass: no baseline can excuse it.
Appeared probes and sections that pass are listed and flagged (the reports no longer match one to one: refresh the
baseline) but do not fail the verdict: new coverage is not a regression.
"""

import math
from pathlib import Path
from typing import List, Mapping, Optional, Tuple, Union

from parity.verdict import FLOOR_FACTOR
from parity.report import (_execution_order, _float, _jfloat, _metrics, _num, _pct, _plot, _times, margin_text,
                           read_json, template_environment, upgrade)

DIFF_SCHEMA = "parity-report-diff/2"  # 2: per-probe bounds, sections, presence counted in the verdict
_PASS = "pass"
_ABSENT = {"status": "absent", "max_abs": None, "tol_ratio": None}  # the missing side of an unmatched row (HTML)


class ReportFieldError(ValueError):
    """A report lacks a field the diff reads, or holds it with another type; `field` is its path in the JSON."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field} {problem}")
        self.field = field


_TYPES = {Mapping: "an object", list: "a list", str: "a string"}


def _need(container: Mapping, key: str, kind: type, where: str) -> object:
    path = f"{where}.{key}" if where else key
    if key not in container:
        raise ReportFieldError(path, "is missing")
    if not isinstance(container[key], kind):
        raise ReportFieldError(path, f"is {type(container[key]).__name__}, expected {_TYPES[kind]}")
    return container[key]


def check_report_fields(report: Mapping) -> None:
    """Raise ReportFieldError naming the first field the diff reads that `report` (schema 2, or upgraded from 1)
    lacks: the summary's and every section's verdict, section titles, each probe's name and propagated status."""
    _need(_need(report, "summary", Mapping, ""), "verdict", str, "summary")
    for i, section in enumerate(_need(report, "sections", list, "")):
        where = f"sections[{i}]"
        if not isinstance(section, Mapping):
            raise ReportFieldError(where, f"is {type(section).__name__}, expected an object")
        _need(section, "title", str, where)
        _need(_need(section, "summary", Mapping, where), "verdict", str, f"{where}.summary")
        for j, probe in enumerate(_need(_need(section, "result", Mapping, where), "probes", list, f"{where}.result")):
            at = f"{where}.result.probes[{j}]"
            if not isinstance(probe, Mapping):
                raise ReportFieldError(at, f"is {type(probe).__name__}, expected an object")
            _need(probe, "name", str, at)
            propagated = _need(probe, "propagated", Mapping, at)
            _need(propagated, "status", str, f"{at}.propagated")
            if propagated.get("metrics") is not None:
                _need(propagated, "metrics", Mapping, f"{at}.propagated")


def _info(report: Mapping) -> dict:
    meta, summary = report.get("meta") or {}, report["summary"]
    return {"created": meta.get("created"), "git_commit": meta.get("git_commit"), "device": meta.get("device"),
            "device_name": meta.get("device_name"), "dtype": meta.get("dtype"), "verdict": summary.get("verdict"),
            "probes": summary.get("probes"), "margin": margin_text(summary.get("margin"),
                                                                   with_section=len(report["sections"]) > 1),
            "schema": report.get("upgraded_from") or report.get("schema")}


def _side(probe: Mapping) -> dict:
    m = _metrics(probe)
    return {"index": probe.get("index"), "status": probe["propagated"]["status"], "max_abs": m.get("max_abs"),
            "tol_ratio": m.get("tol_ratio"), "noise_floor": probe.get("noise_floor")}


def _probes(report: Mapping, single: bool) -> List[Tuple[Tuple[str, str], str, Mapping]]:
    """((match key), section title, probe) in section and execution order."""
    return [(("" if single else s["title"], p["name"]), s["title"], p)
            for s in report["sections"] for p in _execution_order(s["result"]["probes"])]


def _bound(old_abs: float, noise_floor: Optional[float], *, growth: float, floor_abs: float,
           floor_factor: float) -> float:
    """The largest new max |Δ| that is not a growth: growth x the baseline error, or floor_factor x the baseline's
    noise floor where measured and larger."""
    bound = growth * max(old_abs, floor_abs)
    if noise_floor is not None and math.isfinite(noise_floor):
        bound = max(bound, floor_factor * noise_floor)
    return bound


def _row(title: str, name: str, old: Optional[dict], new: Optional[dict]) -> dict:
    """A diff row before judgement: unmatched rows fail when a probe disappeared or appeared without passing."""
    return {"section": title, "name": name, "old": old, "new": new, "growth": None, "from_zero": False, "bound": None,
            "noise_floor": None if old is None else old["noise_floor"], "grew": False, "status_changed": False,
            "regressed": False, "fixed": False, "only_in_old": new is None, "only_in_new": old is None,
            "fails": new is None or (old is None and new["status"] != _PASS)}


def _judge(row: dict, *, growth: float, floor_abs: float, floor_factor: float) -> None:
    """Growth factor, bound and status change of a matched row, in place."""
    o, n = row["old"], row["new"]
    old_abs, new_abs = _float(o["max_abs"]), _float(n["max_abs"])
    if old_abs is not None and new_abs is not None:
        # both sides floored: 0 -> 0 and 0 -> 1e-12 are "no change" (1x), not 0x or a huge factor
        factor = max(new_abs, floor_abs) / max(old_abs, floor_abs) if not math.isnan(old_abs) else math.nan
        row["growth"] = _jfloat(factor)
        # from (about) zero a ratio only measures floor_abs: such a change is shown as old -> new, never as a factor
        row["from_zero"] = bool(old_abs <= floor_abs < new_abs)
        if not math.isnan(old_abs):
            bound = _bound(old_abs, _float(o["noise_floor"]), growth=growth, floor_abs=floor_abs,
                           floor_factor=floor_factor)
            row["bound"] = _jfloat(bound)
            row["grew"] = bool(new_abs > bound)  # NaN compares False: a NaN error fails on its status instead
    row["status_changed"] = o["status"] != n["status"]
    row["regressed"] = o["status"] == _PASS and n["status"] != _PASS
    row["fixed"] = o["status"] != _PASS and n["status"] == _PASS
    row["fails"] = row["grew"] or row["regressed"]


def _section_side(section: Mapping) -> dict:
    return {"verdict": section["summary"]["verdict"], "probes": len(section["result"]["probes"])}


def _section_row(title: str, old: Optional[dict], new: Optional[dict]) -> dict:
    matched = old is not None and new is not None
    regressed = matched and old["verdict"] == _PASS and new["verdict"] != _PASS
    return {"title": title, "old": old, "new": new, "only_in_old": new is None, "only_in_new": old is None,
            "regressed": regressed, "fixed": matched and old["verdict"] != _PASS and new["verdict"] == _PASS,
            "fails": new is None or regressed or (old is None and new["verdict"] != _PASS)}


def _section_rows(old: Mapping, new: Mapping, single: bool) -> List[dict]:
    """One row per section (matched by title, or the only two matched whatever their titles), new report's order
    first, then those only in the baseline."""
    olds = {("" if single else s["title"]): s for s in old["sections"]}
    rows = []
    for section in new["sections"]:
        before = olds.pop("" if single else section["title"], None)
        rows.append(_section_row(section["title"], None if before is None else _section_side(before),
                                 _section_side(section)))
    return rows + [_section_row(s["title"], _section_side(s), None) for s in olds.values()]


def _summary(rows: List[dict], sections: List[dict], report_regressed: bool) -> dict:
    matched = [r for r in rows if r["old"] and r["new"]]
    growths = [r for r in matched if _float(r["growth"]) is not None and not math.isnan(_float(r["growth"]))]
    biggest = max((r for r in growths if not r.get("from_zero")), key=lambda r: _float(r["growth"]), default=None)
    jumps = [r for r in matched if r.get("from_zero")]
    jump = max(jumps, key=lambda r: _float(r["new"]["max_abs"])) if jumps else None

    def count(items: List[dict], key: str) -> int:
        return sum(bool(item[key]) for item in items)

    return {
        "verdict": "regressed" if report_regressed or any(item["fails"] for item in rows + sections) else "ok",
        "matched": len(matched),
        "grew": count(rows, "grew"),
        "status_changed": count(rows, "status_changed"),
        "regressed": count(rows, "regressed"),
        "fixed": count(rows, "fixed"),
        "only_in_old": count(rows, "only_in_old"),
        "only_in_new": count(rows, "only_in_new"),
        "only_in_new_failing": sum(r["only_in_new"] and r["fails"] for r in rows),
        "sections_only_in_old": count(sections, "only_in_old"),
        "sections_only_in_new": count(sections, "only_in_new"),
        "sections_regressed": count(sections, "regressed"),
        "sections_fixed": count(sections, "fixed"),
        "report_regressed": report_regressed,
        "max_growth": None if biggest is None else {"section": biggest["section"], "name": biggest["name"],
                                                    "growth": biggest["growth"]},
        # the largest error that appeared where the baseline had (about) none: an absolute change, not a factor
        "max_from_zero": None if jump is None else {"section": jump["section"], "name": jump["name"],
                                                    "old": jump["old"]["max_abs"], "new": jump["new"]["max_abs"]},
    }


def diff_reports(old: Mapping, new: Mapping, *, growth: float = 10.0, floor_abs: float = 1e-9,
                 floor_factor: float = FLOOR_FACTOR) -> dict:
    """Per probe: old/new status, max_abs, tol_ratio and noise floor, the growth factor new/old max_abs (both
    floored at `floor_abs`), the probe's bound and whether it `grew` past it, status change, presence; per section:
    verdict change and presence; the verdict (module docstring: what makes it 'regressed')."""
    old, new = upgrade(old), upgrade(new)
    check_report_fields(old)
    check_report_fields(new)
    single = len(old["sections"]) == 1 and len(new["sections"]) == 1
    olds = {key: (title, probe) for key, title, probe in _probes(old, single)}
    rows: List[dict] = []
    for key, title, probe in _probes(new, single):
        before = olds.pop(key, None)
        row = _row(title, probe["name"], None if before is None else _side(before[1]), _side(probe))
        if before is not None:
            _judge(row, growth=growth, floor_abs=floor_abs, floor_factor=floor_factor)
        rows.append(row)
    rows += [_row(title, probe["name"], _side(probe), None) for title, probe in olds.values()]
    sections = _section_rows(old, new, single)
    before, after = _info(old), _info(new)
    # the run's verdict too: pass -> incomplete (a planned check no longer ran) fails though every section passes
    report_regressed = before["verdict"] == _PASS and after["verdict"] != _PASS
    return {"schema": DIFF_SCHEMA, "growth": growth, "floor_abs": floor_abs, "floor_factor": floor_factor,
            "single_section": single, "old": before, "new": after,
            "summary": _summary(rows, sections, report_regressed), "sections": sections, "probes": rows}


def growth_text(row: Mapping) -> str:
    """A row's change: the factor new/old max |Δ| ('12×'), or from (about) zero the absolute change '0 → 0.16'."""
    if row.get("from_zero"):
        return f"{_num(row['old']['max_abs'])} → {_num(row['new']['max_abs'])}"
    return _times(row.get("growth"))


def _largest_change(summary: Mapping, single: bool) -> List[str]:
    """'largest growth 12× at NAME', 'largest error from zero 0 → 0.16 at NAME' (where each exists)."""
    out = []
    for key, text in (("max_growth", lambda m: f"largest growth {_times(m['growth'])}"),
                      ("max_from_zero", lambda m: f"largest error from zero {_num(m['old'])} → {_num(m['new'])}")):
        item = summary.get(key)
        if item:
            out.append(f"{text(item)} at {item['name']}" + ("" if single else f" ({item['section']})"))
    return out


def _label(row: Mapping, single: bool) -> str:
    return row["name"] if single else f"{row['section']} / {row['name']}"


def _flagged(diff: Mapping) -> List[Mapping]:
    """Matched probes that grew past their bound or changed status, largest growth first."""
    return sorted((r for r in diff["probes"] if r["old"] and r["new"] and (r["grew"] or r["status_changed"])),
                  key=_growth_key, reverse=True)


def _growth_key(row: Mapping) -> float:
    value = _float(row.get("growth"))
    return -1.0 if value is None else (math.inf if math.isnan(value) else value)


def _whole_sections(diff: Mapping) -> set:
    """Titles of the sections that disappeared or appeared whole: their probes are named through the section."""
    return {s["title"] for s in diff["sections"] if s["only_in_old"] or s["only_in_new"]}


def _section_text(section: Mapping) -> str:
    old, new = section["old"], section["new"]
    if old and new:
        return f"{section['title']} ({old['verdict']} -> {new['verdict']})"
    side = old or new
    return f"{section['title']} ({side['probes']} probes, {side['verdict']})"


def _names(items: List[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f" ... {len(items) - limit} more" if len(items) > limit else "")


# (row key, what the line lists, what it means for the verdict)
_SECTION_CHANGES = (("only_in_old", "sections that disappeared", "each a regression"),
                    ("only_in_new", "sections that appeared", "a regression where not passing"),
                    ("regressed", "sections whose verdict went from pass to not-pass", "each a regression"),
                    ("fixed", "sections whose verdict went to pass", "not a regression"))
_PROBE_PRESENCE = (("only_in_old", "probes that disappeared", "each a regression"),
                   ("only_in_new", "probes that appeared", "a regression where not passing"))


def _presence_lines(diff: Mapping, single: bool) -> List[str]:
    """Sections that disappeared, appeared or changed verdict, then unmatched probes, by name; the probes of a
    section that disappeared or appeared whole are counted, not listed again."""
    lines = []
    if diff["summary"]["report_regressed"]:
        lines.append(f"report verdict went from pass to {diff['new']['verdict']} (a regression)")
    for key, text, meaning in _SECTION_CHANGES:
        chosen = [_section_text(s) for s in diff["sections"] if s[key]]
        if chosen:
            lines.append(f"{text} ({len(chosen)}, {meaning}): {_names(chosen)}")
    whole = _whole_sections(diff)
    for key, text, meaning in _PROBE_PRESENCE:
        rows = [r for r in diff["probes"] if r[key]]
        names = [_label(r, single) + (f" [{r['new']['status']}]" if r["only_in_new"] and r["fails"] else "")
                 for r in rows if r["section"] not in whole]
        inside = len(rows) - len(names)
        if rows:
            lines.append(f"{text} ({len(rows)}, {meaning}): "
                         + _names(names + ([f"the {inside} of the sections above"] if inside else [])))
    return lines


def _verdict_line(diff: Mapping) -> str:
    s = diff["summary"]
    line = (f"REPORT DIFF {s['verdict'].upper()}: {s['grew']} probe(s) grew past their bound ({diff['growth']:g}x "
            f"the baseline max |d|, or {diff['floor_factor']:g}x its noise floor if larger), {s['regressed']} went "
            f"from pass to not-pass ({s['status_changed']} status change(s), {s['fixed']} fixed); {s['matched']} "
            f"matched, {s['only_in_old']} disappeared, {s['only_in_new']} appeared")
    if s["sections_only_in_old"] or s["sections_only_in_new"] or s["sections_regressed"]:
        line += (f"; sections: {s['sections_only_in_old']} disappeared, {s['sections_only_in_new']} appeared, "
                 f"{s['sections_regressed']} went from pass to not-pass")
    return line


def _table(rows: List[Mapping], single: bool, name_width: int) -> List[str]:
    """The header and one line per row, grouped under a line per section (titles and names are never cut: a
    truncated name hides which probe it is)."""
    width = max([name_width] + [len(r["name"]) for r in rows])
    header = (f"  {'probe':<{width}} {'old status':<14} {'new status':<14} {'old max|d|':>10} {'new max|d|':>10} "
              f"{'bound':>10} {'growth':>10} {'old e/tol':>9} {'new e/tol':>9}")
    lines, section = [header], None
    for r in rows:
        if not single and r["section"] != section:
            section = r["section"]
            lines.append(f"  [{section}]")
        o, n = r["old"], r["new"]
        flag = "!" if r["fails"] else ("*" if r["status_changed"] else " ")
        lines.append(f"{flag} {r['name']:<{width}} {o['status']:<14} {n['status']:<14} {_num(o['max_abs']):>10} "
                     f"{_num(n['max_abs']):>10} {_num(r['bound']):>10} {growth_text(r):>10} "
                     f"{_pct(o['tol_ratio']):>9} {_pct(n['tol_ratio']):>9}")
    return lines


def render_diff_terminal(diff: Mapping, *, max_rows: int = 40, context: int = 5, name_width: int = 40) -> str:
    """Verdict line, sections and probes that disappeared / appeared / changed verdict, the flagged probes (grew
    past their bound / status changed), then the largest growth factors among the rest."""
    single = diff.get("single_section", True)
    lines = [_verdict_line(diff)] + [
        f"  {side}: {diff[side]['verdict']} {diff[side]['probes']} probes, {diff[side]['created']}, commit "
        f"{diff[side]['git_commit']}; {diff[side]['margin']}" for side in ("old", "new")]
    lines += [f"  {text}" for text in _largest_change(diff["summary"], single)]
    lines += _presence_lines(diff, single)
    flagged = _flagged(diff)
    if flagged:
        lines.append(f"flagged ({len(flagged)}; ! = regression, * = other status change):")
        lines += _table(flagged[:max_rows], single, name_width)
        if len(flagged) > max_rows:
            lines.append(f"  ... {len(flagged) - max_rows} more")
    shown = {id(r) for r in flagged}
    rest = sorted((r for r in diff["probes"] if id(r) not in shown and r["old"] and r["new"]), key=_growth_key,
                  reverse=True)[:context]
    if rest:
        lines += ["largest growth among the other probes:"] + _table(rest, single, name_width)
    return "\n".join(lines)


def _growth_plot(diff: Mapping) -> dict:
    """The report plot's geometry over growth factors: y = growth / limit, so the red line is the limit."""
    limit = diff["growth"]
    pseudo = []
    for k, r in enumerate(r for r in diff["probes"] if r["old"] and r["new"]):
        factor = None if r.get("from_zero") else _float(r["growth"])  # from zero: no factor, drawn at the top
        pseudo.append({"name": r["name"] if diff.get("single_section", True) else f"{r['section']}.{r['name']}",
                       "index": k, "order": k,
                       "propagated": {"status": "fail" if r["fails"] else _PASS,
                                      "metrics": {"tol_ratio": None if factor is None else _jfloat(factor / limit),
                                                  "max_abs": r["new"]["max_abs"]}},
                       "tolerance": {"atol": 0, "rtol": 0}, "teacher": {}})
    return _plot(pseudo, {}, False, grid_label=lambda d: f"{limit * 10.0 ** d:g}×", y_title="growth new/old max |Δ|",
                 names={"pass": "within its bound", "fail": "grew / regressed", "layer max": "layer max",
                        "tolerance": f"limit {limit:g}×"})


def _html_flagged(diff: Mapping, single: bool) -> List[dict]:
    """The rows of the page's flagged table: the report's verdict if it regressed, changed sections, flagged matched
    probes, then unmatched probes outside those sections; a missing side reads 'absent', and a row that fails the
    diff is marked like a regression (the template marks grew-or-regressed rows)."""
    def view(label: str, old: Optional[Mapping], new: Optional[Mapping], fails: bool) -> dict:
        return {"label": label, "old": old or _ABSENT, "new": new or _ABSENT, "grew": False, "regressed": fails,
                "growth": None}

    rows = [view("whole report", {**_ABSENT, "status": diff["old"]["verdict"]},
                 {**_ABSENT, "status": diff["new"]["verdict"]}, True)] if diff["summary"]["report_regressed"] else []
    rows += [view(f"section {s['title']} ({(s['new'] or s['old'])['probes']} probes)",
                 s["old"] and {**_ABSENT, "status": s["old"]["verdict"]},
                 s["new"] and {**_ABSENT, "status": s["new"]["verdict"]}, s["fails"])
            for s in diff["sections"] if s["only_in_old"] or s["only_in_new"] or s["regressed"] or s["fixed"]]
    rows += [{**r, "label": _label(r, single)} for r in _flagged(diff)]
    whole = _whole_sections(diff)
    rows += [view(_label(r, single), r["old"], r["new"], r["fails"]) for r in diff["probes"]
             if (r["only_in_old"] or r["only_in_new"]) and r["section"] not in whole]
    return rows


def render_diff_html(diff: Mapping, *, title: str = "Parity report diff") -> str:
    single = diff.get("single_section", True)
    matched = sorted((r for r in diff["probes"] if r["old"] and r["new"]), key=_growth_key, reverse=True)
    return template_environment().get_template("report_diff.html.j2").render(
        title=title, diff=diff, summary=diff["summary"], flagged=_html_flagged(diff, single), matched=matched,
        only_old=[r for r in diff["probes"] if r["only_in_old"]], only_new=[r for r in diff["probes"] if r["only_in_new"]],
        plot=_growth_plot(diff) if matched else None, label=lambda r: r.get("label") or _label(r, single),
        growth_text=growth_text, largest=_largest_change(diff["summary"], single))


def write_diff_html(diff: Mapping, path: Union[str, Path], *, title: str = "Parity report diff") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_diff_html(diff, title=title), encoding="utf-8")
    return path


def _load(report: Union[Mapping, str, Path]) -> Mapping:
    return read_json(report) if isinstance(report, (str, Path)) else report


def assert_no_growth(baseline_report: Union[Mapping, str, Path], new_report: Union[Mapping, str, Path],
                     growth: float = 10.0, *, floor_abs: float = 1e-9, floor_factor: float = FLOOR_FACTOR) -> dict:
    """Raise AssertionError (message: the terminal diff) when the diff against the baseline is 'regressed': a probe
    grew past its bound or stopped passing, a section stopped passing, or a probe or section disappeared (module
    docstring); returns the diff otherwise. Reports may be given as dicts or JSON paths."""
    diff = diff_reports(_load(baseline_report), _load(new_report), growth=growth, floor_abs=floor_abs,
                        floor_factor=floor_factor)
    if diff["summary"]["verdict"] != "ok":
        raise AssertionError("parity report regressed against the baseline\n" + render_diff_terminal(diff))
    return diff
