"""The HTML of one probe's record in the report page: its summary line and, folded under it, where it was hooked,
its tolerance, floor and checks, and the metrics of each comparison.

Written in Python rather than as template macros: a 2b report holds ~7,300 records, and jinja's macro calls
rendered its page in 1.5 s, these in 0.8 s (results/report-samples/render-check-2026-12-07.txt). The page is byte for
byte what the macros wrote (same file); as there, every interpolated value goes through `html.escape`, quotes
included (`suites/test_report.py`).
"""

import html
from typing import Any, Mapping

from markupsafe import Markup

from parity.report_format import _cos, _float, _num, _pct, _times

_WORST_NOTE = (' <span class="note">(the element with the largest |Δ|; parity.diff records that one, so on a passing '
               'probe it is inside tolerance)</span>')


def _e(value: Any) -> str:
    """A value as the page shows it: None as a dash, everything escaped."""
    return html.escape("–" if value is None else str(value), quote=True)


def chip(status: Any) -> str:
    return f'<span class="chip s-{_e(status)}">{_e(status)}</span>'


def _cosine(value: Any) -> str:
    return _cos(_float(value) if isinstance(value, str) else value)


def worst_element(m: Mapping, note: bool = True) -> str:
    if m.get("worst_index") is None:
        return "–"
    return (f"<code>{_e(m.get('worst_index'))}</code>: HF {_e(_num(m.get('worst_hf'), 5))} · "
            f"FMS {_e(_num(m.get('worst_fms'), 5))}" + (_WORST_NOTE if note else ""))


def comparison(label: str, comp: Mapping) -> str:
    m = comp.get("metrics") or {}
    out = [f"<h4>{_e(label)}</h4>\n<dl class=\"kv\">\n<dt>status</dt><dd>{chip(comp['status'])}</dd>\n"
           f"<dt>detail</dt><dd>{_e(comp.get('detail') or '–')}</dd>\n"]
    if comp.get("hf_shape") is not None:
        out.append(f"<dt>shape / dtype</dt><dd>HF {_e(comp['hf_shape'])} {_e(comp.get('hf_dtype'))} · "
                   f"FMS {_e(comp.get('fms_shape'))} {_e(comp.get('fms_dtype'))}</dd>")
    if m:
        num = lambda key, digits=2: _e(_num(m.get(key), digits))  # noqa: E731
        out.append(f"<dt>error / tolerance</dt><dd>{_e(_pct(m.get('tol_ratio')))} ({num('tol_ratio')})</dd>\n"
                   f"<dt>max |Δ| · mean |Δ|</dt><dd>{num('max_abs')} · {num('mean_abs')}</dd>\n"
                   f"<dt>max rel · cosine · SQNR</dt><dd>{num('max_rel')} · {_e(_cosine(m.get('cosine')))} · "
                   f"{num('sqnr_db', 1)} dB</dd>\n"
                   f"<dt>outside tolerance</dt><dd>{num('outside_count')} of {num('numel')} "
                   f"({_e(_pct(m.get('outside_fraction')))})</dd>\n")
        if m.get("valid_elements") is not None or m.get("masked_out") is not None:
            out.append(f"<dt>validity mask</dt><dd>{num('valid_elements')} valid, {num('masked_out')} masked out "
                       f"(not compared)</dd>")
        out.append(f"<dt>atol needed</dt><dd>{num('min_atol')}</dd>\n"
                   f"<dt>largest |Δ| element</dt><dd>{worst_element(m)}</dd>\n"
                   f"<dt>|HF| max</dt><dd>{num('ref_absmax')}</dd>\n")
        if m.get("nonfinite_hf") or m.get("nonfinite_fms"):
            out.append(f"<dt>NaN/Inf</dt><dd>HF {num('nonfinite_hf')} · FMS {num('nonfinite_fms')}</dd>")
    out.append("</dl>\n")
    return "".join(out)


def _summary(v: Mapping) -> str:
    p, m = v["p"], v["m"]
    flags = "".join(f" {name}" for name, on in (("bad", v["bad"]), ("sus", v["suspect"]), ("zero", v["zero"])) if on)
    line = [f'<details id="{_e(v["id"])}" class="rec{flags}">\n<summary>{chip(v["status"])}',
            f" {chip('suspect')}" if v["suspect"] else "",
            f' <span class="mono">#{_e(p["index"])} {_e(p["name"])}</span>\n',
            f'<span class="nums">max|Δ| <b>{_e(_num(m.get("max_abs")))}</b> · <b>{_e(_pct(m.get("tol_ratio")))}</b> '
            f'of tol · cos {_e(_cosine(m.get("cosine")))}']
    if p.get("floor_ratio") is not None:
        line.append(f" · <b>{_e(_times(p['floor_ratio']))}</b> floor")
    if v["bad"] and m.get("worst_index") is not None:
        line.append(f" · at {_e(m.get('worst_index'))}: HF {_e(_num(m.get('worst_hf'), 4))} "
                    f"FMS {_e(_num(m.get('worst_fms'), 4))}")
    line.append("</span></summary>\n")
    return "".join(line)


def _side(p: Mapping, side: str, label: str) -> str:
    return (f"<dt>{label}</dt><dd><code>{_e(p.get(f'{side}_path') or '<model>')}</code> take "
            f"<code>{_e(p.get(f'{side}_take'))}</code> adapter <code>{_e(p.get(f'{side}_adapter'))}</code> · "
            f"calls {_e(p.get(f'calls_{side}'))}</dd>\n")


def _checks(p: Mapping) -> str:
    """The noise floor, float64 check and upcast audit lines (each where it was measured)."""
    out = []
    if p.get("noise_floor") is not None or p.get("suspect") is not None:
        out.append(f"<dt>noise floor</dt><dd>{_e(_num(p.get('noise_floor')))}")
        if p.get("floor_ratio") is not None:
            out.append(f" · error {_e(_times(p['floor_ratio']))} the floor")
        if p.get("suspect"):
            out.append(" · <b>suspect</b>: far above its floor though inside tolerance")
        out.append("</dd>")
    f = p.get("float64")
    if f:
        out.append(f"<dt>float64 check</dt><dd>{chip(f['status'])} both sides in float64: max |Δ| "
                   f"{_e(_num((f.get('metrics') or {}).get('max_abs')))}")
        if f["status"] != "pass":
            out.append(" · <b>a formula differs</b>, not a rounding")
        if f.get("detail"):
            out.append(f' <span class="note">{_e(f["detail"])}</span>')
        out.append("</dd>")
    if p.get("missing_upcast"):
        out.append(f"<dt>upcast audit</dt><dd>{chip('suspect')} FMS runs <b>{_e(', '.join(p['missing_upcast']))}</b> "
                   f"here, HF does not: a missing fp32 upcast</dd>")
    return "".join(out)


def record(v: Mapping) -> Markup:
    """One probe of the per-layer view (`v` from the report's section view: p, m, id, status, bad, suspect, zero)."""
    p, tol = v["p"], v["p"]["tolerance"]
    exact = " (integers: must be equal)" if p.get("tolerance_class") == "exact" else ""
    why = f' <span class="note">({_e(tol["why"])})</span>' if tol.get("why") else ""
    body = [_summary(v), '<div class="body">\n<dl class="kv">\n', _side(p, "hf", "HF"), _side(p, "fms", "FMS"),
            f"<dt>tolerance</dt><dd>{_e(p.get('tolerance_class'))}{exact}: atol {_e(_num(tol.get('atol')))}, "
            f"rtol {_e(_num(tol.get('rtol')))}, ulps {_e(_num(tol.get('ulps')))}, "
            f"allowed outside {_e(_num(tol.get('max_outside_fraction')))}{why}</dd>\n",
            _checks(p),
            f"<dt>execution rank</dt><dd>{_e(p.get('order'))} · cause <span class=\"c-{_e(p.get('attribution'))}\">"
            f"{_e(p.get('attribution'))}</span></dd>\n"]
    if p.get("note"):
        body.append(f'<dt>note</dt><dd class="note">{_e(p["note"])}</dd>')
    body.append("</dl>\n")
    if p.get("teacher") and p["teacher"]["status"] != "not_run":
        body.append(f'<div class="cmp"><div>{comparison("propagated", p["propagated"])}</div>'
                    f'<div>{comparison("teacher-forced (own error)", p["teacher"])}</div></div>\n')
    else:
        body.append(comparison("propagated", p["propagated"]) + "\n")
    body.append("</div></details>\n")
    return Markup("".join(body))
