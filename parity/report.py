"""Parity reports: the JSON document (source of truth) and renderings of it (self-contained HTML, terminal table).

`build_report(result, meta)` makes the JSON-able dict; every renderer reads only that dict, so a report written on a
GPU runner can be re-rendered anywhere (`render_html(read_json(path))`). The HTML needs no network and no JavaScript:
inline CSS, an inline SVG plot, `<details>` for per-probe records; every string from the report is HTML-escaped.
"""

import html
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

from parity.diff import ParityResult, Status

SCHEMA = "granite-speech-parity-report/1"


# ---------------------------------------------------------------------------------------------------------------
# JSON


def _version(module_name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module_name)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def run_metadata(*, device: Any = "cpu", dtype: Any = "float32", seed: Optional[int] = None,
                 checkpoint: Optional[str] = None, mode: str = "propagated", **extra: Any) -> dict:
    """Versions, device and run settings for the report header; `extra` keys are added as given (JSON-able)."""
    import torch

    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "ibm-fms": _version("ibm-fms"),
        },
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda")
                        else platform.processor() or platform.machine()),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "mode": mode,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "argv": list(sys.argv),
    }
    meta.update(extra)
    return meta


def _brief(probe: Mapping) -> dict:
    prop = probe["propagated"]
    metrics = prop.get("metrics") or {}
    return {
        "name": probe["name"], "index": probe["index"], "status": prop["status"], "detail": prop["detail"],
        "hf_path": probe["hf_path"], "fms_path": probe["fms_path"], "attribution": probe["attribution"],
        "max_abs": metrics.get("max_abs"), "min_atol": metrics.get("min_atol"), "tol_ratio": metrics.get("tol_ratio"),
        "atol": probe["tolerance"]["atol"],
        "rtol": probe["tolerance"]["rtol"], "worst_index": metrics.get("worst_index"),
        "worst_hf": metrics.get("worst_hf"), "worst_fms": metrics.get("worst_fms"),
        "teacher_status": probe["teacher"]["status"],
    }


def build_report(result: ParityResult, meta: Optional[Mapping] = None) -> dict:
    data = result.to_dict()
    by_name = {p["name"]: p for p in data["probes"]}
    tolerances = {}
    for probe in data["probes"]:
        tolerances.setdefault(probe["tolerance_class"], probe["tolerance"])
    return {
        "schema": SCHEMA,
        "meta": {**dict(meta or {}), "tolerances": tolerances},
        "summary": {
            "verdict": "pass" if result.passed else "fail",
            "probes": len(result.probes),
            "status_counts": result.status_counts(),
            "first_divergence": _brief(by_name[result.first_divergence]) if result.first_divergence else None,
            "first_own_error": _brief(by_name[result.first_own_error]) if result.first_own_error else None,
        },
        "result": data,
    }


def write_json(report: Mapping, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))  # non-finite floats are already strings
    return path


def read_json(path: Union[str, Path]) -> dict:
    report = json.loads(Path(path).read_text())
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a parity report (schema {report.get('schema')!r}, expected {SCHEMA!r})")
    return report


def result_from_report(report: Mapping) -> ParityResult:
    return ParityResult.from_dict(report["result"])


# ---------------------------------------------------------------------------------------------------------------
# formatting helpers


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):  # "inf" / "nan" as stored in JSON
        return {"inf": "∞", "-inf": "−∞", "nan": "NaN"}.get(value, value)
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits + 2}g}"
    return f"{value:.{digits}e}"


def _cos(value: Any) -> str:
    """Cosine near 1 as '1−3.2e-09' (the distance from 1 is what matters)."""
    if isinstance(value, (int, float)) and 0.999 < value < 1:
        return f"1−{1 - value:.1e}"
    return _num(value, 4)


def _float(value: Any) -> Optional[float]:
    if value is None:
        return None
    return float(value)


def _execution_order(probes: Sequence[Mapping]) -> List[Mapping]:
    return sorted(probes, key=lambda p: (p["order"] if p["order"] is not None else p["index"], p["index"]))


def _component(name: str) -> str:
    return name.split(".", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# terminal


def render_terminal(report: Mapping, *, max_rows: int = 30, context: int = 3, name_width: int = 34) -> str:
    """Compact fixed-width table for pytest failure output, in execution order: every non-passing probe and the
    `context` probes before the first one; when all pass, the first `max_rows` probes."""
    summary, meta = report["summary"], report["meta"]
    probes = _execution_order(report["result"]["probes"])
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["status_counts"].items()))
    lines = [
        f"PARITY {summary['verdict'].upper()}  {summary['probes']} probes: {counts}  "
        f"(mode={meta.get('mode')}, dtype={meta.get('dtype')}, device={meta.get('device')})"
    ]
    for label, key in (("first divergence", "first_divergence"), ("first own error", "first_own_error")):
        brief = summary.get(key)
        if brief:
            lines.append(
                f"{label}: #{brief['index']} {brief['name']} [{brief['status']}] err/tol={_num(brief['tol_ratio'])} "
                f"max|d|={_num(brief['max_abs'])} "
                f"needs atol>={_num(brief['min_atol'])} (atol {_num(brief['atol'])}, rtol {_num(brief['rtol'])}); "
                f"cause: {brief['attribution']}"
            )
            if brief["worst_index"] is not None:
                lines.append(f"    worst element {brief['worst_index']}: HF {_num(brief['worst_hf'], 5)} "
                             f"FMS {_num(brief['worst_fms'], 5)}")
            if brief["status"] != Status.FAIL:
                lines.append(f"    {brief['detail']}")
    teacher_mode = report["result"].get("mode") == "teacher_forced"
    header = (f"{'#':>4} {'probe':<{name_width}} {'status':<14} {'err/tol':>9} {'max|d|':>9} {'atol need':>9} "
              f"{'cosine':>9} {'SQNR dB':>8}" + (f" {'TF status':<14} {'TF er/tol':>9} cause" if teacher_mode else ""))
    lines += [header, "-" * len(header)]
    failing = [i for i, p in enumerate(probes) if p["propagated"]["status"] != Status.PASS]
    if failing:  # every failing probe, plus the passing probes just before the first one (context)
        shown = set(failing) | set(range(max(failing[0] - context, 0), failing[0]))
    else:
        shown = set(range(min(max_rows, len(probes))))
    hidden = 0
    for position, probe in enumerate(probes):
        if position not in shown:
            hidden += 1
            continue
        prop, teach = probe["propagated"], probe["teacher"]
        m, tm = prop.get("metrics") or {}, teach.get("metrics") or {}
        name = probe["name"] if len(probe["name"]) <= name_width else "…" + probe["name"][-(name_width - 1):]
        lines.append(
            f"{probe['index']:>4} {name:<{name_width}} {prop['status']:<14} {_num(m.get('tol_ratio')):>9} "
            f"{_num(m.get('max_abs')):>9} {_num(m.get('min_atol')):>9} {_cos(m.get('cosine')):>9} "
            f"{_num(m.get('sqnr_db'), 1):>8}"
            + (f" {teach['status']:<14} {_num(tm.get('tol_ratio')):>9} {probe['attribution']}" if teacher_mode else "")
        )
    if hidden:
        lines.append(f"     ... {hidden} passing probe(s) not shown (full table in the HTML/JSON report)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# HTML

_e = html.escape

_CSS = """
:root { --pass:#1a7f37; --fail:#cf222e; --warn:#9a6700; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:#1f2328; margin:0; background:#fff; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 22px; margin: 0 0 4px; display:flex; align-items:center; gap:12px; }
h2 { font-size: 17px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 18px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.badge { display:inline-block; padding: 2px 10px; border-radius: 999px; color:#fff; font-size: 13px; font-weight:600; }
.badge.pass { background: var(--pass); } .badge.fail { background: var(--fail); }
.chip { display:inline-block; padding: 0 7px; border-radius: 4px; font-size: 12px; font-weight:600; white-space:nowrap;
        border:1px solid transparent; }
.s-pass { color: var(--pass); background:#dafbe1; border-color:#aceebb; }
.s-fail, .s-nonfinite, .s-shape_mismatch, .s-missing, .s-capture_error, .s-dtype_mismatch
        { color: var(--fail); background:#ffebe9; border-color:#ffcecb; }
.s-dtype_mismatch, .s-capture_error { color: var(--warn); background:#fff8c5; border-color:#f5e0a0; }
.s-not_applicable, .s-not_run { color: var(--muted); background: var(--bg); border-color: var(--line); }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr)); gap: 14px; }
.card { border:1px solid var(--line); border-radius: 8px; padding: 14px 16px; background:#fff; }
.card.alert { border-color:#ff8182; background:#fff5f5; }
.card.ok { border-color:#aceebb; background:#f4fdf6; }
.card h3 { margin:0 0 8px; font-size: 15px; }
.card .big { font-size: 18px; font-weight: 600; word-break: break-all; }
.kv { display:grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0 0; }
.kv dt { color: var(--muted); } .kv dd { margin:0; word-break: break-word; }
.counts { display:flex; flex-wrap:wrap; gap:8px; margin: 12px 0 0; }
table { border-collapse: collapse; width: 100%; }
table.probes { font-size: 12.5px; }
th, td { padding: 3px 6px; border-bottom: 1px solid #eaeef2; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: var(--bg); font-weight: 600; font-size: 12.5px;
     border-bottom: 1px solid var(--line); }
td.l, th.l { text-align: left; }
tr.bad td { background: #fff5f5; }
tr.first td { background: #ffebe9; font-weight: 600; }
tr.sep td { background: var(--bg); color: var(--muted); font-weight:600; text-align:left; font-size:12px; }
.tablewrap { max-height: 720px; overflow: auto; border:1px solid var(--line); border-radius: 8px; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
details { border:1px solid var(--line); border-radius:6px; margin: 6px 0; background:#fff; }
details[open] { background: #fcfdfe; }
details > summary { cursor: pointer; padding: 6px 10px; list-style-position: inside; }
details > div { padding: 4px 14px 12px; }
.plot { border:1px solid var(--line); border-radius: 8px; padding: 8px; overflow-x:auto; }
.legend { color: var(--muted); font-size: 12.5px; margin: 6px 4px 0; }
.meta td, .meta th { text-align:left; white-space: normal; }
.note { color: var(--muted); }
.cmp { display:grid; grid-template-columns: 1fr 1fr; gap: 0 28px; } h4 { margin: 12px 0 2px; font-size: 13.5px; }
.c-own { color: var(--fail); font-weight: 600; } .c-inherited { color: var(--warn); }
.c-ok, .c-unknown { color: var(--muted); }
"""


def _chip(status: str) -> str:
    return f'<span class="chip s-{_e(status)}">{_e(status)}</span>'


def _kv(pairs: Sequence[tuple]) -> str:
    rows = "".join(f"<dt>{_e(str(k))}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="kv">{rows}</dl>'


def _brief_card(title: str, brief: Optional[Mapping], empty: str, teacher_mode: bool) -> str:
    if not brief:
        return f'<div class="card ok"><h3>{_e(title)}</h3><div class="big">{_e(empty)}</div></div>'
    cause = {"own": "own error (still wrong when fed HF inputs)", "inherited": "inherited (correct when fed HF inputs)",
             "unknown": "unknown (no teacher-forced verdict)", "ok": "ok"}.get(brief["attribution"], brief["attribution"])
    pairs = [
        ("status", _chip(brief["status"])),
        ("HF module", f"<code>{_e(brief['hf_path'] or '<model>')}</code>"),
        ("FMS module", f"<code>{_e(brief['fms_path'] or '<model>')}</code>"),
        ("error / tolerance", _e(_num(brief["tol_ratio"])) + " <span class='note'>(worst element; ≤ 1 passes)</span>"),
        ("max |Δ|", _e(_num(brief["max_abs"]))),
        ("atol needed", f"{_e(_num(brief['min_atol']))} <span class='note'>(table: atol {_e(_num(brief['atol']))}, "
                        f"rtol {_e(_num(brief['rtol']))})</span>"),
    ]
    if brief["worst_index"] is not None:
        pairs.append(("worst element", f"<code>{_e(str(brief['worst_index']))}</code>: HF {_e(_num(brief['worst_hf'], 5))}"
                                       f" · FMS {_e(_num(brief['worst_fms'], 5))}"))
    if teacher_mode:
        pairs.append(("cause", _e(cause)))
    pairs.append(("detail", f"<span class='note'>{_e(brief['detail'])}</span>"))
    link = f'<a href="#probe-{brief["index"]}">#{brief["index"]} {_e(brief["name"])}</a>'
    return f'<div class="card alert"><h3>{_e(title)}</h3><div class="big">{link}</div>{_kv(pairs)}</div>'


def _ratio(comp: Mapping) -> Optional[float]:
    value = _float((comp.get("metrics") or {}).get("tol_ratio"))
    return value if value is not None and not math.isnan(value) else None


def _svg_plot(probes: Sequence[Mapping], width: int = 1240, height: int = 330) -> str:
    """Error relative to the tolerance bound per probe, log scale, in execution order: max |fms - hf| / (atol +
    rtol |hf| + ulps ulp) at the worst element. The dashed line at 1 is the tolerance: above it a probe fails.
    Teacher-forced (own error) values as diamonds; exact matches (0) in a lane under the axis."""
    left, right, top, bottom = 78, 16, 26, 62
    n = len(probes)
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for p in probes for v in (_ratio(p["propagated"]), _ratio(p["teacher"])) if v and math.isfinite(v)]
    lo = math.floor(math.log10(min(values))) if values else -6
    hi = math.ceil(math.log10(max(values))) if values else 1
    lo, hi = min(lo, -1), max(hi, 1)  # the tolerance line (1e0) is always inside the plot
    floor_y = top + plot_h + 14  # exact matches (0) sit in a lane below the log axis

    def x(i: int) -> float:
        return left + plot_w * (i + 0.5) / max(n, 1)

    def y(v: float) -> float:
        if v <= 0:
            return floor_y
        if not math.isfinite(v):
            return top
        v = min(max(math.log10(v), lo), hi)
        return top + plot_h * (hi - v) / (hi - lo)

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           'aria-label="error relative to tolerance per probe" font-family="Helvetica, Arial, sans-serif" font-size="11">']
    start, bands = 0, []
    for i in range(1, n + 1):
        if i == n or _component(probes[i]["name"]) != _component(probes[start]["name"]):
            bands.append((start, i, _component(probes[start]["name"])))
            start = i
    for k, (s, t, label) in enumerate(bands):
        x0, x1 = left + plot_w * s / n, left + plot_w * t / n
        shade = ("#f6f8fa", "#ffffff")[k % 2]
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{plot_h}" fill="{shade}"/>')
        if x1 - x0 >= 7 * len(label):  # skip labels that would not fit their band
            out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top - 8}" text-anchor="middle" fill="#59636e">{_e(label)}</text>')
    step = max(1, math.ceil((hi - lo) / 10))
    for d in range(lo, hi + 1, step):
        gy = y(10.0 ** d)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#d1d9e0" stroke-width="0.7"/>')
        out.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" fill="#59636e">1e{d}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{floor_y:.1f}" y2="{floor_y:.1f}" stroke="#d1d9e0" '
               'stroke-width="0.7" stroke-dasharray="2 3"/>')
    out.append(f'<text x="{left - 6}" y="{floor_y + 4:.1f}" text-anchor="end" fill="#59636e">0 (exact)</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#8c959f"/>')
    one = y(1.0)
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{one:.1f}" y2="{one:.1f}" stroke="#cf222e" '
               'stroke-width="1.4" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{left + 4}" y="{one - 5:.1f}" fill="#cf222e">tolerance</text>')
    line = []
    for i, p in enumerate(probes):
        v = _ratio(p["propagated"])
        if v is not None:
            line.append(f"{'M' if not line else 'L'}{x(i):.1f},{y(v):.1f}")
    if line:
        out.append(f'<path d="{" ".join(line)}" fill="none" stroke="#0969da" stroke-width="1.2" opacity="0.6"/>')
    r = 3.2 if n <= 80 else 2.4
    for i, p in enumerate(probes):
        prop, teach = p["propagated"], p["teacher"]
        m, tm = prop.get("metrics") or {}, teach.get("metrics") or {}
        tip = (f"#{p['index']} {p['name']} [{prop['status']}] err/tol {_num(m.get('tol_ratio'))}, max|Δ| "
               f"{_num(m.get('max_abs'))}, atol needed {_num(m.get('min_atol'))}; teacher-forced {teach['status']} "
               f"err/tol {_num(tm.get('tol_ratio'))}")
        v = _ratio(prop)
        if v is None:
            if prop["status"] != Status.PASS:  # no numbers: structural problem, mark it at the top
                out.append(f'<g><title>{_e(tip)}</title><text x="{x(i):.1f}" y="{top + 12}" text-anchor="middle" '
                           f'fill="#cf222e" font-size="14" font-weight="bold">×</text></g>')
        else:
            color = "#1a7f37" if prop["status"] == Status.PASS else "#cf222e"
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{r}" fill="{color}"><title>{_e(tip)}</title></circle>')
        tv = _ratio(teach)
        if tv is not None:
            cx, cy, size = x(i), y(tv), r + 0.8
            out.append(f'<path d="M{cx:.1f},{cy - size:.1f} L{cx + size:.1f},{cy:.1f} L{cx:.1f},{cy + size:.1f} '
                       f'L{cx - size:.1f},{cy:.1f} Z" fill="none" stroke="#bc4c00" stroke-width="1.2">'
                       f'<title>{_e(tip)}</title></path>')
    tick_every = max(1, math.ceil(n / 24))
    for i in range(0, n, tick_every):
        out.append(f'<text x="{x(i):.1f}" y="{floor_y + 22:.1f}" text-anchor="middle" fill="#59636e">{i}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="#1f2328">'
               'probe (execution order)</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#1f2328" '
               f'transform="rotate(-90 16 {top + plot_h / 2:.1f})">max |Δ| / allowed</text>')
    out.append("</svg>")
    return "".join(out)


_COLUMNS = ("#", "probe", "status", "err/tol", "max |Δ|", "mean |Δ|", "max rel", "cosine", "SQNR dB", "outside",
            "atol need", "atol / rtol", "TF status", "TF err/tol", "TF atol need", "cause")
_LEFT = (1, 2, 12, 15)  # left-aligned columns
_TEACHER_COLUMNS = (12, 13, 14, 15)  # shown only for teacher-forced runs


def _row(p: Mapping, first: Optional[str], teacher_mode: bool) -> str:
    prop, teach = p["propagated"], p["teacher"]
    m, tm, tol = prop.get("metrics") or {}, teach.get("metrics") or {}, p["tolerance"]
    classes = "first" if p["name"] == first else ("bad" if prop["status"] != Status.PASS else "")
    outside = "–" if not m else f"{m['outside_fraction'] * 100:.3g}%"
    cells = [
        str(p["index"]),
        f'<a href="#probe-{p["index"]}" class="mono">{_e(p["name"])}</a>',
        _chip(prop["status"]),
        _e(_num(m.get("tol_ratio"))), _e(_num(m.get("max_abs"))), _e(_num(m.get("mean_abs"))), _e(_num(m.get("max_rel"))),
        _e(_cos(m.get("cosine"))), _e(_num(m.get("sqnr_db"), 1)), _e(outside), _e(_num(m.get("min_atol"))),
        _e(f"{_num(tol['atol'])} / {_num(tol['rtol'])}" + (f" +{_num(tol['ulps'])}ulp" if tol.get("ulps") else "")),
        _chip(teach["status"]), _e(_num(tm.get("tol_ratio"))), _e(_num(tm.get("min_atol"))),
        f'<span class="c-{_e(p["attribution"])}">{_e(p["attribution"])}</span>',
    ]
    tds = "".join(f'<td class="{"l" if k in _LEFT else ""}">{c}</td>' for k, c in enumerate(cells)
                  if teacher_mode or k not in _TEACHER_COLUMNS)
    return f'<tr class="{classes}">{tds}</tr>'


def _comparison_block(label: str, comp: Mapping) -> str:
    m = comp.get("metrics") or {}
    pairs = [("status", _chip(comp["status"])), ("detail", _e(comp.get("detail") or "–"))]
    if comp.get("hf_shape") is not None:
        pairs.append(("shape / dtype", _e(f"HF {comp['hf_shape']} {comp['hf_dtype']} · FMS {comp['fms_shape']} "
                                          f"{comp['fms_dtype']}")))
    if m:
        pairs += [
            ("max |Δ| · mean |Δ|", _e(f"{_num(m['max_abs'])} · {_num(m['mean_abs'])}")),
            ("max rel · cosine · SQNR", _e(f"{_num(m['max_rel'])} · {_cos(m['cosine'])} · {_num(m['sqnr_db'], 1)} dB")),
            ("outside tolerance", _e(f"{m['outside_count']} of {m['numel']} ({m['outside_fraction'] * 100:.3g}%)")),
            ("error / tolerance", _e(_num(m["tol_ratio"]))),
            ("atol needed", _e(_num(m["min_atol"]))),
            ("worst element", _e(f"{m['worst_index']}: HF {_num(m['worst_hf'], 6)} · FMS {_num(m['worst_fms'], 6)}")),
            ("|HF| max", _e(_num(m["ref_absmax"]))),
        ]
        if m.get("nonfinite_hf") or m.get("nonfinite_fms"):
            pairs.append(("NaN/Inf", _e(f"HF {m['nonfinite_hf']} · FMS {m['nonfinite_fms']}")))
    return f"<h4>{_e(label)}</h4>{_kv(pairs)}"


def _probe_details(p: Mapping, first: Optional[str]) -> str:
    tol = p["tolerance"]
    pairs = [
        ("HF", f"<code>{_e(p['hf_path'] or '<model>')}</code> take <code>{_e(p['hf_take'])}</code> adapter "
               f"<code>{_e(p['hf_adapter'])}</code> · calls {p['calls_hf']}"),
        ("FMS", f"<code>{_e(p['fms_path'] or '<model>')}</code> take <code>{_e(p['fms_take'])}</code> adapter "
                f"<code>{_e(p['fms_adapter'])}</code> · calls {p['calls_fms']}"),
        ("tolerance", _e(f"{p['tolerance_class']}: atol {tol['atol']:g}, rtol {tol['rtol']:g}, ulps {tol['ulps']:g}, "
                         f"allowed outside {tol['max_outside_fraction']:g} ({tol.get('why', '')})")),
        ("execution rank", _e(str(p["order"]))),
    ]
    if p.get("note"):
        pairs.append(("note", f"<span class='note'>{_e(p['note'])}</span>"))
    if p["teacher"]["status"] == Status.NOT_RUN:
        body = _kv(pairs) + _comparison_block("propagated", p["propagated"])
    else:
        body = _kv(pairs) + ('<div class="cmp"><div>' + _comparison_block("propagated", p["propagated"]) + "</div><div>"
                             + _comparison_block("teacher-forced (own error)", p["teacher"]) + "</div></div>")
    is_open = " open" if p["name"] == first else ""
    summary = (f'{_chip(p["propagated"]["status"])} <span class="mono">#{p["index"]} {_e(p["name"])}</span> '
               f'<span class="note">cause: {_e(p["attribution"])}</span>')
    return f'<details id="probe-{p["index"]}"{is_open}><summary>{summary}</summary><div>{body}</div></details>'


def _meta_table(meta: Mapping) -> str:
    rows = []
    for key, value in meta.items():
        if key == "tolerances":
            continue
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        rows.append(f"<tr><th>{_e(str(key))}</th><td class='mono'>{_e(text)}</td></tr>")
    for cls, tol in (meta.get("tolerances") or {}).items():
        rows.append(f"<tr><th>tolerance: {_e(cls)}</th><td class='mono'>{_e(json.dumps(tol, sort_keys=True))}</td></tr>")
    return f'<table class="meta">{"".join(rows)}</table>'


def render_html(report: Mapping, *, title: str = "Granite Speech parity report") -> str:
    meta, summary = report["meta"], report["summary"]
    result = report["result"]
    probes = _execution_order(result["probes"])
    first = result.get("first_divergence")
    teacher_mode = result.get("mode") == "teacher_forced"
    verdict = summary["verdict"]
    versions = meta.get("versions") or {}
    subtitle = " · ".join(_e(f"{k} {v}") for k, v in (
        ("mode", meta.get("mode", result.get("mode"))), ("dtype", meta.get("dtype")), ("device", meta.get("device")),
        ("seed", meta.get("seed")), ("checkpoint", meta.get("checkpoint")), ("torch", versions.get("torch")),
        ("transformers", versions.get("transformers")), ("ibm-fms", versions.get("ibm-fms"))) if v is not None)
    counts = "".join(f'<span>{_chip(s)} {n}</span>' for s, n in sorted(summary["status_counts"].items()))
    cards = [_brief_card("First divergence (execution order)", summary.get("first_divergence"),
                         "none: every probe is within tolerance", teacher_mode)]
    if teacher_mode:
        cards.append(_brief_card("First module with its own error (teacher-forced)", summary.get("first_own_error"),
                                 "none: every module matches when fed HF inputs", teacher_mode))
    rows, previous = [], None
    for p in probes:
        component = _component(p["name"])
        if component != previous:
            rows.append(f'<tr class="sep"><td colspan="{len(_COLUMNS)}">{_e(component)}</td></tr>')  # colspan may exceed
            previous = component
        rows.append(_row(p, first, teacher_mode))
    head = "".join(f'<th class="{"l" if k in _LEFT else ""}">{_e(c)}</th>' for k, c in enumerate(_COLUMNS)
                   if teacher_mode or k not in _TEACHER_COLUMNS)
    legend = ("Blue line / circles: propagated error relative to the tolerance bound atol + rtol·|HF| (+ ulps), at the "
              "worst element (green pass, red fail); above the dashed line = outside tolerance. Orange diamonds: the "
              "same for the teacher-forced re-run (the module's own error). × at the top: no numbers (missing, shape "
              "or capture problem). Hover a point for its numbers.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{_e(title)} <span class="badge {_e(verdict)}">{_e(verdict.upper())}</span></h1>
<p class="sub">{subtitle}</p>
<div class="cards">{''.join(cards)}</div>
<div class="counts">{summary['probes']} probes: {counts}</div>
<h2>Error vs depth</h2>
<div class="plot">{_svg_plot(probes)}<p class="legend">{_e(legend)}</p></div>
<h2>All probes</h2>
<div class="tablewrap"><table class="probes"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>
<h2>Per-probe records</h2>
{''.join(_probe_details(p, first) for p in probes)}
<h2>Run</h2>
{_meta_table(meta)}
</main></body></html>
"""


def write_html(report: Mapping, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
