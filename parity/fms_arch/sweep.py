"""Every architecture compared once: the results table (README.md) and the run's JSON, with the time each took."""

import gzip
import json
import platform
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from parity.fms_arch.configs import ARCHITECTURES, BY_NAME


def _row(name: str, report: Optional[dict], seconds: float, error: Optional[str] = None) -> dict:
    arch = BY_NAME[name]
    row = {"architecture": name, "hf_class": arch.hf_class, "family": arch.family, "seconds": round(seconds, 1)}
    if arch.refused or report is None:
        return {**row, "verdict": "refused" if arch.refused else "error", "reason": arch.refused or error}
    summary = report["summary"]
    first = summary.get("first_divergence") or {}
    meta = report["meta"]
    sections = [{"title": s["title"], "verdict": s["summary"]["verdict"],
                 "first_divergence": (s["summary"].get("first_divergence") or {}).get("name")}
                for s in report["sections"]]
    own = next(((s["summary"].get("first_own_error") or {}).get("name") for s in report["sections"]
                if s["summary"].get("first_own_error")), None)
    return {**row, "verdict": summary["verdict"], "probes": summary["probes"], "first_own_error": own,
            "first_divergence": first.get("name"), "first_divergence_section": first.get("section"),
            "first_divergence_detail": first.get("detail"),
            "derived": (meta.get("derivation") or {}).get("probes"),
            "refused_modules": len((meta.get("derivation") or {}).get("refused_modules") or ()),
            "sections": sections, "load_error": next((s["extra"].get("error") for s in report["sections"]
                                                      if s["extra"].get("error")), None)}


def sweep(out: Path, names: Optional[Sequence[str]] = None,
          progress: Callable[[str], None] = lambda message: None) -> List[dict]:
    from parity.fms_arch.run import compare_report

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in ARCHITECTURES:
        if names and arch.name not in names:
            continue
        start = time.perf_counter()
        report = None
        error = None
        if not arch.refused:
            try:
                report = compare_report(arch, dtype=torch.float32)
                with gzip.open(out / f"{arch.name}.json.gz", "wt") as handle:  # the full report, ~10x smaller
                    json.dump(report, handle)
            except Exception as err:  # noqa: BLE001 -- the harness itself failed on it: listed, not hidden
                error = f"{type(err).__name__}: {err}"
        rows.append(_row(arch.name, report, time.perf_counter() - start, error))
        progress(f"{arch.name}: {rows[-1]['verdict']} ({rows[-1]['seconds']} s)")
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "architectures": rows}, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(rows))
    return rows


def _cell(row: dict) -> str:
    if row["verdict"] in ("refused", "error"):
        return f"{row['verdict'].upper()}: {row.get('reason')}"
    if row.get("load_error"):
        return f"FAIL at load: {row['load_error'][:160]}"
    failing = [s for s in row["sections"] if s["verdict"] != "pass"]
    if not failing:
        return "PASS"
    where = "; ".join(f"{s['title']} at `{s['first_divergence']}`" for s in failing)
    own = f" (first own error `{row['first_own_error']}`)" if row.get("first_own_error") else ""
    return f"FAIL: {where}{own}"


def markdown_table(rows: List[dict]) -> str:
    lines = ["| architecture | HF class | family | verdict (first divergence per failing section) | probes | "
             "refused modules | seconds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['architecture']} | {row['hf_class']} | {row['family']} | {_cell(row)} | "
                     f"{row.get('derived', '–')} | {row.get('refused_modules', '–')} | {row['seconds']} |")
    return "\n".join(lines) + "\n"
