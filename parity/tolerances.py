"""When is a difference acceptable: the tolerance table keyed by (dtype, device) and per-probe tolerance class.

An element passes when  |fms - hf| - (rtol * |hf| + ulps * ulp_dtype(|hf|)) <= atol  (computed in float64).
`ulp_dtype(v)` is the spacing of the run dtype's representable numbers at magnitude v: two implementations that both
round a result to bf16 can land on adjacent values even when their exact results differ by a hair, so one ulp is
always tolerated for 16-bit runs (a pure-atol bf16 check flakes: half an ulp at |v| in [16, 32) is already 0.0625,
see sglang PR #35795). A probe passes when at most `max_outside_fraction` of its elements fail (0: every element).

Values and why:
- float32 (cpu and cuda): atol = rtol = 1e-3, no ulp term. The project's target, the one the Columbia port used;
  HF's own eager-vs-sdpa fp32 table is 1e-6/1e-4 for two kernels of one model, a port re-derives the math, so we
  allow more. On CUDA this presumes TF32 is off (the runner records the flags in the report metadata).
- float16: atol = rtol = 5e-3 + 1 ulp. HF's `_test_eager_matches_sdpa_inference` fp16 entry (eps(fp16) = 9.8e-4,
  so ~5 eps of accumulated rounding).
- bfloat16: atol = rtol = 1e-2 + 1 ulp. HF's bf16 entry; eps(bf16) = 7.8e-3, so rtol is ~1.3 eps and the ulp term
  adds one more spacing (together ~2 bf16 roundings).
- bfloat16 logits: atol = 3e-2, rtol = 1e-2 + 1 ulp. Measured on an H100 at 2b dimensions (40 decoder layers):
  FMS against itself with the modality LoRA merged vs applied separately -- the same math in a different rounding
  order -- differs by up to 0.020 in the logits, and FMS vs HF by up to 0.021. That is bf16's noise floor at that
  depth, not a port error; the bound sits 1.5x above it. Activations keep the HF table.
- float64: atol = rtol = 1e-9, the formula check (both sides loaded in float64 on the same inputs): a correct port
  differs there by at most 4e-14 (measured on the audio path), so a fault smaller than fp32's rounding -- an eps, a
  constant off in its sixth digit -- stands out by five orders of magnitude.
- exact: atol = rtol = 0, for integers and masks (token ids, lengths, validity masks, transcript bytes) in any dtype,
  whatever the overrides say (`compare` also compares every integer or boolean tensor exactly).
Entries keyed (dtype, device, class) refine the (dtype, device) ones for one tolerance class.
"""

from dataclasses import asdict, dataclass, replace
from typing import Mapping, Optional, Tuple, Union

import torch

TOLERANCE_CLASSES = ("activation", "logits", "exact")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    ulps: float = 0.0  # multiples of the run dtype's ulp at |hf| added to the bound
    max_outside_fraction: float = 0.0  # share of elements allowed outside the bound (Polygraphy-style quantile)
    why: str = ""

    def __post_init__(self):
        for field_name in ("atol", "rtol", "ulps"):
            value = getattr(self, field_name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"Tolerance.{field_name} must be a number >= 0, got {value!r}")
        if not 0.0 <= self.max_outside_fraction < 1.0:
            raise ValueError(f"Tolerance.max_outside_fraction must be in [0, 1), got {self.max_outside_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Tolerance":
        return cls(**data)


_FP32 = Tolerance(1e-3, 1e-3, 0.0, 0.0, "fp32 target atol=rtol=1e-3 (TF32 off)")
_FP16 = Tolerance(5e-3, 5e-3, 1.0, 0.0, "fp16: HF sdpa-equivalence table 5e-3/5e-3, plus one fp16 ulp")
_BF16 = Tolerance(1e-2, 1e-2, 1.0, 0.0, "bf16: HF sdpa-equivalence table 1e-2/1e-2, plus one bf16 ulp")
_BF16_LOGITS = Tolerance(
    3e-2, 1e-2, 1.0, 0.0,
    "bf16 logits: 1.5x the measured FMS-vs-FMS rounding floor after 40 layers (0.020, H100, 2b), plus one bf16 ulp",
)

EXACT = Tolerance(0.0, 0.0, 0.0, 0.0, "exact: integers, ids, lengths and masks must be equal")
_FP64 = Tolerance(1e-9, 1e-9, 0.0, 0.0, "fp64 formula check: both sides in float64, where a correct port differs by "
                  "4e-14 at most (measured); an eps or a constant off in its sixth digit shows as 1e-6")

# (dtype name, device type[, tolerance class]) -> tolerance; "*" matches any device type
DEFAULT_TABLE: Mapping[Tuple[str, ...], Tolerance] = {
    ("float32", "cpu"): _FP32,
    ("float32", "cuda"): _FP32,
    ("float64", "*"): _FP64,
    ("float16", "*"): _FP16,
    ("bfloat16", "*"): _BF16,
    ("bfloat16", "*", "logits"): _BF16_LOGITS,
}

# mantissa bits (without the implicit one) and the smallest normal exponent, for the ulp term
_FLOAT_FORMATS = {
    "float64": (52, -1022),
    "float32": (23, -126),
    "float16": (10, -14),
    "bfloat16": (7, -126),
}


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    """'float32' for torch.float32 / 'torch.float32' / 'float32' / 'fp32' / 'bf16'."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}: {dtype!r}")
    name = dtype.removeprefix("torch.")
    return {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}.get(
        name, name
    )


def device_type(device: Union[torch.device, str]) -> str:
    if isinstance(device, torch.device):
        return device.type
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}: {device!r}")
    return torch.device(device).type


def tolerance_for(
    dtype: Union[torch.dtype, str],
    device: Union[torch.device, str] = "cpu",
    tolerance_class: str = "activation",
    *,
    table: Optional[Mapping[Tuple[str, str], Tolerance]] = None,
    overrides: Optional[Mapping[str, float]] = None,
) -> Tolerance:
    """The tolerance for one probe class in a run of `dtype` on `device`; `overrides` ({'atol': .., 'rtol': ..,
    'ulps': .., 'max_outside_fraction': ..}) replace single fields (CLI --atol/--rtol)."""
    if tolerance_class not in TOLERANCE_CLASSES:
        raise ValueError(f"unknown tolerance class {tolerance_class!r}; expected one of {TOLERANCE_CLASSES}")
    if tolerance_class == "exact":  # exact is exact: no --atol / --rtol / dtype loosens ids, lengths or masks
        return EXACT
    table = DEFAULT_TABLE if table is None else table
    key_dtype, key_device = dtype_name(dtype), device_type(device)
    tol = next(
        (table[key] for key in ((key_dtype, key_device, tolerance_class), (key_dtype, "*", tolerance_class),
                                (key_dtype, key_device), (key_dtype, "*")) if key in table),
        None,
    )
    if tol is None:
        known = sorted("@".join(key) for key in table)
        raise ValueError(f"no tolerance for dtype {key_dtype} on device {key_device}; the table has {known}")
    if overrides:
        unknown = set(overrides) - {"atol", "rtol", "ulps", "max_outside_fraction"}
        if unknown:
            raise ValueError(f"unknown tolerance override(s) {sorted(unknown)}; use atol, rtol, ulps, max_outside_fraction")
        changed = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        tol = replace(tol, **overrides, why=f"{tol.why}; overridden: {changed}")
    return tol


def ulp(magnitude: torch.Tensor, dtype: Union[torch.dtype, str]) -> torch.Tensor:
    """Spacing of `dtype`'s representable numbers at |magnitude| (float64 result): 2**(floor(log2|v|) - mantissa_bits),
    floored at the subnormal spacing. bf16 at 16..32 -> 0.125. For finite magnitudes (a non-finite one gives inf)."""
    name = dtype_name(dtype)
    if name not in _FLOAT_FORMATS:
        raise ValueError(f"ulp is defined for {sorted(_FLOAT_FORMATS)}, got {name}")
    mantissa_bits, min_exponent = _FLOAT_FORMATS[name]
    values = magnitude.abs().to(torch.float64)
    # 2**floor(log2|v|) is |v| with its mantissa bits cleared (0 for 0 and float64's subnormals, which the floor
    # covers): one pass where frexp / where / pow took five, and compare computes it for every element judged
    power = (values.view(torch.int64) & _FLOAT64_EXPONENT_BITS).view(torch.float64)
    return (power * 2.0 ** -mantissa_bits).clamp_min(2.0 ** (min_exponent - mantissa_bits))


_FLOAT64_EXPONENT_BITS = 0x7FF0000000000000


# The tight regression bound beside the documented gate: a correct port's measured error times a headroom, so that a
# 100x growth fails although it is still inside atol = rtol = 1e-3. fp32 measured on the tiny fixture (2-core CPU,
# torch 2.9.1) and at 2b on an H100: worst activation 2.3e-5 over 345 probes, logits 2.4e-7 at tiny; 16-bit runs keep
# the gate (their measured error is already of the order of the gate).
REGRESSION_TABLE: Mapping[Tuple[str, ...], Tolerance] = {
    ("float32", "*"): Tolerance(1e-4, 1e-4, 0.0, 0.0, "fp32 regression bound: ~4x the worst error measured at 2b"),
}


def regression_bound(dtype: Union[torch.dtype, str], device: Union[torch.device, str] = "cpu",
                     tolerance_class: str = "activation") -> Optional[Tolerance]:
    """The tight bound for (dtype, device, class), or None where only the gate applies."""
    if tolerance_class == "exact":
        return None
    key_dtype, key_device = dtype_name(dtype), device_type(device)
    for key in ((key_dtype, key_device, tolerance_class), (key_dtype, "*", tolerance_class), (key_dtype, key_device),
                (key_dtype, "*")):
        if key in REGRESSION_TABLE:
            return REGRESSION_TABLE[key]
    return None
