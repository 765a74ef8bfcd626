"""False-positive rate of the verdict's sharp rules on correct ports (issue 22, "sound checks fail by default").

Every config is a correct port: a random *supported* HF Granite Speech config of the config fuzz
(`suites/test_config_fuzz.py`: the `specs` strategy, filtered to an empty `unsupported`), written by its
`write_checkpoint` and fed by its `make_inputs` (a batch of 2 with audio, one row left-padded). Each config goes
through the judgement `compare` runs on a model section, `pipeline._model_section` (teacher-forced, floors on, the
float64 formula check, and in 16-bit runs the upcast audit), and each rule is counted separately:

- far above the floor: a probe whose floor_ratio or own_floor_ratio exceeds `parity.diff.FLOOR_FACTOR`;
- the float64 formula check: a probe whose float64 comparison (FMS vs HF, both in float64) is not a pass;
- a missing fp32 upcast (16-bit runs only): a sensitive op FMS runs in 16 bits where HF runs none;
- the gate: a probe whose propagated status is not a pass (teacher-forced failures counted beside it);
- the engine's own verdict: `parity.report.build_report(result)["summary"]["verdict"]`.

Run (from the repository root; `suites` imports as a namespace package, so pytest's collection is unchanged):

    .venv/bin/python -m suites.bench.false_positives --configs 200 --dtypes float32 bfloat16 \
        --json results/verdict/false-positives-cpu.json
"""

import argparse
import json
import math
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

DTYPES = ("float32", "bfloat16", "float16")
# a probe record keeps these fields in the JSON (the raw numbers each rule read)
PROBE_FIELDS = ("name", "status", "teacher", "max_abs", "tol_ratio", "noise_floor", "floor_ratio", "own_floor_ratio",
                "float64", "float64_tol_ratio", "float64_max_abs", "missing_upcast", "suspect")


# ---------------------------------------------------------------------------------------------- drawing configs
def draw_specs(count: int, seed: int) -> list:
    """`count` supported specs of the fuzz strategy, reproducible for a given `seed` and hypothesis version.

    The strategy is drawn inside a `@given` loop seeded with `hypothesis.seed` (no database, generate phase only) --
    the public way to draw from a strategy outside a test; the configs then run outside hypothesis, so a failure is
    recorded instead of being shrunk."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from suites.test_config_fuzz import specs

    drawn: Dict[str, Any] = {}  # distinct specs in drawing order (different choices can draw the same spec)

    @hypothesis_seed(seed)
    @settings(max_examples=2 * count, database=None, deadline=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(specs().filter(lambda spec: not spec.unsupported))
    def collect(spec):
        drawn.setdefault(json.dumps(spec_record(spec), sort_keys=True), spec)

    collect()
    if len(drawn) < count:
        raise RuntimeError(f"hypothesis drew {len(drawn)} distinct supported specs, {count} asked")
    return list(drawn.values())[:count]


def spec_summary(spec) -> dict:
    """What a config is, in one line plus the fuzz's own feature tags (`_features`, its summary's vocabulary)."""
    from suites.test_config_fuzz import _features

    cfg = spec.config
    enc, proj, text = cfg["encoder_config"], cfg["projector_config"], cfg["text_config"]
    line = (f"enc L{enc['num_layers']} d{enc['hidden_dim']} h{enc['num_heads']}x{enc['dim_head']} "
            f"ctx{enc['context_size']} k{enc['conv_kernel_size']} | proj L{proj['num_hidden_layers']} "
            f"d{proj['hidden_size']} {proj['hidden_act']} eps{proj['layer_norm_eps']:g} w{cfg['window_size']}/"
            f"{cfg['downsample_rate']} | text L{text['num_hidden_layers']} d{text['hidden_size']} "
            f"h{text['num_attention_heads']}/{text['num_key_value_heads']} {text['hidden_act']} "
            f"eps{text['rms_norm_eps']:g} | frames {spec.frames}")
    return {"line": line, "features": _features(spec)}


def spec_record(spec) -> dict:
    """The spec as JSON: enough to rebuild the checkpoint (`write_checkpoint(folder, config, adapter, seed)`)."""
    return {"config": spec.config, "adapter": spec.adapter, "frames": spec.frames, "text_before": spec.text_before,
            "text_after": spec.text_after, "left_pad": spec.left_pad, "seed": spec.seed}


# ---------------------------------------------------------------------------------------------- one section
def section_inputs(spec, models) -> dict:
    """The model inputs `_model_section` takes, shaped as `pipeline._model_inputs` shapes a processor's batch."""
    from parity.granite.pipeline import _model_inputs
    from suites.test_config_fuzz import make_inputs

    ids, mask, features = make_inputs(spec.config, spec.frames, spec.text_before, spec.text_after, spec.left_pad,
                                      spec.seed)
    # the processor's input_features_mask marks the real projected audio embeddings of each clip; both rows' clips
    # have the same frame count here, so every placeholder of a row is real
    n_audio = int((ids[0] == spec.config["audio_token_index"]).sum())
    batch = {"input_ids": ids, "attention_mask": mask, "input_features": features,
             "input_features_mask": torch.ones(ids.size(0), n_audio, dtype=torch.bool)}
    return _model_inputs(batch, models)


def _reference_store():
    """A store that saves nothing and reads nothing."""
    from parity.store import ReferenceStore

    return ReferenceStore()


def run_section(spec, models, index: int):
    """(ParityResult, extra, title): `compare`'s model-section judgement, each side fed the same fuzz batch."""
    from parity.granite import pipeline
    from parity.granite.cases import Case

    case = Case(f"fuzz config {index}", lora_mode="merged")
    title = f"{case.name} · model"
    result, extra = pipeline._model_section(case, models, section_inputs(spec, models), section_inputs(spec, models),
                                            mode="teacher_forced", floors="on", detail=True, overrides=None,
                                            store=_reference_store(), title=title)
    return result, extra, title


# ---------------------------------------------------------------------------------------------- the rules
def _num(value) -> Optional[float]:
    """A JSON-safe float (non-finite as a string, the way reports write them)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def probe_brief(probe) -> dict:
    metrics = probe.propagated.metrics
    f64 = probe.float64
    f64_metrics = None if f64 is None else f64.metrics
    values = (probe.name, probe.status, probe.teacher.status, metrics and metrics.max_abs,
              metrics and metrics.tol_ratio, probe.noise_floor, probe.floor_ratio, probe.own_floor_ratio,
              None if f64 is None else f64.status, f64_metrics and f64_metrics.tol_ratio,
              f64_metrics and f64_metrics.max_abs, list(probe.missing_upcast), probe.suspect)
    return {k: (_num(v) if isinstance(v, float) else v) for k, v in zip(PROBE_FIELDS, values)}


def _largest(probes, attr: str) -> Optional[dict]:
    """{value, probe} of the largest `attr` over the probes that have one (NaN counts as largest)."""
    have = [(getattr(p, attr), p.name) for p in probes if getattr(p, attr) is not None]
    if not have:
        return None
    value, name = max(have, key=lambda vn: math.inf if math.isnan(vn[0]) else vn[0])
    return {"value": _num(value), "probe": name}


def _worst_formula(checked) -> Optional[dict]:
    """The float64 comparison with the largest tol_ratio (a non-pass status without numbers ranks first)."""
    def key(probe):
        m = probe.float64.metrics
        return math.inf if probe.float64.status != "pass" and m is None else (m.tol_ratio if m else -1.0)

    if not checked:
        return None
    worst = max(checked, key=key)
    m = worst.float64.metrics
    return {"probe": worst.name, "status": worst.float64.status, "tol_ratio": _num(m and m.tol_ratio),
            "max_abs": _num(m and m.max_abs)}


def judge(result, extra: dict, title: str) -> dict:
    """Each rule's outcome on one section, the engine's verdict, and the raw fields of every probe a rule flagged."""
    from parity.diff import FLOOR_FACTOR, FLOOR_GATE
    from parity.report import build_report

    probes = result.probes
    above = [p for p in probes if any(r is not None and not r <= FLOOR_FACTOR
                                      for r in (p.floor_ratio, p.own_floor_ratio))]
    checked = [p for p in probes if p.float64 is not None]
    formula = [p for p in checked if p.float64.status != "pass"]
    upcast = {p.name: list(p.missing_upcast) for p in probes if p.missing_upcast}
    gate = [p for p in probes if p.status != "pass"]
    teacher = [p for p in probes if p.teacher.status not in ("pass", "not_applicable", "not_run")]
    flagged = {p.name: p for p in above + formula + gate + teacher + [p for p in probes if p.missing_upcast]}
    summary = build_report(result, section=title, extra=extra)["summary"]
    return {
        "verdict": summary["verdict"], "suspects": summary.get("suspects"), "probes": len(probes),
        "floors": extra.get("floors"), "float64": extra.get("float64"), "not_run": extra.get("not_run", []),
        "max_floor_ratio": _largest(probes, "floor_ratio"), "max_own_floor_ratio": _largest(probes, "own_floor_ratio"),
        "above_floor": [p.name for p in above],
        "formula_checked": len(checked), "formula_worst": _worst_formula(checked),
        "formula_failures": [p.name for p in formula],
        "upcast_audit": "upcast_audit" in extra, "missing_upcasts": upcast,
        "gate_failures": [p.name for p in gate], "teacher_failures": [p.name for p in teacher],
        # 16-bit gate failures whose largest error is within FLOOR_GATE x the probe's whole-tensor floor: the
        # tensor-level floor gate passed them; a per-row floor gate is what fails them
        "gate_within_tensor_floor": [p.name for p in gate if p.noise_floor is not None and p.propagated.metrics
                                     and p.propagated.metrics.max_abs <= FLOOR_GATE * p.noise_floor],
        "flagged_probes": [probe_brief(p) for p in flagged.values()],
    }


# ---------------------------------------------------------------------------------------------- one config
def run_config(index: int, spec, dtypes: Sequence[str]) -> List[dict]:
    """One record per dtype: the checkpoint written once, then each dtype judged through one `Models` store."""
    from parity.granite.models import Models
    from suites.test_config_fuzz import write_checkpoint

    base_record = {"index": index, **spec_summary(spec), "spec": spec_record(spec)}
    records = []
    with tempfile.TemporaryDirectory(prefix="fp-fuzz-") as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        write_checkpoint(folder, spec.config, spec.adapter, spec.seed)
        # one store for every dtype, as `compare` shares its models between its fp32 and its bf16 case (the
        # float64 HF copy, the formula check's reference, is whatever `Models` makes for each dtype there)
        base = Models(Path(folder), torch.float32, torch.device("cpu"))
        setup_s = time.perf_counter() - start
        for name in dtypes:
            dtype = getattr(torch, name)
            models = base if dtype == torch.float32 else base.at(dtype)
            start = time.perf_counter()
            try:
                result, extra, title = run_section(spec, models, index)
                outcome = judge(result, extra, title)
            except Exception as err:  # noqa: BLE001 - a config the harness cannot run is recorded, not fatal
                outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
            records.append({**base_record, "dtype": name, "setup_s": round(setup_s, 3),
                            "seconds": round(time.perf_counter() - start, 3), **outcome})
    messages = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    for record in records:
        record["warnings"] = messages[:5]
    return records


def _error_records(index: int, spec, dtypes: Sequence[str], err: BaseException) -> List[dict]:
    outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
    return [{"index": index, **spec_summary(spec), "spec": spec_record(spec), "dtype": name, **outcome}
            for name in dtypes]


# ---------------------------------------------------------------------------------------------- the summary
def _largest_anywhere(done: List[dict]) -> Optional[dict]:
    """The largest floor ratio (propagated or own) over every config of a dtype, with its probe and config."""
    seen = [(r[key]["value"], r[key]["probe"], r["index"], key) for r in done
            for key in ("max_floor_ratio", "max_own_floor_ratio") if r.get(key)]
    if not seen:
        return None
    value, probe, index, key = max(seen, key=lambda s: math.inf if isinstance(s[0], str) else s[0])
    return {"value": value, "probe": probe, "config": index, "which": key.removeprefix("max_")}


def _rule_probes(record: dict) -> List[str]:
    """'rule: probe' for every probe a rule flagged in one record."""
    lists = {"floor": record["above_floor"], "formula": record["formula_failures"],
             "upcast": list(record["missing_upcasts"]), "gate": record["gate_failures"],
             "own": record["teacher_failures"]}
    return [f"{rule}: {probe}" for rule, probes in lists.items() for probe in probes]


def _gate_by_status(record: dict, status: str) -> List[str]:
    """The gate failures of one record whose propagated status is `status` (missing: the probe ran on no side)."""
    return [p["name"] for p in record["flagged_probes"]
            if p["name"] in record["gate_failures"] and p["status"] == status]


def summarize(records: List[dict], dtypes: Sequence[str]) -> List[dict]:
    """Per dtype: configs run, and how many configs each rule (and the engine's verdict) failed."""
    rows = []
    for name in dtypes:
        mine = [r for r in records if r["dtype"] == name]
        done = [r for r in mine if "error" not in r]
        rows.append({
            "dtype": name, "configs": len(mine), "errors": len(mine) - len(done),
            "above_floor": sum(1 for r in done if r["above_floor"]), "largest_ratio": _largest_anywhere(done),
            "formula_ran": sum(1 for r in done if r["formula_checked"]),
            "formula_failures": sum(1 for r in done if r["formula_failures"]),
            "upcast_audited": sum(1 for r in done if r["upcast_audit"]),
            "missing_upcasts": sum(1 for r in done if r["missing_upcasts"]),
            "gate_failures": sum(1 for r in done if r["gate_failures"]),
            "gate_missing_probe": sum(1 for r in done if _gate_by_status(r, "missing")),
            "gate_numeric": sum(1 for r in done if _gate_by_status(r, "fail")),
            "gate_numeric_within_tensor_floor": sum(1 for r in done if _gate_by_status(r, "fail") and set(
                _gate_by_status(r, "fail")) <= set(r["gate_within_tensor_floor"])),
            "teacher_failures": sum(1 for r in done if r["teacher_failures"]),
            "verdict_fail": sum(1 for r in done if r["verdict"] != "pass"),
            "verdicts": dict(Counter(r["verdict"] for r in done)),
            "seconds_per_config": round(sum(r["seconds"] for r in done) / max(len(done), 1), 2),
            # which probes the rules flag, counted over configs: a probe table or a rule at fault shows up here
            "flagged": dict(Counter(p for r in done for p in _rule_probes(r)).most_common(12)),
        })
    return rows


def print_table(rows: List[dict], setup_s: float, floor_gate: float) -> None:
    head = ("dtype", "configs", "errors", ">8x floor", "largest ratio (probe, config)", "formula fail/ran",
            "missing upcast/audited", "gate fail", "teacher fail", "verdict fail", "s/config")
    lines = [head]
    for row in rows:
        big = row["largest_ratio"]
        ratio = "-" if big is None else (f"{big['value'] if isinstance(big['value'], str) else round(big['value'], 2)}"
                                         f" {big['which']} ({big['probe']}, #{big['config']})")
        lines.append((row["dtype"], row["configs"], row["errors"], row["above_floor"], ratio,
                      f"{row['formula_failures']}/{row['formula_ran']}",
                      f"{row['missing_upcasts']}/{row['upcast_audited']}", row["gate_failures"],
                      row["teacher_failures"], row["verdict_fail"], row["seconds_per_config"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    print(f"checkpoint writing: {setup_s:.2f} s per config (not in s/config)")
    for row in rows:
        flagged = ", ".join(f"{name} x{n}" for name, n in list(row["flagged"].items())[:6]) or "none"
        print(f"{row['dtype']}: most flagged (rule: probe x configs): {flagged}")
        print(f"{row['dtype']}: gate failures: {row['gate_missing_probe']} configs with a probe missing on both "
              f"sides, {row['gate_numeric']} with numbers outside the gate, {row['gate_numeric_within_tensor_floor']} "
              f"of them each within {floor_gate:g}x its whole-tensor floor; verdicts {row['verdicts']}")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m suites.bench.false_positives", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=int, default=200, help="fuzzed supported configs (default 200)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the drawn configs (default 0)")
    parser.add_argument("--json", type=Path, help="write every record and the summary here")
    return parser.parse_args(argv)


def _quiet() -> None:
    """One thread (the machine is shared, and the fuzz test runs the same way) and no progress bars."""
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from parity.diff import FLOOR_FACTOR, FLOOR_GATE
    from parity.report import run_metadata

    args = parse_args(argv)
    _quiet()
    import parity.granite.pipeline  # noqa: F401  (the engine, imported now: the digest names the code that runs)

    digest = code_digest()
    start = time.perf_counter()
    specs = draw_specs(args.configs, args.seed)
    records: List[dict] = []
    for index, spec in enumerate(specs):
        try:
            got = run_config(index, spec, args.dtypes)
        except Exception as err:  # noqa: BLE001 - writing or loading the checkpoint failed: recorded per dtype
            got = _error_records(index, spec, args.dtypes, err)
        records.extend(got)
        print(f"[{index + 1}/{len(specs)}] " + "; ".join(
            f"{r['dtype']}: " + (r["error"][:80] if "error" in r else
                                 f"{r['verdict']} max ratio {(r['max_floor_ratio'] or {}).get('value')}"
                                 f"/{(r['max_own_floor_ratio'] or {}).get('value')}") for r in got), flush=True)
    rows = summarize(records, args.dtypes)
    setups = [r["setup_s"] for r in records if "setup_s" in r]
    setup_s = sum(setups) / max(len(setups), 1)
    print_table(rows, setup_s, FLOOR_GATE)
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s for {len(specs)} configs x {len(args.dtypes)} dtypes")
    if args.json:
        import hypothesis

        meta = run_metadata(device="cpu", dtype=" ".join(args.dtypes), seed=args.seed, mode="teacher_forced",
                            machine=f"{torch.get_num_threads()} thread on a {_cores()}-core CPU",
                            hypothesis=hypothesis.__version__, wall_s=round(wall, 1),
                            setup_s_per_config=round(setup_s, 3), configs=args.configs, code_sha256=digest,
                            floor_factor=FLOOR_FACTOR, floor_gate=FLOOR_GATE)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "summary": rows, "records": records}, indent=1,
                                        allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def code_digest() -> str:
    """sha256 over the engine's and the port's sources as this run imported them: the verdict code is changing, so
    a result names the code it measured (beside the git commit, which says only "+dirty")."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("parity/**/*.py"), *root.glob("granite_speech/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    raise SystemExit(main())
