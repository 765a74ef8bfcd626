"""Parity reports: the JSON document (source of truth) and renderings of it (self-contained HTML, terminal table).

`build_report(result, meta)` / `build_multi_report(sections, meta)` make the JSON-able dict; every renderer reads only
that dict, so a report written on a GPU runner can be re-rendered anywhere (`render_html(read_json(path))`). A report
holds one section per input or pipeline stage (kind preprocessing / model / generation). The HTML is rendered
through a jinja2 template with autoescape on (every string from the report is escaped); it needs no network and no
JavaScript: inline CSS, inline SVG plots, `<details>` for folding. Model-agnostic: nothing here imports a model.

Optional probe fields (`noise_floor`, `floor_ratio`, `suspect`, metrics `valid_elements` / `masked_out`, result
`first_suspect`) are rendered when present and never required, so reports from older harness versions still render.
"""

import html
import json
import math
import platform
import re
import subprocess
import sys
from dataclasses import fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from parity.diff import FLOOR_GATE, Comparison, Metrics, ParityResult, ProbeResult, Status, _lenient
from parity.report_format import _cos, _float, _num, _pct, _times
from parity.report_records import record as record_html
from parity.tolerances import Tolerance
from parity.verdict import FLOOR_FACTOR, Policy, failing_rules, probe_rules, run_verdict, section_verdict

SCHEMA = "parity-report/2"
LEGACY_SCHEMAS = ("granite-speech-parity-report/1",)
SECTION_KINDS = ("preprocessing", "model", "generation")
DEFAULT_TITLE = "Parity report"

# (title, kind, result, extra); the result may also be a result dict (`ParityResult.to_dict()` shape, e.g. re-read
# from JSON or carrying optional fields this harness version does not produce)
Section = Tuple[str, str, Union[ParityResult, Mapping], Optional[Mapping]]


# ---------------------------------------------------------------------------------------------------------------
# JSON


def _version(module_name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module_name)
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """HEAD of the checkout this module lives in (with '+dirty' when the tree has changes); None outside git."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001 - no git binary, timeout: provenance is best effort
        return None


def run_metadata(*, device: Any = "cpu", dtype: Any = "float32", seed: Optional[int] = None,
                 checkpoint: Optional[str] = None, mode: str = "propagated", **extra: Any) -> dict:
    """Versions, device, git commit and run settings for the report header; `extra` keys are added as given
    (JSON-able; the HTML knows `weights`, `checkpoint_sha256`, `inputs` (list of dicts), `title`)."""
    import torch

    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "ibm-fms": _version("ibm-fms"),
            "peft": _version("peft"),
            "numpy": _version("numpy"),
        },
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda")
                        else _cpu_model()),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "mode": mode,
        "git_commit": _git_commit(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "argv": list(sys.argv),
    }
    meta.update(extra)
    return meta


def _jfloat(value: Any) -> Any:
    """A float as JSON allows it: non-finite values as the strings 'nan' / 'inf' / '-inf' (as parity.diff does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _execution_order(probes: Sequence[Mapping]) -> List[Mapping]:
    def key(p: Mapping) -> tuple:
        order = p.get("order")
        return (order if isinstance(order, (int, float)) else p.get("index", 0), p.get("index", 0))

    return sorted(probes, key=key)


def _metrics(probe: Mapping, side: str = "propagated") -> Mapping:
    return (probe.get(side) or {}).get("metrics") or {}


def _brief(probe: Mapping, section: Optional[str] = None) -> dict:
    prop = probe["propagated"]
    metrics = _metrics(probe)
    brief = {
        "name": probe["name"], "index": probe["index"], "status": prop["status"], "detail": prop.get("detail", ""),
        "hf_path": probe.get("hf_path"), "fms_path": probe.get("fms_path"), "attribution": probe.get("attribution"),
        "max_abs": metrics.get("max_abs"), "min_atol": metrics.get("min_atol"), "tol_ratio": metrics.get("tol_ratio"),
        "atol": probe["tolerance"]["atol"], "rtol": probe["tolerance"]["rtol"],
        "tolerance_class": probe.get("tolerance_class"), "worst_index": metrics.get("worst_index"),
        "worst_hf": metrics.get("worst_hf"), "worst_fms": metrics.get("worst_fms"),
        "teacher_status": (probe.get("teacher") or {}).get("status"),
        "noise_floor": probe.get("noise_floor"), "floor_ratio": probe.get("floor_ratio"),
        "suspect": bool(probe.get("suspect")),
        "float64": ((probe.get("float64") or {}).get("status")),
        "float64_max_abs": _metrics(probe, "float64").get("max_abs"),
        "missing_upcast": list(probe.get("missing_upcast") or ()),
    }
    if section is not None:
        brief["section"] = section
    return brief


def _ratio_key(probe: Mapping) -> float:
    """Sort key for 'worst first': tol_ratio, NaN counted as worst (it means broken numbers), no numbers lowest."""
    value = _float(_metrics(probe).get("tol_ratio"))
    if value is None:
        return -1.0
    return math.inf if math.isnan(value) else value


def _first_suspect(data: Mapping) -> Optional[str]:
    if data.get("first_suspect"):
        return data["first_suspect"]
    return next((p["name"] for p in _execution_order(data["probes"]) if p.get("suspect")), None)


def _summary(data: Mapping, section: Optional[str] = None, extra: Optional[Mapping] = None) -> dict:
    """The summary of one result dict (a section, or a whole one-section report); the verdict is
    `parity.verdict.section_verdict`'s."""
    probes = data["probes"]
    by_name = {p["name"]: p for p in probes}
    counts: Dict[str, int] = {}
    for probe in probes:
        status = probe["propagated"]["status"]
        counts[status] = counts.get(status, 0) + 1
    numeric = [p for p in probes if _float(_metrics(p).get("tol_ratio")) is not None]
    worst = max(numeric, key=_ratio_key) if numeric else None
    margin = None if worst is None else {
        "name": worst["name"], "tol_ratio": _metrics(worst)["tol_ratio"], "max_abs": _metrics(worst).get("max_abs"),
        "status": worst["propagated"]["status"], "tolerance_class": worst.get("tolerance_class")}
    if margin is not None and section is not None:
        margin["section"] = section

    def brief(name: Optional[str]) -> Optional[dict]:
        return _brief(by_name[name], section) if name and name in by_name else None

    judged = section_verdict(probes, Policy(lenient=_lenient(data), floor_factor=data.get("floor_factor") or FLOOR_FACTOR))
    return {
        "verdict": judged["verdict"],
        "why": judged["why"],
        "rules": judged["rules"],
        "near_tie_flips": len((extra or {}).get("near_tie_flips") or ()),
        "probes": len(probes),
        "status_counts": counts,
        "first_divergence": brief(data.get("first_divergence")),
        "first_own_error": brief(data.get("first_own_error")),
        "first_suspect": brief(_first_suspect(data)),
        "suspects": sum(1 for p in probes if p.get("suspect")),
        "margin": margin,
    }


def _combine(sections: Sequence[Mapping], not_run: Sequence[Mapping], policy: Policy) -> dict:
    """Top-level summary: the run's verdict (`parity.verdict.run_verdict`), total probes, the firsts of the first
    section that has one, the checks that did not run."""
    counts: Dict[str, int] = {}
    for section in sections:
        for status, n in section["summary"]["status_counts"].items():
            counts[status] = counts.get(status, 0) + n
    judged = run_verdict([s["summary"]["verdict"] for s in sections], not_run, policy)
    failing = [s for s in sections if s["summary"]["verdict"] != "pass"]

    def first(key: str, pool: Sequence[Mapping]) -> Optional[dict]:
        return next((s["summary"][key] for s in pool if s["summary"].get(key)), None)

    margins = [s["summary"]["margin"] for s in sections if s["summary"].get("margin")]
    return {
        "verdict": judged["verdict"],
        "why": judged["why"],
        "lenient": policy.lenient,
        "not_run": [dict(r) for r in not_run],
        "unaccepted": judged["unaccepted"],
        "near_tie_flips": sum(s["summary"].get("near_tie_flips", 0) for s in sections),
        "probes": sum(s["summary"]["probes"] for s in sections),
        "status_counts": counts,
        "first_divergence": first("first_divergence", failing),
        "first_own_error": first("first_own_error", failing) or first("first_own_error", sections),
        "first_suspect": first("first_suspect", sections),
        "suspects": sum(s["summary"].get("suspects", 0) for s in sections),
        "margin": max(margins, key=lambda m: _ratio_key({"propagated": {"metrics": m}})) if margins else None,
        "sections": len(sections),
    }


def _section(title: str, kind: str, data: Mapping, extra: Optional[Mapping]) -> dict:
    return {"title": str(title), "kind": kind, "extra": dict(extra or {}),
            "summary": _summary(data, str(title), extra), "result": data}


def _not_run(built: Sequence[Mapping], meta: Mapping) -> List[dict]:
    """Every planned check that did not run: the run's own (meta) and each section's, with the section named."""
    records = [dict(r) for r in meta.get("not_run") or ()]
    for section in built:
        records += [{**r, "section": section["title"]} for r in section["extra"].get("not_run") or ()]
    return records


def build_multi_report(sections: Sequence[Section], meta: Optional[Mapping] = None,
                       policy: Optional[Policy] = None) -> dict:
    """One report over several sections: `sections` is a list of (title, kind, ParityResult, extra dict or None).
    `policy` (default: every section's own lenience, nothing accepted) judges the checks that did not run."""
    if not sections:
        raise ValueError("a report needs at least one section")
    built, titles = [], set()
    for title, kind, result, extra in sections:
        if kind not in SECTION_KINDS:
            raise ValueError(f"section {title!r}: kind must be one of {SECTION_KINDS}, got {kind!r}")
        if title in titles:  # titles are the keys report diffs match on
            raise ValueError(f"duplicate section title {title!r}")
        titles.add(title)
        built.append(_section(title, kind, result.to_dict() if hasattr(result, "to_dict") else dict(result), extra))
    tolerances: Dict[str, dict] = {}
    for section in built:
        for probe in section["result"]["probes"]:
            tolerances.setdefault(probe["tolerance_class"], probe["tolerance"])
    meta = dict(meta or {})
    if policy is None:
        policy = Policy(lenient=any(_lenient(s["result"]) for s in built))
    return {
        "schema": SCHEMA,
        "meta": {**meta, "tolerances": tolerances, "policy": policy.to_dict()},
        "summary": _combine(built, _not_run(built, meta), policy),
        "sections": built,
        "result": built[0]["result"],  # compatibility: readers of schema 1 look here
    }


def build_report(result: Union[ParityResult, Mapping], meta: Optional[Mapping] = None, *, section: str = "model",
                 kind: str = "model", extra: Optional[Mapping] = None) -> dict:
    """A one-section report (same shape as `build_multi_report`)."""
    return build_multi_report([(section, kind, result, extra)], meta)


def upgrade(report: Mapping) -> dict:
    """A schema-1 report (one `result`, no sections) in the schema-2 shape; schema-2 reports are returned as is."""
    if "sections" in report:
        return dict(report)
    data = report["result"]
    title = (report.get("meta") or {}).get("section", "model")
    sections = [_section(title, "model", data, {})]
    summary = {**_combine(sections, [], Policy(lenient=_lenient(data))), **{k: v for k, v in (report.get("summary") or {}).items()
                                        if k in ("verdict", "probes", "status_counts")}}
    return {**report, "schema": SCHEMA, "upgraded_from": report.get("schema"), "summary": summary,
            "sections": sections}


def write_json(report: Mapping, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=False))  # non-finite floats are already strings
    return path


def read_json(path: Union[str, Path]) -> dict:
    """Load a report; schema-1 reports are accepted and upgraded in memory (sections added)."""
    report = json.loads(Path(path).read_text())
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema == SCHEMA:
        return report
    if schema in LEGACY_SCHEMAS:
        return upgrade(report)
    raise ValueError(f"{path} is not a parity report (schema {schema!r}, expected {SCHEMA!r} or one of "
                     f"{LEGACY_SCHEMAS})")


def _known(cls: type, data: Mapping) -> dict:
    """Only the keys `cls` has fields for: reports from newer harness versions carry optional extra fields."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _result(data: Mapping) -> ParityResult:
    probes = []
    for probe in data["probes"]:
        probe = _known(ProbeResult, probe)
        probe["tolerance"] = _known(Tolerance, probe["tolerance"])
        for side in ("propagated", "teacher"):
            comp = _known(Comparison, probe[side])
            if comp.get("metrics") is not None:
                comp["metrics"] = _known(Metrics, comp["metrics"])
            probe[side] = comp
        probes.append(probe)
    return ParityResult.from_dict({**_known(ParityResult, data), "probes": probes})


def result_from_report(report: Mapping) -> ParityResult:
    """The first section's result (the only one of a one-section report)."""
    return _result(upgrade(report)["sections"][0]["result"])


def results_from_report(report: Mapping) -> List[Tuple[str, str, ParityResult]]:
    return [(s["title"], s["kind"], _result(s["result"])) for s in upgrade(report)["sections"]]


# ---------------------------------------------------------------------------------------------------------------
# formatting helpers (also jinja filters)


def margin_text(margin: Optional[Mapping], *, with_section: bool = False) -> str:
    """'worst probe uses 2.3% of its tolerance (decoder.layer.39)'."""
    if not margin:
        return "no probe has numbers to measure a margin"
    where = margin["name"] + (f" in {margin['section']}" if with_section and margin.get("section") else "")
    ratio = _float(margin.get("tol_ratio"))
    if ratio is not None and ratio > 1 and margin.get("status") == "pass":  # passed the measured 16-bit gate
        return (f"worst probe is at {_pct(ratio)} of the dtype table's tolerance ({where}), inside the measured "
                f"16-bit gate ({FLOOR_GATE:g}x HF's own rounding error in each row)")
    if ratio is not None and (math.isnan(ratio) or ratio > 1):
        return f"worst probe is at {_pct(ratio)} of its tolerance ({where}): outside"
    return f"worst probe uses {_pct(margin.get('tol_ratio'))} of its tolerance ({where})"


_LAYER = re.compile(r"^\d+$")


def group_key(name: str) -> str:
    """The probe's layer: its name up to the first numeric segment ('decoder.layer.12.mlp' -> 'decoder.layer.12');
    names without one group under their component ('encoder.input_linear' -> 'encoder')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if i and _LAYER.match(part):
            return ".".join(parts[:i + 1])
    return parts[0]


def _component(name: str) -> str:
    return name.split(".", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# terminal


def _row(probe: Mapping, name_width: int, floors: bool, teacher_mode: bool) -> str:
    m = _metrics(probe)
    name = probe["name"] if len(probe["name"]) <= name_width else "…" + probe["name"][-(name_width - 1):]
    line = (f"{probe['index']:>4} {name:<{name_width}} {probe['propagated']['status']:<14} "
            f"{_pct(m.get('tol_ratio')):>8} {_num(m.get('max_abs')):>9} {_cos(_float(m.get('cosine'))):>9}")
    if floors:
        line += f" {_times(probe.get('floor_ratio')):>7}" + (" suspect" if probe.get("suspect") else "        ")
    if teacher_mode:
        line += f" {(probe.get('teacher') or {}).get('status', ''):<14} {_pct(_metrics(probe, 'teacher').get('tol_ratio')):>8}"
    return line + f" {probe.get('attribution', '')}"


def _brief_lines(label: str, brief: Optional[Mapping], several: bool) -> List[str]:
    if not brief:
        return []
    section = f" ({brief['section']})" if several and brief.get("section") else ""
    lines = [f"{label}: #{brief['index']} {brief['name']} [{brief['status']}]{section} "
             f"err/tol={_num(brief['tol_ratio'])} ({_pct(brief['tol_ratio'])}) max|d|={_num(brief['max_abs'])} "
             f"needs atol>={_num(brief['min_atol'])} (atol {_num(brief['atol'])}, rtol {_num(brief['rtol'])})"
             + (f" floor ratio {_times(brief.get('floor_ratio'))}" if brief.get("floor_ratio") is not None else "")
             + (f" float64 check {brief['float64']} (max|d| {_num(brief.get('float64_max_abs'))})"
                if brief.get("float64") not in (None, "pass") else "")
             + (f" missing upcast: FMS runs {', '.join(brief['missing_upcast'])} here, HF does not"
                if brief.get("missing_upcast") else "")
             + f"; cause: {brief['attribution']}"]
    if brief.get("worst_index") is not None:
        lines.append(f"    largest |d| at {brief['worst_index']}: HF {_num(brief['worst_hf'], 5)} "
                     f"FMS {_num(brief['worst_fms'], 5)}")
    if brief["status"] not in (Status.FAIL, Status.PASS):
        lines.append(f"    {brief['detail']}")
    return lines


def verdict_line(summary: Mapping) -> str:
    """`PARITY PASS|FAIL|INCOMPLETE`, with what softened or qualifies it: --lenient, near-tie flips excused,
    checks that did not run."""
    parts = [f"PARITY {str(summary['verdict']).upper()}"]
    if summary.get("why"):
        parts.append(f"({summary['why']})")
    if summary.get("lenient"):
        parts.append("[lenient: floor, formula and upcast findings do not fail]")
    if summary.get("near_tie_flips"):
        parts.append(f"[{summary['near_tie_flips']} near-tie flip(s) excused]")
    not_run = summary.get("not_run") or ()
    if not_run:
        parts.append(f"[{len(not_run)} planned check(s) not run, {len(summary.get('unaccepted') or ())} not asked for]")
    return " ".join(parts)


def not_run_lines(summary: Mapping) -> List[str]:
    """One line per planned check that did not run: which, where, why, and whether the user asked for it."""
    unaccepted = {(r.get("check"), r.get("section")) for r in summary.get("unaccepted") or ()}
    lines = []
    for record in summary.get("not_run") or ():
        asked = "NOT asked for" if (record.get("check"), record.get("section")) in unaccepted else "asked for"
        where = f" in {record['section']}" if record.get("section") else ""
        lines.append(f"  not run: {record['check']}{where}: {record['why']} ({record['cause']}; {asked})")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# the verdict in one line, with the margin against the rule that decided it (the quiet `compare` prints only this)
# (the detail parity.diff.apply_row_floor_gate writes:)
_GATE_NEEDS = re.compile(r"needs (\S+) x HF's own rounding error")


def _ratio(value: Any) -> str:
    """A margin as a plain factor: 0.047, 0.31, 3.1, 120, 2280, 1.0e+07; non-finite as ∞ / NaN."""
    number = _float(value)
    if number is None or not math.isfinite(number) or abs(number) >= 1e6:
        return _num(value if number is None else number, 1)
    return f"{number:.2g}" if abs(number) < 100 else f"{number:.0f}"


def _policy(report: Mapping) -> Policy:
    return Policy.from_dict((report.get("meta") or {}).get("policy"))


def _records(report: Mapping) -> List[Tuple[str, Mapping]]:
    return [(s["title"], p) for s in report["sections"] for p in _execution_order(s["result"]["probes"])]


def _gate_needs(probe: Mapping) -> Optional[float]:
    """How many times HF's own rounding error a 16-bit probe outside the dtype table needed (None: not gated)."""
    match = _GATE_NEEDS.search(str(probe["propagated"].get("detail") or ""))
    return _float(match.group(1).rstrip(";,")) if match else None


def _floor_of(probe: Mapping) -> Optional[float]:
    """The probe's error against its noise floor, the larger of the propagated and the own (teacher-forced)."""
    ratios = [r for r in (_float(probe.get("floor_ratio")), _float(probe.get("own_floor_ratio"))) if r is not None]
    return max(ratios, key=lambda r: math.inf if math.isnan(r) else r) if ratios else None


def _worst(records: Sequence[Tuple[str, Mapping]], value: Callable[[Mapping], Optional[float]]):
    """(value, section, probe) of the record with the largest value (NaN counts as largest); None when none has one."""
    scored = [(v, title, p) for title, p in records if (v := value(p)) is not None]
    return max(scored, key=lambda t: math.inf if math.isnan(t[0]) else t[0]) if scored else None


def _where(title: str, probe: Mapping, several: bool) -> str:
    return probe["name"] + (f" in {title}" if several else "")


def pass_margins(report: Mapping) -> List[str]:
    """How far a passing run stands from each rule that could have failed it: the dtype table's tolerance, the
    measured 16-bit gate (probes outside the table), the noise floor."""
    records, several = _records(report), len(report["sections"]) > 1
    factor = _policy(report).floor_factor
    gated = [(t, p) for t, p in records if _gate_needs(p) is not None and p["propagated"]["status"] == Status.PASS]
    table = _worst([(t, p) for t, p in records if (t, p) not in gated], lambda p: _float(_metrics(p).get("tol_ratio")))
    parts = [f"worst probe at {_ratio(table[0])} of its tolerance ({_where(table[1], table[2], several)})" if table
             else "no probe has numbers to measure a margin"]
    if gated:  # passed only through the 16-bit gate: that gate decided them
        needs = _worst(gated, _gate_needs)
        parts.append(f"{len(gated)} 16-bit probe(s) outside the dtype table within {_ratio(needs[0])}x HF's own "
                     f"rounding error, {FLOOR_GATE:g}x allowed ({needs[2]['name']})")
    floor = _worst(records, _floor_of)
    parts.append(f"errors at most {_ratio(floor[0])}x their noise floor, {factor:g}x allowed ({floor[2]['name']})"
                 if floor else "no noise floor measured")
    return parts


def rule_measures(probe: Mapping, policy: Policy = Policy()) -> List[str]:
    """Each rule of `parity.verdict` the probe breaks, with by how much: 'gate: 12x its tolerance'."""
    out = []
    for rule in probe_rules(probe, policy):
        if rule == "gate":
            prop = probe["propagated"]
            ratio = _metrics(probe).get("tol_ratio")
            out.append(f"gate: {_ratio(ratio)}x its tolerance" if prop["status"] == Status.FAIL and ratio is not None
                       else f"gate: {prop['status']} ({one_line_text(prop.get('detail'))})")
        elif rule == "own":
            teacher = probe["teacher"]
            ratio = _metrics(probe, "teacher").get("tol_ratio")
            out.append(f"own: its own (teacher-forced) error {_ratio(ratio)}x its tolerance" if ratio is not None
                       else f"own: teacher-forced {teacher['status']}")
        elif rule == "floor":
            out.append(f"floor: {_ratio(_floor_of(probe))}x its noise floor, {policy.floor_factor:g}x allowed")
        elif rule == "formula":
            out.append(f"formula: max |d| {_num(_metrics(probe, 'float64').get('max_abs'))} with both sides in "
                       "float64")
        elif rule == "upcast":
            out.append(f"upcast: FMS runs {', '.join(probe['missing_upcast'])} in 16 bits here, HF does not")
    return out


def one_line_text(text: Any, limit: int = 100) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _probe_record(report: Mapping, brief: Mapping) -> Optional[Mapping]:
    for section in report["sections"]:
        if section["title"] == brief.get("section", section["title"]):
            for probe in section["result"]["probes"]:
                if probe["name"] == brief["name"]:
                    return probe
    return None


def first_divergence_text(report: Mapping) -> Optional[str]:
    """'first divergence NAME (SECTION): gate: 12x its tolerance' of a failing run; None when it has none."""
    summary, policy = report["summary"], _policy(report)
    if summary.get("verdict") != "fail":
        return None
    brief = summary.get("first_divergence")
    record = _probe_record(report, brief) if brief else None
    if record is None:  # a report without the firsts (hand-made, older): the first record a rule fails, in order
        failing = [(t, p) for s in report["sections"] if s["summary"]["verdict"] != "pass"
                   for t, p in _records({"sections": [s]}) if failing_rules(p, policy)]
        if not failing:
            return None
        brief, record = {"section": failing[0][0], "name": failing[0][1]["name"]}, failing[0][1]
    measures = rule_measures(record, policy)
    section = f" ({brief['section']})" if brief.get("section") and len(report["sections"]) > 1 else ""
    return f"first divergence {brief['name']}{section}" + (f": {'; '.join(measures)}" if measures else "")


def headline(report: Mapping) -> str:
    """The verdict in one line with the margin against the rule that decided it: FAIL names the first divergence
    and the rule it breaks, INCOMPLETE the checks that did not run, PASS how far each rule is."""
    report = upgrade(report)
    summary = report["summary"]
    verdict = str(summary["verdict"])
    extras = ([f"{summary['near_tie_flips']} near-tie flip(s) excused"] if summary.get("near_tie_flips") else [])
    extras += ["lenient: floor, formula and upcast findings do not fail"] if summary.get("lenient") else []
    if summary.get("not_run") and verdict != "incomplete":  # incomplete names them itself
        extras.append(f"{len(summary['not_run'])} planned check(s) not run "
                      f"({len(summary.get('unaccepted') or ())} not asked for)")
    if verdict == "fail":
        parts = [first_divergence_text(report) or "no first divergence recorded", summary.get("why") or ""]
    elif verdict == "incomplete":
        missing = summary.get("unaccepted") or []
        named = ", ".join(f"{r.get('check')} ({r.get('cause')})" for r in missing[:3])
        parts = [f"{len(missing)} planned check(s) did not run, not asked for: {named}"
                 + (" …" if len(missing) > 3 else "") + " (--allow-partial accepts them)",
                 "every check that ran passed: " + "; ".join(pass_margins(report))]
    else:
        parts = pass_margins(report)
    return f"{verdict.upper()}: " + "; ".join(p for p in parts + extras if p)


def render_terminal(report: Mapping, *, max_rows: int = 15, max_failing: int = 40, name_width: int = 34,
                    context: Optional[int] = None) -> str:
    """Text for pytest failure output: a verdict line with the margin, the firsts, then per section the `max_rows`
    worst probes by error/tolerance and every other non-passing probe (at most `max_failing`). `context` is
    accepted for callers of the old signature and ignored (worst-first needs no context rows)."""
    report = upgrade(report)
    summary, meta, sections = report["summary"], report.get("meta") or {}, report["sections"]
    several = len(sections) > 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["status_counts"].items()))
    first = summary.get("first_divergence")
    lines = [
        verdict_line(summary) + f"  {margin_text(summary.get('margin'), with_section=several)}"
        + (f"; first divergence: {first['name']}" if first else ""),
        f"  {summary['probes']} probes: {counts}" + (f" in {len(sections)} sections" if several else "")
        + f"  (mode={meta.get('mode')}, dtype={meta.get('dtype')}, device={meta.get('device')})",
    ]
    lines += not_run_lines(summary)
    lines += _brief_lines("first divergence", first, several)
    lines += _brief_lines("first own error", summary.get("first_own_error"), several)
    lines += _brief_lines("first suspect", summary.get("first_suspect"), several)
    for section in sections:
        data, ssum = section["result"], section["summary"]
        probes = data["probes"]
        floors = any(p.get("floor_ratio") is not None or p.get("suspect") for p in probes)
        teacher_mode = data.get("mode") == "teacher_forced"
        if several:
            lines.append(f"== {section['title']} ({section['kind']}): {str(ssum['verdict']).upper()}, "
                         f"{ssum['probes']} probes; {margin_text(ssum.get('margin'))}")
        header = (f"{'#':>4} {'probe':<{name_width}} {'status':<14} {'err/tol':>8} {'max|d|':>9} {'cosine':>9}"
                  + (f" {'floor×':>7} {'':7}" if floors else "")
                  + (f" {'TF status':<14} {'TF e/tol':>8}" if teacher_mode else "") + " cause")
        worst = sorted((p for p in probes if _ratio_key(p) > 0), key=_ratio_key, reverse=True)[:max_rows]
        shown = {p["name"] for p in worst}
        lines.append(f"worst {len(worst)} of {len(probes)} probes by error/tolerance:" if worst
                     else f"all {len(probes)} probes match exactly (or have no numbers)")
        if worst:
            lines += [header, "-" * len(header)] + [_row(p, name_width, floors, teacher_mode) for p in worst]
        failing = [p for p in _execution_order(probes)
                   if p["propagated"]["status"] != Status.PASS and p["name"] not in shown]
        if failing:
            lines.append(f"other non-passing probes ({len(failing)}), execution order:")
            lines += [_row(p, name_width, floors, teacher_mode) for p in failing[:max_failing]]
            if len(failing) > max_failing:
                lines.append(f"     ... {len(failing) - max_failing} more non-passing probe(s) (see the HTML/JSON report)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# HTML: the view model (plain dicts and numbers) the template renders; all escaping happens in the template


@lru_cache(maxsize=1)
def template_environment():
    """The jinja2 environment for the report templates: autoescape on for everything, and every value goes through
    `html.escape` (quotes included) so no interpolation can produce markup."""
    import jinja2
    from markupsafe import Markup

    def finalize(value: Any) -> Any:
        if isinstance(value, Markup):  # only jinja's own macro output is Markup; it was escaped when built
            return value
        return Markup(html.escape("–" if value is None else str(value), quote=True))  # None reads as a dash

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, finalize=finalize, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, cos=lambda v: _cos(_float(v) if isinstance(v, str) else v), pct=_pct, times=_times,
                       tojson_text=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False),
                       kvtext=lambda v: " · ".join(f"{k} {_num(x)}" for k, x in v.items()) if isinstance(v, Mapping)
                       else json.dumps(v, ensure_ascii=False))
    env.globals.update(record_html=record_html)
    return env


_PLOT_W, _PLOT_H = 900, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 14, 32, 116  # _BOTTOM: the zero lane, labels and legend below the plot
_CHAR = 7.6  # estimated width of one label character in viewBox units (13 px sans-serif)


def _scale(probe: Mapping) -> Optional[float]:
    """The tolerance bound at the largest-|Δ| element (atol + rtol |HF|): converts a noise floor into tolerance units."""
    tol, m = probe["tolerance"], _metrics(probe)
    ref = _float(m.get("worst_hf"))
    bound = (_float(tol.get("atol")) or 0.0) + (_float(tol.get("rtol")) or 0.0) * abs(ref if ref is not None else 0.0)
    return bound if bound > 0 and math.isfinite(bound) else None


def _layer_groups(probes: Sequence[Mapping]) -> List[Tuple[str, int, int]]:
    """Contiguous runs of probes (execution order) with the same group key: (key, start, stop)."""
    runs: List[Tuple[str, int, int]] = []
    for i, probe in enumerate(probes):
        key = group_key(probe["name"])
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1], i + 1)
        else:
            runs.append((key, i, i + 1))
    return runs


def _legend(items: Sequence[Tuple[str, str]], top: float) -> List[dict]:
    """Legend entries laid out in rows from `top` (widths estimated from the label length)."""
    out, x, row = [], _LEFT, 0
    for label, shape in items:
        width = 34 + 8 * len(label)
        if x + width > _PLOT_W - _RIGHT:
            x, row = _LEFT, row + 1
        out.append({"label": label, "shape": shape, "x": x, "y": top + 20 * row})
        x += width
    return out


def _plot(probes: Sequence[Mapping], summary: Mapping, teacher_mode: bool, *,
          grid_label: Optional[Callable[[int], str]] = None, y_title: str = "error / tolerance (log scale)",
          names: Optional[Mapping[str, str]] = None) -> dict:
    """Geometry of the error-vs-depth plot (viewBox units): log10 error/tolerance per probe in execution order.
    `grid_label(decade)` labels the y grid, `names` renames legend entries (the report diff plots growth factors)."""
    names = {"pass": "pass", "fail": "fail", "layer max": "layer max", "tolerance": "tolerance", **(names or {})}
    n = max(len(probes), 1)
    plot_w, plot_h = _PLOT_W - _LEFT - _RIGHT, _PLOT_H - _TOP - _BOTTOM
    ratios = [_float(_metrics(p).get("tol_ratio")) for p in probes]
    teacher = [_float(_metrics(p, "teacher").get("tol_ratio")) for p in probes]
    floors = []
    for p in probes:
        floor, scale = _float(p.get("noise_floor")), _scale(p)
        floors.append(None if floor is None or scale is None else floor / scale)
    finite = [v for v in ratios + teacher + floors if v is not None and math.isfinite(v) and v > 0]
    lo = max(math.floor(math.log10(min(finite))), -15) if finite else -6
    hi = math.ceil(math.log10(max(finite))) if finite else 1
    lo, hi = min(lo, -1), max(hi, 1)  # the tolerance line (1e0) is always inside the plot
    lane = _TOP + plot_h + 14  # exact matches (0) sit in a lane below the log axis

    def x(i: float) -> float:
        return round(_LEFT + plot_w * (i + 0.5) / n, 2)

    def y(v: Optional[float]) -> float:
        if v is None or math.isnan(v) or math.isinf(v):
            return _TOP + 6  # no usable number: top edge (markers say why)
        if v <= 0:
            return lane
        return round(_TOP + plot_h * (hi - min(max(math.log10(v), lo), hi)) / (hi - lo), 2)

    points = []
    for i, (p, v) in enumerate(zip(probes, ratios)):
        m = _metrics(p)
        status = p["propagated"]["status"]
        kind = ("none" if v is None else "nan" if math.isnan(v) else "inf" if math.isinf(v)
                else "fail" if status != Status.PASS else "pass")
        if kind == "none" and status == Status.PASS:
            continue
        tip = (f"#{p['index']} {p['name']} [{status}] {_pct(m.get('tol_ratio'))} of tolerance, max|Δ| "
               f"{_num(m.get('max_abs'))}" + (f", {_times(p.get('floor_ratio'))} noise floor"
                                               if p.get("floor_ratio") is not None else ""))
        points.append({"x": x(i), "y": y(v), "kind": kind, "tip": tip})
    teacher_points = [{"x": x(i), "y": y(v)} for i, v in enumerate(teacher) if teacher_mode and v is not None]
    floor_path = " ".join(f"{'M' if i == 0 or floors[i - 1] is None else 'L'}{x(i)},{y(v)}"
                          for i, v in enumerate(floors) if v is not None and v > 0)
    groups = _layer_groups(probes)
    envelope = []
    for key, start, stop in groups:
        values = [v for v in ratios[start:stop] if v is not None and math.isfinite(v)]
        if values and max(values) > 0:
            top = y(max(values))
            envelope.append(f"M{round(_LEFT + plot_w * start / n, 2)},{top} H{round(_LEFT + plot_w * stop / n, 2)}")
    ticks, labels = _x_axis(probes, groups, plot_w, n)
    bands = _component_bands(probes, plot_w, n)
    markers = []
    by_name = {p["name"]: i for i, p in enumerate(probes)}
    for key, shape, label in (("first_divergence", "tri", "first divergence"), ("first_own_error", "diamond",
                              "first own error"), ("first_suspect", "square", "first suspect")):
        brief = summary.get(key)
        if brief and brief["name"] in by_name:
            i = by_name[brief["name"]]
            markers.append({"x": x(i), "y": y(ratios[i]), "shape": shape, "label": label,
                            "tip": f"{label}: #{brief['index']} {brief['name']} ({_pct(brief['tol_ratio'])})"})
    grid_label = grid_label or (lambda d: f"{100 * 10.0 ** d:g}%" if d >= -4 else f"1e{d + 2}%")
    step = max(1, math.ceil((hi - lo) / 8))  # decades multiple of `step`, so the tolerance line (1e0) is one
    grid = [{"y": y(10.0 ** d), "label": grid_label(d)} for d in range(lo, hi + 1) if d % step == 0]
    legend = [(names["pass"], "circle-pass"), (names["fail"], "circle-fail"), (names["layer max"], "envelope"),
              (names["tolerance"], "tolerance")]
    if teacher_points:
        legend.append(("teacher-forced", "teacher"))
    if floor_path:
        legend.append(("noise floor", "floor"))
    legend += [(m["label"], m["shape"]) for m in markers]
    entries = _legend(legend, lane + 70)
    return {
        "w": _PLOT_W, "h": round(entries[-1]["y"] + 12), "left": _LEFT, "right": _PLOT_W - _RIGHT, "top": _TOP,
        "bottom": _TOP + plot_h,
        "plot_w": plot_w, "plot_h": plot_h, "lane": lane, "one": y(1.0), "grid": grid, "points": points,
        "teacher": teacher_points, "floor_path": floor_path, "envelope": " ".join(envelope), "ticks": ticks,
        "labels": labels, "bands": bands, "markers": markers, "r": 3.4 if n <= 80 else 2.4,
        "legend": entries, "y_title": y_title,
    }


def _x_axis(probes: Sequence[Mapping], groups, plot_w: float, n: int) -> Tuple[List[dict], List[dict]]:
    """The x axis of the plot: a tick at every layer group's start, and the labels that fit (component names first,
    the big components before the small; then layers at a round stride per component, so they do not collide)."""
    ticks, candidates = [], []
    for k, (key, start, stop) in enumerate(groups):
        gx = round(_LEFT + plot_w * start / n, 2)
        new_component = k == 0 or _component(key) != _component(groups[k - 1][0])
        ticks.append({"x": gx, "major": new_component})
        parts = key.split(".")
        if new_component:  # component starts carry the component's name (projector, decoder)
            text = parts[0]
        elif len(parts) > 1:  # layers: block.4, layer.12
            text = ".".join(parts[-2:])
        else:  # a component's own probe between its layers (encoder.ctc_mid -> ctc_mid)
            text = probes[start]["name"].split(".", 1)[-1]
        candidates.append({"x": gx, "text": text, "major": new_component})
    # layer labels at a round stride (every 1, 2, 4, 5, 10... layers) chosen per component so they do not collide
    stride: Dict[str, int] = {}
    for comp in dict.fromkeys(_component(key) for key, _, _ in groups):
        layered = [(key, start, stop) for key, start, stop in groups if _component(key) == comp and "." in key]
        if layered:
            width = plot_w * sum(stop - start for _, start, stop in layered) / n / len(layered)
            need = max(_CHAR * len(".".join(key.split(".")[-2:])) for key, _, _ in layered) + 10
            stride[comp] = next((k for k in (1, 2, 4, 5, 10, 20, 25, 50, 100) if k * width >= need), 1000)
    labels: List[dict] = []
    size: Dict[str, int] = {}
    for p in probes:
        size[_component(p["name"])] = size.get(_component(p["name"]), 0) + 1
    # big components claim their label first (decoder before a 3-probe projector next to it)
    ranked = sorted(zip(candidates, groups), key=lambda cg: -size[_component(cg[1][0])] if cg[0]["major"] else 0)
    for major in (True, False):
        for c, (key, _, _) in ranked:
            number = key.rsplit(".", 1)[-1]
            if c["major"] != major or c["x"] + _CHAR * len(c["text"]) > _PLOT_W or (
                    not major and number.isdigit() and int(number) % stride.get(_component(key), 1)):
                continue
            if all(c["x"] + _CHAR * len(c["text"]) + 8 <= o["x"] or o["x"] + _CHAR * len(o["text"]) + 8 <= c["x"]
                   for o in labels):
                labels.append(c)
    return ticks, labels


def _component_bands(probes: Sequence[Mapping], plot_w: float, n: int) -> List[dict]:
    """The shaded band behind each component's probes, with its name where it fits."""
    bands = []
    for k, key in enumerate(dict.fromkeys(_component(p["name"]) for p in probes)):
        idx = [i for i, p in enumerate(probes) if _component(p["name"]) == key]
        x0, x1 = _LEFT + plot_w * idx[0] / n, _LEFT + plot_w * (idx[-1] + 1) / n
        bands.append({"x": round(x0, 2), "w": round(x1 - x0, 2), "label": key if x1 - x0 >= 9 * len(key) else "",
                      "cx": round((x0 + x1) / 2, 2), "shade": k % 2 == 0})
    return bands


def _probe_view(probe: Mapping, anchor: str) -> dict:
    m = _metrics(probe)
    status = probe["propagated"]["status"]
    ratio = _float(m.get("tol_ratio"))
    max_abs = _float(m.get("max_abs"))
    return {"p": probe, "m": m, "tm": _metrics(probe, "teacher"), "id": f"{anchor}-p{probe['index']}",
            "status": status, "bad": status != Status.PASS, "suspect": bool(probe.get("suspect")),
            "zero": max_abs == 0 and status == Status.PASS, "ratio": ratio}


def _flagged_views(views: List[dict], data: Mapping, first: Optional[str]) -> List[dict]:
    """The rows of a section's flagged table, in execution order (the model's own order, so the culprit is read
    before what it caused): the probes a rule breaks, the first divergence at the top and marked, then the other
    probes with a non-zero error."""
    policy = Policy(lenient=_lenient(data), floor_factor=data.get("floor_factor") or FLOOR_FACTOR)
    for v in views:
        v["broken"] = bool(probe_rules(v["p"], policy)) or v["bad"]
        v["first"] = v["p"]["name"] == first
    broken = sorted((v for v in views if v["broken"]), key=lambda v: not v["first"])  # stable: order kept
    return broken + [v for v in views if not v["broken"] and (v["suspect"] or not v["zero"])]


def _section_view(section: Mapping, k: int) -> dict:
    data = section["result"]
    anchor = f"s{k}"
    probes = _execution_order(data["probes"])
    views = [_probe_view(p, anchor) for p in probes]
    teacher_mode = data.get("mode") == "teacher_forced"
    summary = dict(section["summary"])
    if summary["verdict"] == Status.PASS:  # a passing section has no divergence (a lenient suspect is not one)
        summary["first_divergence"] = None
    flagged = _flagged_views(views, data, (summary.get("first_divergence") or {}).get("name"))
    components: List[dict] = []
    for key, start, stop in _layer_groups(probes):
        component = _component(key)
        if not components or components[-1]["name"] != component:
            components.append({"name": component, "groups": []})
        members = views[start:stop]
        label = key if key != component else component + ": " + ", ".join(
            v["p"]["name"].split(".", 1)[-1] for v in members[:3]) + (" …" if len(members) > 3 else "")
        components[-1]["groups"].append({"key": key, "label": label, "probes": members})
    for comp in components + [g for c in components for g in c["groups"]]:
        members = comp.get("probes") or [v for g in comp["groups"] for v in g["probes"]]
        counts: Dict[str, int] = {}
        for v in members:
            counts[v["status"]] = counts.get(v["status"], 0) + 1
        worst = max(members, key=lambda v: _ratio_key(v["p"]))
        prefix = (comp.get("key") or comp.get("name")) + "."
        short = worst["p"]["name"][len(prefix):] if worst["p"]["name"].startswith(prefix) else worst["p"]["name"]
        comp.update(worst_short=short or "output", count=len(members), counts=sorted(counts.items(), key=lambda kv: (kv[0] == "pass", kv[0])),
                    worst=worst, bad=any(v["bad"] for v in members), zero=all(v["zero"] for v in members),
                    suspect=any(v["suspect"] for v in members))
    return {"title": section["title"], "kind": section["kind"], "extra": section.get("extra") or {},
            "summary": summary, "anchor": anchor, "mode": data.get("mode"), "teacher_mode": teacher_mode,
            "views": views, "flagged": flagged, "zeros": sum(1 for v in views if v["zero"]),
            "broken": sum(1 for v in flagged if v["broken"]),
            "components": components, "plot": _plot(probes, summary, teacher_mode),
            "floors": any(p.get("noise_floor") is not None for p in probes), "ids": {p["name"]: v["id"]
                                                                                   for p, v in zip(probes, views)}}


_META_SHOWN = ("title", "weights", "checkpoint", "checkpoint_sha256", "git_commit", "device", "device_name", "dtype",
               "mode", "seed", "versions", "inputs", "tolerances", "created", "argv", "tf32")


def _provenance(meta: Mapping) -> dict:
    weights = meta.get("weights")
    inputs = meta.get("inputs") if isinstance(meta.get("inputs"), list) else []
    rows = [r for r in inputs if isinstance(r, Mapping)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return {
        "weights": "seeded random weights" if weights == "seeded-random" else weights,
        "inputs": {"columns": columns, "rows": [[r.get(c) for c in columns] for r in rows]},
        "other": [(k, v) for k, v in meta.items() if k not in _META_SHOWN],
    }


def header_margin(report: Mapping) -> str:
    """The report header's margin: a failing run's first divergence and the rule it breaks by how much (the culprit,
    not the largest error downstream of it), then the worst probe; otherwise the margin to each rule
    (`pass_margins`: the table's tolerance, the 16-bit gate, the noise floor)."""
    first = first_divergence_text(report)
    if first is None:  # pass or incomplete: how far each rule that could fail it is (as the terminal's verdict line)
        return "; ".join(pass_margins(report))
    return f"{first} · {margin_text(report['summary'].get('margin'), with_section=len(report['sections']) > 1)}"


def render_html(report: Mapping, *, title: Optional[str] = None) -> str:
    """The self-contained HTML page; `title` defaults to meta['title'] or the model-neutral 'Parity report'."""
    report = upgrade(report)
    meta = report.get("meta") or {}
    title = title or meta.get("title") or DEFAULT_TITLE
    sections = [_section_view(s, k) for k, s in enumerate(report["sections"])]
    ids = {(s["title"], name): anchor for s in sections for name, anchor in s["ids"].items()}
    return template_environment().get_template("report.html.j2").render(
        title=str(title), report=report, meta=meta, summary=report["summary"], sections=sections, ids=ids,
        provenance=_provenance(meta), margin=header_margin(report),
        margin_for=margin_text, several=len(sections) > 1, ok=Status.PASS)


def write_html(report: Mapping, path: Union[str, Path], *, title: Optional[str] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, title=title), encoding="utf-8")
    return path
