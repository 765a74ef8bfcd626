"""Judge captures: per-probe metrics, a status, the first divergence, and own-vs-inherited attribution.

Returns plain dataclasses (no printing). Statuses are distinct so a report can say *what* went wrong:
    pass, fail (numbers outside tolerance), nonfinite (NaN/Inf where the other side is finite or differently so),
    shape_mismatch, dtype_mismatch (numbers still measured after upcasting), missing (path did not resolve or the
    module never ran), capture_error (the take / adapter / validity mask could not be applied, or a teacher re-run
    failed), empty (no element was compared: all masked out or non-finite on both sides -- never a pass), raised
    (the side's forward, or the stage computing the value, raised: recorded on the innermost probe running),
    not_applicable / not_run (teacher-forced column only).
All arithmetic is float64, on the run's card where it has room (`Workspace`), else on the host. The reference is
HF: relative error and the tolerance bound use |hf|.

Localisation is a second, sharper judgement beside the pass/fail gate: given the captures of a reference run that
differs only in rounding (e.g. HF in float64), each probe gets a measured noise floor, and an error far above it
(`floor_factor` times) marks the probe `suspect` even inside tolerance. The first divergence is then the first probe
that fails *or* stands far above its floor, so a fault cannot hide under a tolerance that is loose for its scale.
"""

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from parity.adapters import build_adapter
from parity.capture import PairCaptures, teacher_output_key, value_key
from parity.probes import Probe
from parity.tolerances import _FLOAT_FORMATS, EXACT, Tolerance, dtype_name, tolerance_for, ulp
from parity.verdict import FLOOR_FACTOR, PASS, SHARP_RULES, Policy, probe_rules, section_verdict

__all__ = ["Status", "Metrics", "Comparison", "ProbeResult", "ParityResult", "compare", "diff_captures",
           "near_tie_flips", "tolerance_for"]


class Status:
    PASS = "pass"
    FAIL = "fail"
    NONFINITE = "nonfinite"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    MISSING = "missing"
    CAPTURE_ERROR = "capture_error"
    NOT_APPLICABLE = "not_applicable"
    NOT_RUN = "not_run"
    EMPTY = "empty"
    RAISED = "raised"  # the side's forward raised inside this probe's module (capture with on_raise="record")

    ALL = (PASS, FAIL, NONFINITE, SHAPE_MISMATCH, DTYPE_MISMATCH, MISSING, CAPTURE_ERROR, NOT_APPLICABLE, NOT_RUN,
           EMPTY, RAISED)
    # teacher-forced statuses that say nothing about the module's own error
    NO_VERDICT = (NOT_APPLICABLE, NOT_RUN)


def _float_out(value: float):
    return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _float_in(value) -> float:
    return float(value)  # float("inf") / float("nan") parse the string forms


@dataclass
class Metrics:
    numel: int  # elements compared (finite on both sides)
    max_abs: float
    mean_abs: float
    max_rel: float  # max |fms - hf| / |hf| over elements with hf != 0
    cosine: float  # of the flattened tensors
    sqnr_db: float  # 10 log10(sum hf^2 / sum (fms - hf)^2); inf when identical
    outside_count: int
    outside_fraction: float  # share of elements outside the tolerance bound
    min_atol: float  # the smallest atol that passes at this tolerance's rtol / ulps / allowed fraction
    tol_ratio: float  # |fms - hf| / (atol + rtol |hf| + ulps ulp) at the worst (allowed-fraction) element; <= 1 passes
    ref_absmax: float
    worst_index: List[int]  # where |fms - hf| is largest
    worst_hf: float
    worst_fms: float
    nonfinite_hf: int = 0
    nonfinite_fms: int = 0
    masked_out: int = 0  # elements excluded by the probe's validity mask

    def to_dict(self) -> dict:
        # field by field, not dataclasses.asdict, whose deep copy of every value made one pass over a 2b-deep
        # compare's 2,432 probe records take 0.75 s instead of 0.11 s (three passes per run)
        data = {name: getattr(self, name) for name in _field_names(Metrics)}
        data["worst_index"] = list(self.worst_index)
        return {k: (_float_out(v) if isinstance(v, float) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Metrics":
        floats = {f.name for f in fields(cls) if f.type in (float, "float")}
        return cls(**{k: (_float_in(v) if k in floats else v) for k, v in data.items()})


@dataclass
class Comparison:
    status: str
    detail: str = ""
    metrics: Optional[Metrics] = None
    hf_shape: Optional[List[int]] = None
    fms_shape: Optional[List[int]] = None
    hf_dtype: Optional[str] = None
    fms_dtype: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.status == Status.PASS

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in _field_names(Comparison)}
        data.update(metrics=None if self.metrics is None else self.metrics.to_dict(),
                    hf_shape=None if self.hf_shape is None else list(self.hf_shape),
                    fms_shape=None if self.fms_shape is None else list(self.fms_shape))
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "Comparison":
        data = dict(data)
        data["metrics"] = None if data.get("metrics") is None else Metrics.from_dict(data["metrics"])
        return cls(**data)


@dataclass
class ProbeResult:
    index: int  # row in the probe table
    name: str
    hf_path: str  # the path actually hooked (or the declared one when it did not resolve)
    fms_path: str
    hf_take: str
    fms_take: str
    hf_adapter: str
    fms_adapter: str
    tolerance_class: str
    tolerance: Tolerance
    order: Optional[int]  # execution rank (HF hook firing order; FMS when HF did not fire)
    calls_hf: int
    calls_fms: int
    propagated: Comparison
    teacher: Comparison
    attribution: str  # ok | inherited | own | unknown
    note: str = ""
    noise_floor: Optional[float] = None  # max |reference - rounding-only reference| (None: not measured)
    floor_ratio: Optional[float] = None  # propagated max_abs / effective floor
    own_floor_ratio: Optional[float] = None  # teacher-forced (own) max_abs / effective floor
    suspect: bool = False  # inside tolerance but far above the floor, or failing the float64 formula check
    valid: str = ""  # validity mask applied
    float64: Optional[Comparison] = None  # both sides in float64 on the same inputs (None: not run)
    missing_upcast: List[str] = field(default_factory=list)  # sensitive ops FMS runs in 16 bits here and HF not

    @property
    def status(self) -> str:
        return self.propagated.status

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in _field_names(ProbeResult)}
        data.update(missing_upcast=list(self.missing_upcast), tolerance=self.tolerance.to_dict(),
                    propagated=self.propagated.to_dict(), teacher=self.teacher.to_dict(),
                    float64=None if self.float64 is None else self.float64.to_dict())
        for name in ("noise_floor", "floor_ratio", "own_floor_ratio"):
            if isinstance(data[name], float):
                data[name] = _float_out(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "ProbeResult":
        data = dict(data)
        for name in ("noise_floor", "floor_ratio", "own_floor_ratio"):
            if data.get(name) is not None:
                data[name] = _float_in(data[name])
        data.update(tolerance=Tolerance.from_dict(data["tolerance"]),
                    propagated=Comparison.from_dict(data["propagated"]), teacher=Comparison.from_dict(data["teacher"]),
                    float64=None if data.get("float64") is None else Comparison.from_dict(data["float64"]))
        return cls(**data)


@dataclass
class ParityResult:
    mode: str
    probes: List[ProbeResult]
    first_divergence: Optional[str]  # name of the earliest probe (execution order) whose status is not pass
    first_own_error: Optional[str]  # teacher-forced: earliest probe whose own (teacher-forced) comparison fails
    plan: dict = field(default_factory=dict)
    first_suspect: Optional[str] = None  # earliest probe inside tolerance but broken by a sharp rule
    lenient: bool = False  # sharp rules (floor, formula, upcast) mark suspects instead of failing (--lenient)
    floor_factor: Optional[float] = None  # None: no floors measured

    @property
    def policy(self) -> Policy:
        return Policy(lenient=self.lenient, floor_factor=self.floor_factor or FLOOR_FACTOR)

    @property
    def passed(self) -> bool:
        return section_verdict([p.to_dict() for p in self.probes], self.policy)["verdict"] == PASS

    def probe(self, name: str) -> ProbeResult:
        for result in self.probes:
            if result.name == name:
                return result
        raise KeyError(f"no probe named {name!r}; have {[p.name for p in self.probes][:8]}...")

    def status_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for result in self.probes:
            counts[result.status] = counts.get(result.status, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {"mode": self.mode, "first_divergence": self.first_divergence, "first_own_error": self.first_own_error,
                "first_suspect": self.first_suspect, "lenient": self.lenient, "floor_factor": self.floor_factor,
                "plan": self.plan, "probes": [p.to_dict() for p in self.probes]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ParityResult":
        return cls(mode=data["mode"], probes=[ProbeResult.from_dict(p) for p in data["probes"]],
                   first_divergence=data["first_divergence"], first_own_error=data["first_own_error"],
                   plan=dict(data.get("plan") or {}), first_suspect=data.get("first_suspect"),
                   lenient=_lenient(data), floor_factor=data.get("floor_factor"))


def _lenient(data: Mapping) -> bool:
    """Reports written before the sharp rules failed by default carry `strict` (suspects failed only with it)."""
    if "lenient" in data:
        return bool(data["lenient"])
    return "strict" in data and not data["strict"]


# ---------------------------------------------------------------------------------------------------------------
# comparing two tensors


def _dtype_str(t: torch.Tensor) -> str:
    return dtype_name(t.dtype)


def _bound_slack(ref_abs: torch.Tensor, tol: Tolerance, ulp_dtype: Optional[str]) -> torch.Tensor:
    """rtol * |hf| + ulps * ulp(|hf|): the part of the bound that scales with the reference."""
    slack = tol.rtol * ref_abs
    if tol.ulps and ulp_dtype in _FLOAT_FORMATS:
        slack = slack + tol.ulps * ulp(ref_abs, ulp_dtype)
    return slack


@dataclass(frozen=True)
class Workspace:
    """Where the float64 metrics are computed: the run's card when it has room for a tensor's float64 temporaries,
    else the host. A 2b float32 run judges ~7,300 tensors (up to 50M values each): 58 s on 16 host cores, 27 s with
    the card (an H100, results/gpu-h100-2026-12-07b). Reductions may sum in another order there (1e-16 relative);
    maxima, counts and verdicts are the same (`test_metrics_on_the_card_equal_the_hosts`)."""

    device: torch.device = torch.device("cpu")
    max_values: int = 0  # tensors up to this size go to `device`

    def of(self, numel: int) -> torch.device:
        return self.device if numel <= self.max_values else torch.device("cpu")

    @classmethod
    def for_run(cls, device: Union[torch.device, str]) -> "Workspace":
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return HOST
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return cls(device, free // (8 * 32))  # float64; `compare` holds about a dozen temporaries, twice that spare


HOST = Workspace()


def _f64(tensor: torch.Tensor, where: torch.device) -> torch.Tensor:
    return tensor.detach().to(where, torch.float64)


def _expand_valid(valid: torch.Tensor, shape: torch.Size, where: torch.device = torch.device("cpu")) -> torch.Tensor:
    """A validity mask over the leading dims of `shape`, broadcast to the full shape."""
    valid = valid.detach().to(where).bool()
    if tuple(valid.shape) != tuple(shape[: valid.dim()]):
        raise ValueError(f"validity mask of shape {list(valid.shape)} does not cover the leading dims of {list(shape)}")
    return valid.reshape(*valid.shape, *([1] * (len(shape) - valid.dim()))).expand(shape)


def compare(hf: torch.Tensor, fms: torch.Tensor, tol: Tolerance, *, ulp_dtype: Optional[str] = None,
            valid: Optional[torch.Tensor] = None, work: Workspace = HOST) -> Comparison:
    """Measure fms against the reference hf and judge it with `tol`. `ulp_dtype` (default: hf's dtype) sizes the
    tolerance's ulp term; `valid` (bool, over the leading dims) excludes positions that are undefined on both sides
    (e.g. padding). Nothing compared is never a pass. Integer and boolean tensors (ids, lengths, masks, text bytes)
    compare exactly whatever `tol` says."""
    if not (hf.is_floating_point() or hf.is_complex()) and not (fms.is_floating_point() or fms.is_complex()):
        tol = EXACT
    shapes = dict(hf_shape=list(hf.shape), fms_shape=list(fms.shape), hf_dtype=_dtype_str(hf), fms_dtype=_dtype_str(fms))
    if hf.shape != fms.shape:
        return Comparison(Status.SHAPE_MISMATCH, f"shape {list(fms.shape)} (FMS) != {list(hf.shape)} (HF)", **shapes)
    ulp_dtype = ulp_dtype or _dtype_str(hf)
    where = work.of(hf.numel())
    a, b = _f64(fms, where).reshape(-1), _f64(hf, where).reshape(-1)
    in_mask = None
    if valid is not None:
        try:
            in_mask = _expand_valid(valid, hf.shape, where).reshape(-1)
        except ValueError as err:
            return Comparison(Status.CAPTURE_ERROR, str(err), **shapes)
    finite, (masked_out, nonfinite_hf, nonfinite_fms, n), patterns_differ = _compared_elements(a, b, in_mask)
    metrics = _metrics(a, b, finite, n, tol, ulp_dtype, hf.shape)
    metrics.nonfinite_hf, metrics.nonfinite_fms, metrics.masked_out = nonfinite_hf, nonfinite_fms, masked_out
    if metrics.numel == 0:
        why = (f"all {masked_out} elements masked out" if masked_out == a.numel() and masked_out
               else f"no finite element on both sides ({nonfinite_hf} HF / {nonfinite_fms} FMS non-finite, "
                    f"{masked_out} masked out)" if a.numel() else "empty tensors")
        return Comparison(Status.EMPTY, f"nothing compared: {why}", metrics, **shapes)
    allowed = math.floor(tol.max_outside_fraction * metrics.numel)
    numbers_pass = metrics.outside_count <= allowed
    numeric = (f"{metrics.outside_count} of {metrics.numel} elements outside atol={tol.atol:g} rtol={tol.rtol:g}"
               + (f" +{tol.ulps:g} ulp({ulp_dtype})" if tol.ulps else "") + f"; needs atol >= {metrics.min_atol:.3g}")
    details = [numeric]
    status = Status.PASS if numbers_pass else Status.FAIL
    if patterns_differ:
        status = Status.NONFINITE
        details.insert(0, f"non-finite values differ: HF has {nonfinite_hf}, FMS has {nonfinite_fms} NaN/Inf")
    elif nonfinite_hf:
        details.append(f"both sides have the same {nonfinite_hf} NaN/Inf; compared the finite elements")
    if hf.dtype != fms.dtype:
        status = Status.DTYPE_MISMATCH
        details.insert(0, f"dtype {_dtype_str(fms)} (FMS) != {_dtype_str(hf)} (HF); numbers compared in float64")
    return Comparison(status, "; ".join(details), metrics, **shapes)


def _compared_elements(a: torch.Tensor, b: torch.Tensor, in_mask: Optional[torch.Tensor]
                       ) -> Tuple[Optional[torch.Tensor], Tuple[int, int, int, int], bool]:
    """(the elements compared: a bool mask, or None for every one; (masked out, HF non-finite, FMS non-finite,
    compared) counts; whether the non-finite patterns differ), in one host sync (a CUDA run judges ~7,300 tensors:
    each sync costs more than its arithmetic). The usual case (no mask, all finite) reads back two sums only: they
    are finite only when every element is (a sum that overflows takes the element-wise path)."""
    if in_mask is None and all(math.isfinite(v) for v in torch.stack([a.sum(), b.sum()]).tolist()):
        return None, (0, 0, 0, a.numel()), False
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    finite = finite_a & finite_b
    outside = finite.new_zeros(()) if in_mask is None else ~in_mask
    if in_mask is not None:
        finite &= in_mask
        finite_a, finite_b = finite_a | outside, finite_b | outside  # outside the mask counts as nothing
    counts = tuple(int(v) for v in torch.stack([
        outside.sum(), (~finite_b).sum(), (~finite_a).sum(), finite.sum()]).tolist())
    patterns_differ = False
    if counts[1] or counts[2]:  # patterns can differ only where something is non-finite
        differ = _nonfinite_patterns_differ(a, b)
        patterns_differ = bool((differ if in_mask is None else differ & in_mask).any())
    return finite, counts, patterns_differ


def _nonfinite_patterns_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: NaN on one side only, Inf on one side only, or Infs of opposite sign."""
    inf_a = torch.isinf(a)
    return (torch.isnan(a) != torch.isnan(b)) | (inf_a != torch.isinf(b)) | (inf_a & (a != b))


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.max() if k == 1 else torch.topk(values, k).values[-1]  # k = 1 by default: max is ~10x faster


def _metrics(a, b, finite: Optional[torch.Tensor], n: int, tol: Tolerance, ulp_dtype: str, shape) -> Metrics:
    """Metrics over the elements where `finite` (n of them; None: every one; a and b flat float64), read back in one
    host sync."""
    if n == 0:
        return Metrics(0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, 0.0, 0.0, 0.0, 0.0, [], 0.0, 0.0)
    every = n == a.numel()  # nothing masked or non-finite (the usual case): no element needs excluding
    if not every:
        a, b = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)
    diff, ref_abs = (a - b).abs(), b.abs()
    slack = _bound_slack(ref_abs, tol, ulp_dtype)
    excess = diff - slack if every else torch.where(finite, diff - slack, -math.inf)  # passes iff excess <= atol
    allowed = math.floor(tol.max_outside_fraction * n)
    zero = diff.new_zeros(())
    min_atol = _kth_largest(excess, allowed + 1).clamp_min(0.0) if allowed < n else zero
    bound = tol.atol + slack
    if tol.atol > 1e-300:  # the bound is positive everywhere
        ratio = diff / bound
    else:
        ratio = torch.where(bound > 0, diff / bound.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
    tol_ratio = (_kth_largest(ratio if every else torch.where(finite, ratio, -math.inf), allowed + 1)
                 if allowed < n else zero)
    nonzero = ref_abs > 0 if every else finite & (ref_abs > 0)
    rel = torch.where(nonzero, diff / torch.where(nonzero, ref_abs, 1.0), 0.0)
    worst = (diff if every else torch.where(finite, diff, -1.0)).argmax()  # the first largest |fms - hf| compared
    (max_abs, sum_abs, max_rel, any_nonzero, norm_a, norm_b, dot, noise, signal, outside, min_atol, tol_ratio,
     ref_absmax, worst, worst_hf, worst_fms) = torch.stack([
        diff.max(), diff.sum(), rel.max(), nonzero.any(), a.norm(), b.norm(), torch.dot(a, b), (diff * diff).sum(),
        (b * b).sum(), (excess > tol.atol).sum(), min_atol, tol_ratio, ref_abs.max(), worst, b.take(worst),
        a.take(worst),
    ]).tolist()
    if not any_nonzero:
        max_rel = 0.0 if max_abs == 0 else math.inf
    if norm_a == 0 and norm_b == 0:
        cosine = 1.0
    elif norm_a == 0 or norm_b == 0:
        cosine = 0.0
    else:
        cosine = dot / (norm_a * norm_b)
    sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10.0 * math.log10(signal / noise))
    outside = int(outside)
    return Metrics(
        numel=n, max_abs=max_abs, mean_abs=sum_abs / n, max_rel=max_rel, cosine=cosine, sqnr_db=sqnr,
        outside_count=outside, outside_fraction=outside / n, min_atol=min_atol, tol_ratio=tol_ratio,
        ref_absmax=ref_absmax, worst_index=_unravel(int(worst), shape), worst_hf=worst_hf, worst_fms=worst_fms,
    )


def _unravel(flat: int, shape) -> List[int]:
    index = []
    for size in reversed(tuple(shape)):
        flat, i = divmod(flat, size)
        index.append(i)
    return index[::-1]


# ---------------------------------------------------------------------------------------------------------------
# judging a capture pair


def _side_value(captures, key: str, side: str, adapter_spec: str) -> Tuple[Optional[torch.Tensor], Optional[Comparison]]:
    """(adapted tensor, None) or (None, a Comparison saying why there is no value)."""
    error, kind = captures.error(key), captures.error_kind(key)
    if error:
        status = {"unresolved": Status.MISSING, "teacher_shape": Status.SHAPE_MISMATCH,
                  "raised": Status.RAISED}.get(kind, Status.CAPTURE_ERROR)
        return None, Comparison(status, f"{side}: {error}")
    tensor = captures.get(key)
    if tensor is None:
        return None, Comparison(Status.MISSING, f"{side}: the module never ran (no hook call recorded)")
    try:
        return build_adapter(adapter_spec)(tensor), None
    except Exception as err:  # noqa: BLE001 - any adapter failure is reported on the probe
        return None, Comparison(Status.CAPTURE_ERROR, f"{side}: adapter {adapter_spec!r} failed: {err}")


def _compare_keys(hf_caps, fms_caps, hf_key, fms_key, probe: Probe, tol: Tolerance, ulp_dtype, valid=None,
                  fms_adapter: Optional[str] = None, work: Workspace = HOST) -> Comparison:
    hf_value, hf_problem = _side_value(hf_caps, hf_key, "HF", probe.hf_adapter)
    fms_value, fms_problem = _side_value(fms_caps, fms_key, "FMS", probe.fms_adapter if fms_adapter is None
                                         else fms_adapter)
    if hf_problem or fms_problem:
        problems = [p for p in (hf_problem, fms_problem) if p]
        # a missing side outranks a capture error: it is the more basic fault
        status = Status.MISSING if any(p.status == Status.MISSING for p in problems) else problems[0].status
        return Comparison(status, "; ".join(p.detail for p in problems))
    return compare(hf_value, fms_value, tol, ulp_dtype=ulp_dtype, valid=valid, work=work)


# 16-bit runs: two correct implementations each round to the dtype, so FMS and HF differ by a few times the
# reference's own rounding error (HF in the run dtype against HF in float64, from the same 16-bit weights). Where
# that floor was measured, an element outside the dtype table still passes within `floor_gate` times it: for a
# module's own (teacher-forced) error the floor of the element's own row (the last dim: one token's hidden state;
# floored at the median row's, `row_floors`), so a single badly wrong element fails where it is computed; for the
# propagated error, which compounds every upstream rounding difference, the largest row floor. Measured on correct
# bf16 ports (200 fuzzed configs, CPU, results/verdict/): own errors need at most 2.6x their row's floor, propagated
# ones up to 9.6x a row's but 4.9x the largest; 8 is the floor rule's own factor. The per-tensor gate this replaces
# passed every element under 2x the largest rounding error, own errors included. float32 keeps its documented gate.
FLOOR_GATE = 8.0
FLOOR_GATED_DTYPES = ("bfloat16", "float16")
# a greedy flip is a near tie when HF's own margin between the two tokens is within this many times HF's own rounding
# error in that step's logits row: the flips of compare's bf16 case (tiny, CPU) stand at 0.46x at most
NEAR_TIE_FACTOR = 2.0


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)


def row_floors(hf: torch.Tensor, hf64: torch.Tensor, run_dtype: str,
               valid: Optional[torch.Tensor] = None, work: Workspace = HOST) -> torch.Tensor:
    """Per row (all dims but the last), HF's own rounding error max |hf - hf64|, never below one ulp of the run
    dtype at the row's largest |hf| nor below the median (valid) row's: one row's floor is a single draw of the
    rounding noise, and a row HF happened to round well must not turn the other side's ordinary rounding into a
    fault (measured: correct bf16 ports over fuzzed configs, results/verdict/)."""
    where = work.of(hf.numel())
    b, c = _rows(_f64(hf, where)), _rows(_f64(hf64, where))
    spread = torch.where(torch.isfinite(b) & torch.isfinite(c), (b - c).abs(), 0.0).amax(dim=-1)
    absmax = torch.where(torch.isfinite(b), b.abs(), 0.0).amax(dim=-1)
    floors = torch.maximum(spread, ulp(absmax, run_dtype)) if run_dtype in _FLOAT_FORMATS else spread
    judged = (_rows(_expand_valid(valid, hf.shape, where)).any(dim=-1) if valid is not None
              else torch.ones_like(spread, dtype=bool))
    return floors.clamp_min(float(floors[judged].median())) if bool(judged.any()) else floors


def apply_row_floor_gate(comparison: Comparison, hf: torch.Tensor, fms: torch.Tensor, floors: torch.Tensor,
                         tol: Tolerance, run_dtype: str, factor: float, valid: Optional[torch.Tensor], where: str) -> None:
    """Turn a 16-bit FAIL into PASS when every element outside the table is within `factor` x `floors` (one per
    row); `where` says which floor that is. The detail always says how many times the floor the worst one needs."""
    if comparison.status != Status.FAIL or comparison.metrics is None or hf.shape != fms.shape:
        return
    a, b = _rows(_f64(fms, floors.device)), _rows(_f64(hf, floors.device))
    judged = torch.isfinite(a) & torch.isfinite(b)
    if valid is not None:
        judged &= _rows(_expand_valid(valid, hf.shape, floors.device))
    diff = (a - b).abs()
    outside_table = judged & (diff > tol.atol + _bound_slack(b.abs(), tol, run_dtype))
    needed = float(torch.where(outside_table, diff / floors[:, None].clamp_min(1e-300), 0.0).max())
    comparison.detail += f"; needs {needed:.3g} x HF's own rounding error ({where})"
    if int((outside_table & (diff > factor * floors[:, None])).sum()) <= math.floor(
            tol.max_outside_fraction * comparison.metrics.numel):
        comparison.status = Status.PASS
        comparison.detail += (f"; passes the measured 16-bit gate: every element outside the table is within "
                              f"{factor:g} x HF's own rounding error ({where}; HF vs HF float64)")


def _effective_floor(floor: float, ref_absmax: float, run_dtype: str) -> float:
    """The measured floor, never below one ulp of the run dtype at the probe's scale (a floor of exactly 0 would
    make any rounding difference look infinite)."""
    if run_dtype not in _FLOAT_FORMATS:
        return floor
    return max(floor, float(ulp(torch.tensor([ref_absmax]), run_dtype)[0]))


# a teacher-forced comparison with one of these statuses is the module's own numeric error
_OWN_ERROR = (Status.FAIL, Status.NONFINITE, Status.DTYPE_MISMATCH)


def _attribution(propagated: Comparison, teacher: Comparison) -> str:
    own_fail = teacher.status in _OWN_ERROR
    if propagated.passed:
        return "own" if own_fail else "ok"
    if teacher.passed:
        return "inherited"
    return "own" if own_fail else "unknown"


def diff_captures(
    pair: PairCaptures,
    *,
    probes: Optional[Sequence[Probe]] = None,
    dtype: Union[torch.dtype, str, None] = None,
    device: Union[torch.device, str] = "cpu",
    table: Optional[Mapping] = None,
    overrides: Optional[Mapping[str, float]] = None,
    tolerances: Optional[Mapping[str, Tolerance]] = None,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    floors=None,
    candidate64=None,
    upcasts: Optional[Mapping[str, Sequence[str]]] = None,
    floor_factor: float = FLOOR_FACTOR,
    floor_gate: float = FLOOR_GATE,
    lenient: bool = False,
) -> ParityResult:
    """Judge every probe of `pair`. Tolerances: `tolerances[tolerance_class]` when given, else the table entry for
    (`dtype` or the HF capture's dtype, `device`) with `overrides` applied. `masks` maps a probe's `valid` name to
    its validity mask. `floors` are the captures of a reference run differing only in rounding (e.g. HF in float64):
    they give each probe its noise floor, and errors `floor_factor` times above it fail the probe (only mark it
    suspect when `lenient`); in 16-bit runs an element within `floor_gate` times HF's own rounding error passes
    (FLOOR_GATE: its row's for the teacher-forced column, the largest row's for the propagated one).
    `candidate64` are the FMS captures in float64 on the same inputs: the probes it hooked are judged against
    `floors` with the float64 table (the formula check). The verdict itself is `parity.verdict`'s."""
    masks = dict(masks or {})
    probes = tuple(probes if probes is not None else pair.probes)
    work = Workspace.for_run(device)
    results = []
    for index, probe in enumerate(probes):
        key = value_key(probe.name)
        hf_tensor = pair.hf.get(key)
        # the run's dtype, else the reference's own, sizes the tolerance
        run_dtype = dtype_name(dtype) if dtype is not None else (
            _dtype_str(hf_tensor) if hf_tensor is not None else "float32")
        if tolerances is not None and probe.tolerance_class in tolerances:
            tol = tolerances[probe.tolerance_class]
        else:
            tol = tolerance_for(run_dtype, device, probe.tolerance_class, table=table, overrides=overrides)
        valid = None
        if probe.valid:
            if probe.valid not in masks:
                raise ValueError(f"probe {probe.name} needs validity mask {probe.valid!r}; given {sorted(masks)}")
            valid = masks[probe.valid]
        propagated = _compare_keys(pair.hf, pair.fms, key, key, probe, tol, run_dtype, valid, work=work)
        teacher = _teacher_comparison(pair, probe, tol, run_dtype, valid, work)
        floor = floor_ratio = own_ratio = None
        if floors is not None and probe.tolerance_class != "exact" and propagated.metrics is not None:
            floor, floor_ratio, own_ratio = _floor_ratios(pair, floors, probe, (propagated, teacher), tol, run_dtype,
                                                          floor_gate, valid, work)
        float64 = None
        if floors is not None and candidate64 is not None and probe.name in candidate64.resolved:
            float64 = _compare_keys(floors, candidate64, key, key, probe,
                                    tolerance_for("float64", device, probe.tolerance_class), "float64", valid,
                                    work=work)
        hf_order, fms_order = pair.hf.order(key), pair.fms.order(key)
        results.append(ProbeResult(
            index=index, name=probe.name,
            hf_path=pair.hf.resolved.get(probe.name, probe.hf), fms_path=pair.fms.resolved.get(probe.name, probe.fms),
            hf_take=probe.hf_take, fms_take=probe.fms_take, hf_adapter=probe.hf_adapter, fms_adapter=probe.fms_adapter,
            tolerance_class=probe.tolerance_class, tolerance=tol,
            order=hf_order if hf_order is not None else fms_order,
            calls_hf=pair.hf.calls(key), calls_fms=pair.fms.calls(key),
            propagated=propagated, teacher=teacher, attribution=_attribution(propagated, teacher), note=probe.note,
            noise_floor=floor, floor_ratio=floor_ratio, own_floor_ratio=own_ratio, valid=probe.valid,
            float64=float64, missing_upcast=list((upcasts or {}).get(probe.name, ())),
        ))
        rules = probe_rules(results[-1].to_dict(), Policy(floor_factor=floor_factor))
        results[-1].suspect = "gate" not in rules and any(rule in SHARP_RULES for rule in rules)
    factor = floor_factor if floors is not None else None
    return ParityResult(pair.mode, results, first_divergence(results, factor), first_own_error(results, factor),
                        pair.plan.to_dict(), first_suspect=next((r.name for r in _execution_sorted(results)
                                                                 if r.suspect), None),
                        lenient=lenient, floor_factor=factor)


def _teacher_comparison(pair, probe: Probe, tol: Tolerance, run_dtype: str, valid, work: Workspace) -> Comparison:
    """The probe's own error: HF against FMS's module re-run on HF's inputs (teacher-forced runs only)."""
    key = value_key(probe.name)
    if pair.mode != "teacher_forced":
        return Comparison(Status.NOT_RUN, "propagated run (no teacher forcing)")
    if not probe.teacher:
        return Comparison(Status.NOT_APPLICABLE, probe.note or "probe declares no teacher inputs")
    if pair.fms.error_kind(key) == "unresolved":
        return Comparison(Status.MISSING, "FMS module path did not resolve")
    teacher = _compare_keys(pair.hf, pair.fms, key, teacher_output_key(probe.name), probe, tol, run_dtype, valid,
                            work=work)
    note = pair.fms.note(teacher_output_key(probe.name))
    if note:
        teacher.detail = f"{teacher.detail}; {note}" if teacher.detail else note
    return teacher


def _floor_ratios(pair, floors, probe: Probe, comparisons, tol: Tolerance, run_dtype: str, floor_gate: float, valid,
                  work: Workspace) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(noise floor, propagated error / floor, own error / floor) of one probe against `floors`, the captures of a
    run differing only in rounding; in 16 bits the row floor gate is applied to both comparisons on the way."""
    key = value_key(probe.name)
    propagated, teacher = comparisons
    # the rounding-only reference against the reference: both through the HF adapter
    spread = _compare_keys(pair.hf, floors, key, key, probe, tol, run_dtype, valid, fms_adapter=probe.hf_adapter,
                           work=work)
    if spread.metrics is None or not spread.metrics.numel:
        return None, None, None
    floor = spread.metrics.max_abs
    effective = _effective_floor(floor, propagated.metrics.ref_absmax, run_dtype)
    floor_ratio = propagated.metrics.max_abs / effective if effective > 0 else math.inf
    own_ratio = None
    if teacher.metrics is not None and teacher.metrics.numel:
        own_ratio = teacher.metrics.max_abs / effective if effective > 0 else math.inf
    if run_dtype in FLOOR_GATED_DTYPES:
        _gate_by_row_floors(pair, floors, probe, comparisons, tol, run_dtype, floor_gate, valid, work)
    return floor, floor_ratio, own_ratio


def _gate_by_row_floors(pair, floors, probe: Probe, comparisons, tol: Tolerance, run_dtype: str, factor: float,
                        valid, work: Workspace = HOST) -> None:
    """The 16-bit floor gate of one probe: its own (teacher-forced) error against the floor of each row, its
    propagated error, which compounds every upstream rounding difference, against the largest row floor."""
    key = value_key(probe.name)
    hf, _ = _side_value(pair.hf, key, "HF", probe.hf_adapter)
    hf64, _ = _side_value(floors, key, "HF float64", probe.hf_adapter)
    if hf is None or hf64 is None or hf.shape != hf64.shape:
        return
    per_row = row_floors(hf, hf64, run_dtype, valid, work)
    judged = _rows(_expand_valid(valid, hf.shape, per_row.device)).any(dim=-1) if valid is not None else None
    whole = float(per_row[judged].max() if judged is not None and bool(judged.any()) else per_row.max())
    propagated, teacher = comparisons
    for comparison, fms_key, bound, where in (
            (propagated, key, torch.full_like(per_row, whole), f"the largest row floor, {whole:.3g}"),
            (teacher, teacher_output_key(probe.name), per_row, "the floor of the element's own row")):
        fms, _ = _side_value(pair.fms, fms_key, "FMS", probe.fms_adapter)
        if fms is not None:
            apply_row_floor_gate(comparison, hf, fms, bound, tol, run_dtype, factor, valid, where)


def _execution_sorted(results: Sequence[ProbeResult]) -> List[ProbeResult]:
    return sorted(results, key=lambda r: (r.order if r.order is not None else r.index, r.index))


def _above(ratio: Optional[float], factor: Optional[float]) -> bool:
    return factor is not None and ratio is not None and not ratio <= factor  # NaN counts as above


def first_divergence(results: Sequence[ProbeResult], floor_factor: Optional[float] = None) -> Optional[str]:
    """The earliest probe (execution order) that breaks any rule of `parity.verdict` (the gate, its own error, its
    noise floor, the float64 formula check, the upcast audit), whether or not the policy lets that rule fail."""
    policy = Policy(floor_factor=floor_factor or FLOOR_FACTOR)
    for result in _execution_sorted(results):
        if probe_rules(result.to_dict(), policy):
            return result.name
    return None


def first_own_error(results: Sequence[ProbeResult], floor_factor: Optional[float] = None) -> Optional[str]:
    """The earliest probe whose own (teacher-forced) error fails, or stands `floor_factor` above the floor."""
    for result in _execution_sorted(results):
        if result.teacher.status not in (Status.PASS, *Status.NO_VERDICT) or _above(result.own_floor_ratio,
                                                                                     floor_factor):
            return result.name
    return None


def near_tie_flips(hf_tokens: torch.Tensor, hf_logits: Sequence[torch.Tensor], tokens: torch.Tensor,
                   hf64_logits: Mapping[int, torch.Tensor], run_dtype: str,
                   factor: float = NEAR_TIE_FACTOR) -> Dict[int, dict]:
    """Rows whose greedy token first differs from HF's at a near-tie, by the reference alone: HF's own margin between
    its token and FMS's is within `factor` x HF's own rounding error at that step and row (max |HF - HF float64| of
    the row's logits, `hf64_logits[step]`), so rounding alone can swap them. Only in 16-bit runs, and only at steps
    whose float64 logits were measured; a flip anywhere else is not excused. The candidate's own difference never
    enters the bound, so a worse candidate excuses nothing more."""
    if run_dtype not in FLOOR_GATED_DTYPES:
        return {}
    ties, parted = {}, set()
    for step in range(min(hf_tokens.size(1), tokens.size(1), len(hf_logits))):
        for r in torch.nonzero(hf_tokens[:, step].cpu() != tokens[:, step].cpu()).flatten().tolist():
            if r in parted:  # only a row's first difference can be a tie
                continue
            parted.add(r)
            if step not in hf64_logits:
                continue
            ref = hf_logits[step][r].double().cpu()
            rounding = float(row_floors(hf_logits[step][r:r + 1], hf64_logits[step][r:r + 1], run_dtype)[0])
            hf_token, token = int(hf_tokens[r, step]), int(tokens[r, step])
            margin = float(ref[hf_token] - ref[token])
            if margin <= factor * rounding:
                ties[r] = {"row": r, "step": step, "hf_token": hf_token, "fms_token": token,
                           "hf_logit_margin": margin, "bound": factor * rounding, "hf_rounding": rounding}
    return ties
