"""Reports over time: two parity reports compared probe by probe, to catch an error that grows while still inside
tolerance (a 100x jump from 1e-7 to 1e-5 passes every tolerance check yet says something changed).

Probes are matched by (section title, probe name); when both reports have a single section the title is ignored, so
a schema-1 report (one unnamed section) can serve as the baseline of a schema-2 one. The diff is a JSON-able dict
(non-finite numbers as strings, like the reports); renderers read only that dict. Model-agnostic.
"""

import math
from pathlib import Path
from typing import Any, List, Mapping, Tuple, Union

from parity.report import (_execution_order, _float, _jfloat, _metrics, _num, _pct, _plot, margin_text,
                           read_json, template_environment, upgrade)

DIFF_SCHEMA = "parity-report-diff/1"
_PASS = "pass"


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
            "tol_ratio": m.get("tol_ratio")}


def _probes(report: Mapping, single: bool) -> List[Tuple[Tuple[str, str], str, Mapping]]:
    """((match key), section title, probe) in section and execution order."""
    return [(("" if single else s["title"], p["name"]), s["title"], p)
            for s in report["sections"] for p in _execution_order(s["result"]["probes"])]


def diff_reports(old: Mapping, new: Mapping, *, growth: float = 10.0, floor_abs: float = 1e-9) -> dict:
    """Per probe: old/new max_abs and tol_ratio, status change, growth factor new/old max_abs (values below
    `floor_abs` count as `floor_abs`, so 0 -> 1e-12 is 1x, not a regression); `grew` when the factor exceeds
    `growth` and the new max_abs exceeds `floor_abs`. Verdict 'regressed' when a probe grew or went from pass to not-pass."""
    old, new = upgrade(old), upgrade(new)
    single = len(old["sections"]) == 1 and len(new["sections"]) == 1
    olds = {key: (title, probe) for key, title, probe in _probes(old, single)}
    rows: List[dict] = []
    for key, title, probe in _probes(new, single):
        before = olds.pop(key, None)
        row = {"section": title, "name": probe["name"], "old": None if before is None else _side(before[1]),
               "new": _side(probe), "growth": None, "grew": False, "status_changed": False, "regressed": False,
               "fixed": False, "only_in_old": False, "only_in_new": before is None}
        if before is not None:
            o, n = row["old"], row["new"]
            old_abs, new_abs = _float(o["max_abs"]), _float(n["max_abs"])
            if old_abs is not None and new_abs is not None:
                # both sides floored: 0 -> 0 and 0 -> 1e-12 are "no change" (1x), not 0x or a huge factor
                factor = max(new_abs, floor_abs) / max(old_abs, floor_abs) if not math.isnan(old_abs) else math.nan
                row["growth"] = _jfloat(factor)
                row["grew"] = bool(factor > growth and new_abs > floor_abs)
            row["status_changed"] = o["status"] != n["status"]
            row["regressed"] = o["status"] == _PASS and n["status"] != _PASS
            row["fixed"] = o["status"] != _PASS and n["status"] == _PASS
        rows.append(row)
    for (title, probe) in olds.values():
        rows.append({"section": title, "name": probe["name"], "old": _side(probe), "new": None, "growth": None,
                     "grew": False, "status_changed": False, "regressed": False, "fixed": False, "only_in_old": True,
                     "only_in_new": False})
    matched = [r for r in rows if r["old"] and r["new"]]
    growths = [r for r in matched if _float(r["growth"]) is not None and not math.isnan(_float(r["growth"]))]
    biggest = max(growths, key=lambda r: _float(r["growth"])) if growths else None
    summary = {
        "verdict": "regressed" if any(r["grew"] or r["regressed"] for r in rows) else "ok",
        "matched": len(matched),
        "grew": sum(r["grew"] for r in rows),
        "status_changed": sum(r["status_changed"] for r in rows),
        "regressed": sum(r["regressed"] for r in rows),
        "fixed": sum(r["fixed"] for r in rows),
        "only_in_old": sum(r["only_in_old"] for r in rows),
        "only_in_new": sum(r["only_in_new"] for r in rows),
        "max_growth": None if biggest is None else {"section": biggest["section"], "name": biggest["name"],
                                                    "growth": biggest["growth"]},
    }
    return {"schema": DIFF_SCHEMA, "growth": growth, "floor_abs": floor_abs, "single_section": single,
            "old": _info(old), "new": _info(new), "summary": summary, "probes": rows}


def _label(row: Mapping, single: bool) -> str:
    return row["name"] if single else f"{row['section']} / {row['name']}"


def _flagged(diff: Mapping) -> List[Mapping]:
    return [r for r in diff["probes"] if r["grew"] or r["status_changed"]]


def _growth_key(row: Mapping) -> float:
    value = _float(row.get("growth"))
    return -1.0 if value is None else (math.inf if math.isnan(value) else value)


def _times(value: Any) -> str:
    number = _float(value)
    if number is None:
        return "–"
    return _num(value) if not math.isfinite(number) else f"{number:.3g}×"


def render_diff_terminal(diff: Mapping, *, max_rows: int = 40, context: int = 5, name_width: int = 40) -> str:
    """Verdict line, the flagged probes (grew / status changed), then the largest growth factors among the rest."""
    s, single = diff["summary"], diff.get("single_section", True)
    lines = [
        f"REPORT DIFF {s['verdict'].upper()}: {s['grew']} probe(s) grew > {diff['growth']:g}x, {s['regressed']} went "
        f"from pass to not-pass ({s['status_changed']} status change(s), {s['fixed']} fixed); {s['matched']} matched, "
        f"{s['only_in_old']} only in old, {s['only_in_new']} only in new",
        f"  old: {diff['old']['verdict']} {diff['old']['probes']} probes, {diff['old']['created']}, commit "
        f"{diff['old']['git_commit']}; {diff['old']['margin']}",
        f"  new: {diff['new']['verdict']} {diff['new']['probes']} probes, {diff['new']['created']}, commit "
        f"{diff['new']['git_commit']}; {diff['new']['margin']}",
    ]
    header = (f"  {'probe':<{name_width}} {'old status':<14} {'new status':<14} {'old max|d|':>10} {'new max|d|':>10} "
              f"{'growth':>8} {'old e/tol':>9} {'new e/tol':>9}")

    def row(r: Mapping) -> str:
        o, n = r["old"] or {}, r["new"] or {}
        name = _label(r, single)
        name = name if len(name) <= name_width else "…" + name[-(name_width - 1):]
        flag = "!" if r["grew"] or r["regressed"] else ("*" if r["status_changed"] else " ")
        return (f"{flag} {name:<{name_width}} {o.get('status', '(absent)'):<14} {n.get('status', '(absent)'):<14} "
                f"{_num(o.get('max_abs')):>10} {_num(n.get('max_abs')):>10} {_times(r['growth']):>8} "
                f"{_pct(o.get('tol_ratio')):>9} {_pct(n.get('tol_ratio')):>9}")

    flagged = sorted(_flagged(diff), key=_growth_key, reverse=True)
    if flagged:
        lines += [f"flagged ({len(flagged)}; ! = regression, * = other status change):", header]
        lines += [row(r) for r in flagged[:max_rows]]
        if len(flagged) > max_rows:
            lines.append(f"  ... {len(flagged) - max_rows} more")
    shown = {id(r) for r in flagged}
    rest = sorted((r for r in diff["probes"] if id(r) not in shown and r["old"] and r["new"]), key=_growth_key,
                  reverse=True)[:context]
    if rest:
        lines += ["largest growth among the other probes:", header] + [row(r) for r in rest]
    for key, label in (("only_in_old", "only in old"), ("only_in_new", "only in new")):
        names = [_label(r, single) for r in diff["probes"] if r[key]]
        if names:
            lines.append(f"{label} ({len(names)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
    return "\n".join(lines)


def _growth_plot(diff: Mapping) -> dict:
    """The report plot's geometry over growth factors: y = growth / limit, so the red line is the limit."""
    limit = diff["growth"]
    pseudo = []
    for k, r in enumerate(r for r in diff["probes"] if r["old"] and r["new"]):
        factor = _float(r["growth"])
        pseudo.append({"name": r["name"] if diff.get("single_section", True) else f"{r['section']}.{r['name']}",
                       "index": k, "order": k,
                       "propagated": {"status": "fail" if r["grew"] or r["regressed"] else _PASS,
                                      "metrics": {"tol_ratio": None if factor is None else _jfloat(factor / limit),
                                                  "max_abs": r["new"]["max_abs"]}},
                       "tolerance": {"atol": 0, "rtol": 0}, "teacher": {}})
    return _plot(pseudo, {}, False, grid_label=lambda d: f"{limit * 10.0 ** d:g}×", y_title="growth new/old max |Δ|",
                 names={"pass": "within limit", "fail": "grew / regressed", "layer max": "layer max",
                        "tolerance": f"limit {limit:g}×"})


def render_diff_html(diff: Mapping, *, title: str = "Parity report diff") -> str:
    single = diff.get("single_section", True)
    flagged = sorted(_flagged(diff), key=_growth_key, reverse=True)
    matched = sorted((r for r in diff["probes"] if r["old"] and r["new"]), key=_growth_key, reverse=True)
    return template_environment().get_template("report_diff.html.j2").render(
        title=title, diff=diff, summary=diff["summary"], flagged=flagged, matched=matched,
        only_old=[r for r in diff["probes"] if r["only_in_old"]], only_new=[r for r in diff["probes"] if r["only_in_new"]],
        plot=_growth_plot(diff) if matched else None, label=lambda r: _label(r, single), times=_times)


def write_diff_html(diff: Mapping, path: Union[str, Path], *, title: str = "Parity report diff") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_diff_html(diff, title=title), encoding="utf-8")
    return path


def _load(report: Union[Mapping, str, Path]) -> Mapping:
    return read_json(report) if isinstance(report, (str, Path)) else report


def assert_no_growth(baseline_report: Union[Mapping, str, Path], new_report: Union[Mapping, str, Path],
                     growth: float = 10.0, *, floor_abs: float = 1e-9) -> dict:
    """Raise AssertionError (message: the terminal diff) when a probe grew more than `growth`x or went from pass to
    not-pass against the baseline; returns the diff otherwise. Reports may be given as dicts or JSON paths."""
    diff = diff_reports(_load(baseline_report), _load(new_report), growth=growth, floor_abs=floor_abs)
    if diff["summary"]["verdict"] != "ok":
        raise AssertionError("parity error grew against the baseline\n" + render_diff_terminal(diff))
    return diff
