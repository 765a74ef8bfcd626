"""`assert_parity`: the engine's judgement for test suites, one named pair of tensors at a time.

    from parity.testing import assert_parity
    assert_parity("logits", hf_logits, fms_logits, dtype=dtype, device=device, tolerance_class="logits",
                  valid=attention_mask, record=record_property)

Two bounds, both from `parity.tolerances`: the documented gate (atol = rtol = 1e-3 in fp32, the dtype table
otherwise) and, beside it, the tight regression bound measured on a correct port, so that an error growing 100x
fails although it is still inside the gate. Every call records its measured error (`record(name_max_abs, ...)`,
e.g. pytest's `record_property`), and nothing compared (everything masked, all NaN) is a failure.
"""

from typing import Callable, Dict, Optional, Union

import torch

from parity.diff import Comparison, apply_row_floor_gate, compare, row_floors
from parity.tolerances import Tolerance, dtype_name, regression_bound, tolerance_for, ulp
from parity.verdict import FLOOR_FACTOR


def assert_parity(
    name: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    dtype: Union[torch.dtype, str, None] = None,
    device: Union[torch.device, str] = "cpu",
    tolerance_class: str = "activation",
    tolerance: Optional[Tolerance] = None,
    valid: Optional[torch.Tensor] = None,
    regression: bool = True,
    record: Optional[Callable[[str, object], None]] = None,
) -> Comparison:
    """Compare `candidate` (FMS) against `reference` (HF); raise AssertionError naming what failed and by how much.
    `dtype` (default: the reference's) and `device` pick the tolerance; `valid` masks leading dims (padding)."""
    run_dtype = dtype_name(dtype if dtype is not None else reference.dtype)
    gate = tolerance or tolerance_for(run_dtype, device, tolerance_class)
    result = compare(reference.detach().cpu(), candidate.detach().cpu(), gate, ulp_dtype=run_dtype,
                     valid=None if valid is None else valid.detach().cpu())
    metrics = result.metrics
    if record is not None and metrics is not None:
        record(f"{name}_max_abs", metrics.max_abs)
        record(f"{name}_tol_ratio", metrics.tol_ratio)
    where = f"{name} ({run_dtype} on {torch.device(device).type}, {tolerance_class})"
    if not result.passed:
        raise AssertionError(f"{where}: {result.status}: {result.detail}; worst at {metrics and metrics.worst_index}: "
                             f"HF {metrics and metrics.worst_hf} vs FMS {metrics and metrics.worst_fms}")
    tight = regression_bound(run_dtype, device, tolerance_class) if regression and tolerance is None else None
    if tight is not None:
        again = compare(reference.detach().cpu(), candidate.detach().cpu(), tight, ulp_dtype=run_dtype,
                        valid=None if valid is None else valid.detach().cpu())
        if not again.passed:
            raise AssertionError(
                f"{where}: inside the gate (atol {gate.atol:g}, rtol {gate.rtol:g}) but above the regression bound "
                f"(atol {tight.atol:g}, rtol {tight.rtol:g}: {tight.why}): {again.detail}"
            )
    return result


def assert_compiled_parity(
    name: str,
    eager: torch.Tensor,
    compiled: torch.Tensor,
    fp32_reference: Callable[[], torch.Tensor],
    *,
    dtype: torch.dtype,
    device: Union[torch.device, str] = "cpu",
    tolerance_class: str = "activation",
    record: Optional[Callable[[str, object], None]] = None,
) -> Dict[str, float]:
    """A compiled function against the same function run eagerly, as compare judges FMS against HF. Within the table
    of eager, it passes. In 16 bits inductor keeps fused intermediates in fp32 where eager rounds every op to 16 bits,
    so the two differ by about eager's own rounding error: then every element outside the table must be within
    FLOOR_FACTOR times that error, measured per row against the fp32 eager value (`fp32_reference()`, called only
    then; compare's row floors, `parity.diff.row_floors`). Returns the measured errors."""
    assert eager.abs().max() > 0 and compiled.float().std() > 0, f"{name}: degenerate output"
    try:
        result = assert_parity(f"{name}_compiled_vs_eager", eager, compiled, dtype=dtype, device=device,
                               tolerance_class=tolerance_class, record=record)
        return {"compiled_vs_eager_max_abs": result.metrics.max_abs}
    except AssertionError:
        if dtype == torch.float32:
            raise
    run_dtype, tol = dtype_name(dtype), tolerance_for(dtype, device, tolerance_class)
    eager, compiled = eager.detach().cpu(), compiled.detach().cpu()
    result = compare(eager, compiled, tol, ulp_dtype=run_dtype)
    floors = row_floors(eager, fp32_reference().detach().cpu(), run_dtype)
    apply_row_floor_gate(result, eager, compiled, floors, tol, run_dtype, FLOOR_FACTOR, None,
                         "here eager's: eager in 16 bits vs eager in fp32")
    measured = {"compiled_vs_eager_max_abs": result.metrics.max_abs, "eager_rounding_max": float(floors.max())}
    if record is not None:
        for key, value in measured.items():
            record(f"{name}_{key}", value)
    assert result.passed, f"{name}: compiled vs eager {result.status}: {result.detail}"
    return measured


def assert_linear_rounded_once(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor] = None) -> None:
    """`out` is x @ weight.T (+ bias) computed exactly and rounded once to out's dtype, to within fp32 accumulation
    (what cuBLAS's fp32-accumulating GEMMs give): every element within half an ulp of the float64 value plus
    (K + 8) fp32 roundings of the summed magnitudes. For kernels that replace `F.linear` (the split-K GEMV)."""
    x, weight = x.double().reshape(-1, x.size(-1)), weight.double()
    bias = torch.zeros(weight.size(0), dtype=torch.float64, device=x.device) if bias is None else bias.double()
    exact = x @ weight.T + bias
    magnitude = x.abs() @ weight.abs().T + bias.abs()
    fp32_rounding = torch.finfo(torch.float32).eps / 2
    bound = ulp(exact.abs(), out.dtype) / 2 + (x.size(-1) + 8) * fp32_rounding * magnitude
    excess = (out.double().reshape(exact.shape) - exact).abs() - bound
    assert excess.max() <= 0, (f"{(excess > 0).sum().item()} of {excess.numel()} outputs off by more than one rounding "
                               f"(worst by {excess.max().item():.3g} beyond the bound)")
