"""`fms-parity compare` for one architecture: build both sides, derive the probe table, judge every case with the
engine (`parity.capture`, `parity.diff`, `parity.report`), and return the report.

Sections per architecture (the report's verdict is the worst):
- model, float32, one input: propagated and teacher-forced through the derived table, noise floors from HF in
  float64, the float64 formula check where FMS computes in float64 throughout (not under RoPE: FMS rotates q and k
  in float32 even in a float64 model);
- model, float32, padded batch (decoders left-padded, encoders right-padded), compared at real tokens only;
- model, bf16, one input: both loaded in bf16 from the same checkpoint, judged against HF's own bf16 rounding
  (floors from HF in float64 made from the bf16 weights), with the upcast audit;
- generation (decoders): greedy tokens (exact) and every step's logits of FMS `generate` (KV cache) against HF
  `generate`, with per-step floors (HF float64 teacher-forced along HF's tokens).
A side that raises is a finding recorded on the module it was in, never the end of the run; an architecture FMS
cannot load is a finding of its own (`LoadFailure`), recorded with the error.
"""

import copy
import glob
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from parity.capture import ModelRun, capture_model, capture_pair, pair_from_values, value_key
from parity.diff import ParityResult, diff_captures, near_tie_flips
from parity.fms_arch import cases
from parity.fms_arch.build import build_hf, fms_kwargs, load_fms, load_hf
from parity.fms_arch.configs import Arch, hf_config
from parity.fms_arch.derive import Derivation, derive
from parity.precision import audit_ops, missing_upcasts
from parity.probes import Probe
from parity.tolerances import dtype_name
from parity.verdict import not_run_record

LOW_PRECISION = (torch.float16, torch.bfloat16)


class LoadFailure(RuntimeError):
    """FMS (or HF) could not build or load the checkpoint: a finding about the loading path, reported as FAIL."""


@dataclass
class Sides:
    arch: Arch
    config: object
    folder: Path
    hf: torch.nn.Module
    fms: torch.nn.Module
    fms_kwargs: dict
    hf_sd: Dict[str, torch.Tensor]
    seconds: Dict[str, float] = field(default_factory=dict)
    _copies: Dict[str, torch.nn.Module] = field(default_factory=dict)

    def hf64(self, source: torch.nn.Module) -> torch.nn.Module:
        """HF in float64 made from `source`'s weights (a bf16 case's floors keep its bf16-rounded weights)."""
        key = f"hf64:{id(source)}"
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(source).to(torch.float64)
        return self._copies[key]

    def fms_at(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype == torch.float32:
            return self.fms
        key = f"fms:{dtype}"
        if key not in self._copies:
            self._copies[key] = load_fms(self.arch, self.folder, dtype)[0]
        return self._copies[key]

    def hf_at(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype == torch.float32:
            return self.hf
        key = f"hf:{dtype}"
        if key not in self._copies:
            self._copies[key] = load_hf(self.arch, self.folder, dtype)
        return self._copies[key]


def build_sides(arch: Arch, workdir: Path, *, config_overrides: Optional[dict] = None,
                checkpoint: Optional[Path] = None, seed: int = 0) -> Sides:
    """HF from the config (seeded, saved to `workdir`) or from `checkpoint`; FMS loaded from that folder by FMS."""
    seconds = {}
    start = time.perf_counter()
    if checkpoint is not None:
        folder = Path(checkpoint)
        hf = load_hf(arch, folder)
        config = hf.config
    else:
        folder = workdir / arch.name
        folder.mkdir(parents=True, exist_ok=True)
        config = hf_config(arch, config_overrides)
        config.architectures = [arch.hf_class]
        hf = build_hf(arch, config, folder, seed)
    seconds["hf build"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        fms, kwargs = load_fms(arch, folder)
    except Exception as err:  # FMS's own loading path failed on an HF checkpoint: that is the finding
        raise LoadFailure(f"FMS could not load the HF checkpoint: {type(err).__name__}: {err}") from err
    seconds["fms load"] = time.perf_counter() - start
    hf_sd = {}
    for path in sorted(glob.glob(str(folder / "*.safetensors"))):
        hf_sd.update(load_file(path))
    return Sides(arch, config, folder, hf, fms, kwargs, hf_sd, seconds)


def logits_probe(arch: Arch) -> Optional[Probe]:
    """The whole model's output (logits, or the classification / span output of an encoder head)."""
    if arch.kind == "vision":
        return None  # the vision tower's output is its derived root pair
    return Probe("logits", "", "", hf_take="output[0]", fms_take="output[0?]", teacher=(), tolerance_class="logits",
                 note="the whole model's output: nothing to teacher-force")


def derive_table(sides: Sides, inputs: "cases.Inputs") -> Tuple[Tuple[Probe, ...], Derivation]:
    derivation = derive(sides.hf, sides.fms, sides.arch.name, sides.hf_sd, inputs.hf_forward, inputs.fms_forward,
                        {"model_config": sides.fms.config})
    probes = list(derivation.probes)
    root = logits_probe(sides.arch)
    if root is not None:
        probes.append(root)
    return tuple(probes), derivation


def _with_validity(probes, pair, valid: Optional[torch.Tensor]) -> Tuple[Tuple[Probe, ...], dict]:
    """Probes whose HF value is laid out [B, T, ...] are compared at real tokens only (validity mask "tokens")."""
    if valid is None:
        return tuple(probes), {}
    from dataclasses import replace

    out = []
    for probe in probes:
        value = pair.hf.get(value_key(probe.name))
        laid_out = value is not None and value.dim() >= 2 and tuple(value.shape[:2]) == tuple(valid.shape)
        out.append(replace(probe, valid="tokens") if laid_out else probe)
    return tuple(out), {"tokens": valid}


def _rotary(model: torch.nn.Module) -> bool:
    """FMS keeps its RotaryEmbedding as a plain attribute (not a submodule) of the attention or the model."""
    return any("Rotary" in type(value).__name__ for m in model.modules() for value in vars(m).values())


def formula_probes(probes, pair, fms: torch.nn.Module) -> Tuple[Tuple[Probe, ...], str]:
    """The probes FMS computes in float64 throughout when loaded in float64: all of them, except in a model with
    RoPE, where FMS rotates q and k in float32 (fms.modules.positions): there, those that run before the first
    attention module."""
    if not _rotary(fms):
        return tuple(probes), "every probe"
    ordered = sorted(probes, key=lambda p: (pair.hf.order(value_key(p.name)) is None,
                                            pair.hf.order(value_key(p.name)) or 0))
    attention = [path for path, m in fms.named_modules() if "Attention" in type(m).__name__]
    kept = []
    for probe in ordered:
        near = lambda a: a == probe.fms or a.startswith(probe.fms + ".") or probe.fms.startswith(a + ".")  # noqa
        if not probe.fms or any(near(path) for path in attention):
            break
        kept.append(probe)
    return tuple(kept), f"{len(kept)} probes before the first attention (RoPE runs in float32 in FMS)"


def _note_not_run(extra: dict, check: str, why: str, cause: Optional[str]) -> None:
    if cause is not None:
        extra.setdefault("not_run", []).append(not_run_record(check, why, cause))


def model_section(sides: Sides, inputs: "cases.Inputs", probes, dtype: torch.dtype,
                  mode: str = "teacher_forced") -> Tuple[ParityResult, dict]:
    """One input through both models with the derived probes, judged with floors, masks, formula and upcasts."""
    hf, fms = sides.hf_at(dtype), sides.fms_at(dtype)
    run_inputs = inputs.to(dtype)
    pair = capture_pair(probes, ModelRun(hf, run_inputs.hf_forward), ModelRun(fms, run_inputs.fms_forward),
                        mode=mode, phases="one", on_raise="record")
    probes, masks = _with_validity(probes, pair, inputs.valid)
    extra: dict = {"input": inputs.name, "dtype": dtype_name(dtype)}
    floors = candidate64 = upcasts = None
    if pair.hf.raised:
        extra["floors"] = "not run: the HF forward raised"
        _note_not_run(extra, "noise floors", extra["floors"], "raised")
    else:
        floors = capture_model(sides.hf64(hf), inputs.to(torch.float64).hf_forward, probes, side="hf")
        extra["floors"] = "HF in float64" + (f" from the {dtype_name(dtype)} weights" if dtype != torch.float32 else "")
    if dtype == torch.float32 and floors is not None and not pair.fms.raised:
        checked, extra["float64"] = formula_probes(probes, pair, fms)
        fms64 = sides.fms_at(torch.float64)
        candidate64 = capture_model(fms64, inputs.to(torch.float64).fms_forward, checked, side="fms",
                                    on_raise="record")
    if dtype in LOW_PRECISION and not (pair.hf.raised or pair.fms.raised):
        upcasts = _upcast_audit(pair, hf, run_inputs.hf_forward, fms, run_inputs.fms_forward)
    elif dtype in LOW_PRECISION:
        _note_not_run(extra, "upcast audit", "a side's forward raised", "raised")
    result = diff_captures(pair, probes=probes, dtype=dtype, masks=masks, floors=floors, candidate64=candidate64,
                           upcasts=upcasts)
    return result, extra


def _upcast_audit(pair, hf, hf_forward, fms, fms_forward) -> Dict[str, List[str]]:
    places = lambda caps: {path: name for name, path in reversed(list(caps.resolved.items()))}  # noqa: E731
    with torch.no_grad():
        with audit_ops(hf, places(pair.hf)) as hf_ops:
            hf_forward(hf)
        with audit_ops(fms, places(pair.fms)) as fms_ops:
            fms_forward(fms)
    return missing_upcasts(hf_ops, fms_ops)
