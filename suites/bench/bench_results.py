"""Benchmark results: collected per measurement, written as JSON under results/bench/, rendered as the table of
BENCHMARKS.md.

    python suites/bench/bench_results.py results/bench/<file>.json   # prints the Markdown tables
"""

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results" / "bench"
# file to write instead of results/bench/<date>-<card>.json (off the card: the temporary folder's granite-speech-bench/)
OUT_ENV = "GRANITE_SPEECH_BENCH_OUT"

IMPL_LABELS = {
    "hf": "HF eager `generate`",
    "hf_static": "HF `generate`, static cache (decode compiled by transformers)",
    "fms": "FMS eager `generate` (use_cache)",
    "fast": "fast path (static cache + CUDA graph)",
    "fast_compiled": "fast path, layers compiled (inductor) + CUDA graph",
    "fast_autotuned": "fast path, layers compiled with GEMM autotuning (inductor max-autotune) + CUDA graph",
    "fast_static_prefill": "fast path, static prefill (prompt through the step's layers into the cache, graphed)",
    "fast_encoder_compiled": "fast path, encoder + projector compiled (inductor, math attention) + CUDA graph",
    "fast_encoder_flex": "fast path, encoder + projector compiled, block attention by `flex_attention` + CUDA graph",
    "fast_splitk": "fast path, decode-step weight products by the split-K GEMV (Triton) + CUDA graph",
    "fast_compiled_splitk": "fast path, layers compiled (inductor), weight products by the split-K GEMV + CUDA graph",
    "ctc_fms": "FMS `GraniteSpeech5ForCTC.generate` (5.0 CTC)",
    "ctc_fms_compiled": "FMS 5.0 CTC, compiled (inductor)",
}


def environment() -> Dict[str, Any]:
    import transformers

    try:
        import fms

        fms_version = getattr(fms, "__version__", None) or _dist_version("ibm-fms")
    except ImportError:
        fms_version = None
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    return {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "ibm_fms": fms_version,
        "python": platform.python_version(),
    }


def _dist_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class BenchResults:
    """Rows of (variant, measurement, implementation, value, unit, extra); rewritten to disk after every add so a
    run cut short still leaves what it measured."""

    def __init__(self, path: Optional[Path] = None, on_card: bool = True):
        self.meta = environment()
        if path is None:
            card = self.meta["card"].replace(" ", "-").replace("/", "-")
            # a run off the card debugs the benchmarks (GRANITE_SPEECH_BENCH_DEVICE=cpu), it measures nothing: its
            # JSON is kept out of results/
            folder = RESULTS_DIR if on_card else Path(tempfile.gettempdir()) / "granite-speech-bench"
            path = folder / f"{self.meta['date']}-{card}.json"
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []
        self.notes: Dict[str, Any] = {}

    @classmethod
    def from_env(cls, on_card: bool = True) -> "BenchResults":
        out = os.environ.get(OUT_ENV)
        return cls(Path(out) if out else None, on_card=on_card)

    def add(self, variant: str, measurement: str, impl: str, value: float, unit: str, **extra) -> None:
        self.rows.append(
            {"variant": variant, "measurement": measurement, "impl": impl, "value": value, "unit": unit, **extra}
        )
        self.write()

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta, "notes": self.notes, "rows": self.rows}
        self.path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _value(rows, variant, measurement, impl) -> Optional[Dict[str, Any]]:
    for row in rows:
        if (row["variant"], row["measurement"], row["impl"]) == (variant, measurement, impl):
            return row
    return None


def _fmt(row: Optional[Dict[str, Any]], digits: int = 2) -> str:
    if row is None:
        return "–"
    return f"{row['value']:.{digits}f}"


# (measurement key, label, decimals)
TABLE_ROWS = [
    ("encoder_projector_3s", "encoder + projector, 3 s audio (ms)", 2),
    ("encoder_projector_10s", "encoder + projector, 10 s audio (ms)", 2),
    ("encoder_projector_30s", "encoder + projector, 30 s audio (ms)", 2),
    ("prefill", "prefill: 30 s audio + 30-token prompt, 1 new token (ms)", 1),
    ("decode_b1", "decode, batch 1 (ms/token)", 2),
    ("decode_b8", "decode, batch 8 (ms/step)", 2),
    ("e2e_30s_128", "end to end, 30 s audio + 128 tokens (s)", 3),
    ("rtf_30s_128", "RTF (end to end / 30 s)", 4),
    ("peak_memory", "peak GPU memory (GiB)", 2),
    ("warmup", "first call incl. graph capture / compile (s)", 1),
    ("throughput_b64_30s_128", "throughput RTFx: 64 x 30 s clips, 128 tokens each, one call", 0),
    *((f"ctc_rtfx_b{b}_30s", f"CTC RTFx: {b} x 30 s clips, greedy ids, features precomputed", 0) for b in (16, 64, 256)),
]


def render_markdown(data: Dict[str, Any]) -> str:
    meta, rows = data["meta"], data["rows"]
    variants = sorted({r["variant"] for r in rows}, key=lambda v: {"tiny": 0, "2b": 1, "8b": 2}.get(v, 9))
    impls = [i for i in IMPL_LABELS if any(r["impl"] == i for r in rows)]
    lines = [
        f"Card: **{meta['card']}**; torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, "
        f"ibm-fms {meta['ibm_fms']}, Python {meta['python']}; measured {meta['date']}.",
        "",
    ]
    for variant in variants:
        lines += [f"### {variant} dimensions", "", "| | " + " | ".join(IMPL_LABELS[i] for i in impls) + " |",
                  "|---" * (len(impls) + 1) + "|"]
        for key, label, digits in TABLE_ROWS:
            cells = [_fmt(_value(rows, variant, key, impl), digits) for impl in impls]
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        floors = [r for r in rows if r["variant"] == variant and r["measurement"] == "decode_floor"]
        for row in floors:
            lines.append(
                f"| decode floor, batch {row['batch']} (ms/step): weights + KV bytes / copy bandwidth | "
                + " | ".join(f"{row['value']:.2f}" for _ in impls)
                + " |"
            )
            ratios = [_value(rows, variant, f"decode_b{row['batch']}", impl) for impl in impls]
            lines.append(f"| decode, batch {row['batch']}: times the floor | "
                         + " | ".join("–" if r is None else f"{r['over_floor']:.2f}x" for r in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python suites/bench/bench_results.py RESULTS.json")
    print(render_markdown(json.loads(Path(sys.argv[1]).read_text())))
