"""`fms-parity compare` for one architecture: build both sides, derive the probe table, judge every case with the
engine (`parity.capture`, `parity.diff`, `parity.report`), and return the report.

Sections per architecture (the report's verdict is the worst):
- model, float32, one input: propagated and teacher-forced through the derived table, noise floors from HF in
  float64, the float64 formula check on the probes that finish before FMS's first float64 -> float32 cast (its RoPE
  and its gated RMSNorm compute in float32 whatever the model dtype; found by running FMS, `formula_probes`);
- model, float32, padded batch (decoders left-padded, encoders right-padded), compared at real tokens only;
- model, bf16, one input: both loaded in bf16 from the same checkpoint, judged against HF's own bf16 rounding
  (floors from HF in float64 made from the bf16 weights), with the upcast audit;
- generation (decoders; multimodal ones on a text prompt): greedy tokens (exact) and every step's logits of FMS
  `generate` (KV cache) against HF
  `generate`, with per-step floors (HF float64 teacher-forced along HF's tokens).
A side that raises is a finding recorded on the module it was in, never the end of the run; an architecture FMS
cannot load is a finding of its own (`LoadFailure`), recorded with the error.
"""

import copy
import tempfile
import glob
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from parity.capture import ModelRun, capture_model, capture_pair, pair_from_values, value_key
from parity.diff import ParityResult, diff_captures
from parity.fms_arch import cases
from parity.fms_arch.build import build_hf, load_fms, load_hf
from parity.fms_arch.configs import Arch, hf_config
from parity.fms_arch.derive import Derivation, derive
from parity.precision import audit_ops, missing_upcasts
from parity.probes import Probe
from parity.tolerances import dtype_name
from parity.verdict import note_not_run

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
            model = copy.deepcopy(source).to(torch.float64)
            if hasattr(model, "set_experts_implementation"):  # grouped_mm has no float64 kernel
                try:
                    model.set_experts_implementation("eager")
                except (ValueError, AttributeError):
                    pass  # a model without experts
            self._copies[key] = model
        return self._copies[key]

    def fms_at(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.fms if dtype == torch.float32 else self._loaded(
            f"fms:{dtype}", lambda: load_fms(self.arch, self.folder, dtype)[0])

    def hf_at(self, dtype: torch.dtype) -> torch.nn.Module:
        return self.hf if dtype == torch.float32 else self._loaded(
            f"hf:{dtype}", lambda: load_hf(self.arch, self.folder, dtype))

    def _loaded(self, key: str, load) -> torch.nn.Module:
        """A copy in another dtype, loaded once from the checkpoint folder (each side by its own loader)."""
        if key not in self._copies:
            self._copies[key] = load()
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


def formula_probes(probes, fms64: torch.nn.Module, forward) -> Tuple[Tuple[Probe, ...], str]:
    """The probes FMS computes in float64 throughout when loaded in float64: those whose output is complete before
    FMS's first float64 -> float32 cast in that run (FMS rotates q and k in float32, its gated RMSNorm computes in
    float32 whatever the model dtype); the cut is found by running FMS, not assumed per architecture."""
    from parity.hooks import attached_hooks

    completed: List[str] = []
    with attached_hooks() as hooks:
        for probe in probes:
            try:
                module = fms64.get_submodule(probe.fms) if probe.fms else fms64
            except AttributeError:
                continue
            hooks.forward(module, lambda mod, args, kwargs, out, name=probe.name: completed.append(name))
        mode = _Downcasts(completed)
        with torch.no_grad(), mode:
            try:
                forward(fms64)
            except Exception:  # noqa: BLE001 -- the capture run that follows records the error on its probe
                pass
    kept = set(completed if mode.cut is None else completed[:mode.cut])
    checked = tuple(p for p in probes if p.name in kept)
    why = "every probe" if mode.cut is None else (f"{len(checked)} probes before FMS's first float32 cast in its "
                                                   "float64 run")
    return checked, why


def model_section(sides: Sides, inputs: "cases.Inputs", probes, dtype: torch.dtype,
                  mode: str = "teacher_forced", floors: bool = True) -> Tuple[ParityResult, dict]:
    """One input through both models with the derived probes, judged with floors, masks, formula and upcasts.
    `floors=False` (tests of own errors only) leaves out the floors and the formula check, and says so."""
    hf, fms = sides.hf_at(dtype), sides.fms_at(dtype)
    run_inputs = inputs.to(dtype)
    pair = capture_pair(probes, ModelRun(hf, run_inputs.hf_forward), ModelRun(fms, run_inputs.fms_forward),
                        mode=mode, phases="one", on_raise="record")
    probes, masks = _with_validity(probes, pair, inputs.valid)
    extra: dict = {"input": inputs.name, "dtype": dtype_name(dtype)}
    wanted, floors, candidate64, upcasts = floors, None, None, None
    if not wanted:
        extra["floors"] = "not run (floors=False)"
        note_not_run(extra, "noise floors", extra["floors"], "floors off")
    elif pair.hf.raised:
        extra["floors"] = "not run: the HF forward raised"
        note_not_run(extra, "noise floors", extra["floors"], "raised")
    else:
        floors = capture_model(sides.hf64(hf), inputs.to(torch.float64).hf_forward, probes, side="hf")
        extra["floors"] = "HF in float64" + (f" from the {dtype_name(dtype)} weights" if dtype != torch.float32 else "")
    if dtype == torch.float32 and floors is not None and not pair.fms.raised:
        fms64 = sides.fms_at(torch.float64)
        checked, extra["float64"] = formula_probes(probes, fms64, inputs.to(torch.float64).fms_forward)
        candidate64 = capture_model(fms64, inputs.to(torch.float64).fms_forward, checked, side="fms",
                                    on_raise="record")
    if dtype in LOW_PRECISION and not (pair.hf.raised or pair.fms.raised):
        upcasts = _upcast_audit(pair, hf, run_inputs.hf_forward, fms, run_inputs.fms_forward)
    elif dtype in LOW_PRECISION:
        note_not_run(extra, "upcast audit", "a side's forward raised", "raised")
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


@dataclass
class GenerationRun:
    """One side's greedy run: its tokens [B, steps] and per-step logits, or the error it raised (a finding, recorded
    on every step it did not reach)."""

    tokens: Optional[torch.Tensor] = None
    logits: List[torch.Tensor] = field(default_factory=list)
    error: Optional[BaseException] = None

    @classmethod
    def of(cls, generate) -> "GenerationRun":
        try:
            tokens, logits = generate()
        except Exception as err:  # noqa: BLE001 -- a side that raises is a finding, not the end of the run
            return cls(error=err)
        return cls(tokens, logits)

    def value(self, step: int, part: str):
        """What the engine records for this step: a tensor, the side's error, or None (the step did not run)."""
        if self.error is not None:
            return self.error
        if part == "token":
            return self.tokens[:, step] if step < self.tokens.size(1) else None
        return self.logits[step] if step < len(self.logits) else None


def _hf_generate(hf: torch.nn.Module, prompt: torch.Tensor, steps: int, pad_id: int):
    with torch.no_grad():
        out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=pad_id)
    return out.sequences[:, prompt.size(1):], [step.float() for step in out.logits]


def _fms_generate(fms: torch.nn.Module, prompt: torch.Tensor, steps: int):
    from fms.utils.generation import generate

    logits: List[torch.Tensor] = []

    def keep(position, step_logits, next_val, kwargs):
        logits.append(step_logits.float())
        return next_val, kwargs

    with torch.no_grad():
        tokens = generate(fms, prompt, max_seq_len=prompt.size(1) + steps, max_new_tokens=steps, do_sample=False,
                          use_cache=True, post_iteration_hook=keep)
    return tokens[:, prompt.size(1):], logits


def _generation_floors(hf64: torch.nn.Module, prompt: torch.Tensor, hf_tokens: torch.Tensor, steps: int):
    """HF in float64 once over the prompt and HF's own tokens: each step's logits on exactly HF's prefix."""
    ids = torch.cat([prompt, hf_tokens[:, : steps - 1]], dim=1)
    with torch.no_grad():
        logits = hf64(input_ids=ids, use_cache=False).logits
    start = prompt.size(1) - 1
    probes = [(Probe(f"step.{k}.logits", "generate", "generate", teacher=()), logits[:, start + k],
               logits[:, start + k]) for k in range(steps)]
    return pair_from_values(probes).hf


def generation_section(sides: Sides, steps: int = cases.NEW_TOKENS) -> Tuple[ParityResult, dict]:
    """Greedy tokens (exact) and every step's logits of FMS `generate` (KV cache) against HF `generate`."""
    prompt = cases.generation_prompt(sides.config)
    hf_run = GenerationRun.of(lambda: _hf_generate(sides.hf, prompt, steps, cases._pad_id(sides.config)))
    fms_run = GenerationRun.of(lambda: _fms_generate(sides.fms, prompt, steps))
    extra: dict = {"prompt_tokens": prompt.size(1), "new_tokens": steps}
    floors = None
    if hf_run.error is not None:
        note_not_run(extra, "noise floors", "HF generate raised", "raised")
    else:
        floors = _generation_floors(sides.hf64(sides.hf), prompt, hf_run.tokens, steps)
        extra["floors"] = "HF in float64 along HF's tokens"
        extra["distinct_hf_tokens"] = len(set(hf_run.tokens.flatten().tolist()))
    rows = [(Probe(f"step.{k}.{part}", "generate", "generate", teacher=(), tolerance_class=klass),
             hf_run.value(k, part), fms_run.value(k, part))
            for k in range(steps) for part, klass in (("token", "exact"), ("logits", "logits"))]
    result = diff_captures(pair_from_values(rows), dtype=torch.float32, floors=floors)
    return result, extra


def load_failure_section(arch: Arch, err: BaseException) -> Tuple[str, str, ParityResult, dict]:
    """An architecture FMS cannot load: one probe `load`, status raised, with FMS's error."""
    probe = Probe("load", "", "", teacher=(), note="FMS get_model(architecture, variant, model_path, source='hf')")
    result = diff_captures(pair_from_values([(probe, torch.zeros(1), err)]), dtype=torch.float32)
    return f"{arch.name} · loading the HF checkpoint", "model", result, {"error": str(err)}


def compare_architecture(arch: Arch, workdir: Path, *, dtype: torch.dtype = torch.float32, bf16_case: bool = True,
                         config_overrides: Optional[dict] = None, checkpoint: Optional[Path] = None,
                         seed: int = 0) -> Tuple[list, dict]:
    """Every section of one architecture (see the module docstring) and facts for the report's meta."""
    facts: dict = {"architecture": arch.name, "hf_class": arch.hf_class, "family": arch.family}
    start = time.perf_counter()
    try:
        sides = build_sides(arch, workdir, config_overrides=config_overrides, checkpoint=checkpoint, seed=seed)
    except LoadFailure as err:
        facts["seconds"] = round(time.perf_counter() - start, 2)
        return [load_failure_section(arch, err)], facts
    facts.update(fms_get_model={k: v for k, v in sides.fms_kwargs.items() if k in ("architecture", "variant")},
                 checkpoint=str(sides.folder), seed=None if checkpoint else seed)
    single = cases.single(arch, sides.config)
    probes, derivation = derive_table(sides, single)
    facts["derivation"] = {**derivation.summary(), "refused_modules": derivation.refused}
    sections = []
    plan = [(single, dtype)]
    batch = cases.padded(arch, sides.config)
    if batch is not None:
        plan.append((batch, dtype))
    if bf16_case and dtype == torch.float32:
        plan.append((single, torch.bfloat16))
    for inputs, run_dtype in plan:
        result, extra = model_section(sides, inputs, probes, run_dtype)
        extra["refused_probes"] = derivation.refused
        sections.append((f"{inputs.label} · {dtype_name(run_dtype)}", "model", result, extra))
    if arch.kind in ("decoder", "multimodal") and dtype == torch.float32:  # multimodal: text-only prompt
        result, extra = generation_section(sides)
        sections.append(("greedy generation · float32", "generation", result, extra))
    facts["seconds"] = round(time.perf_counter() - start, 2)
    facts["seconds_build"] = {k: round(v, 2) for k, v in sides.seconds.items()}
    return sections, facts


class _Downcasts(torch.overrides.TorchFunctionMode):
    """Counts the probe outputs completed before the first op that turns a float64 tensor into a float32 one."""

    def __init__(self, completed: list):
        super().__init__()
        self.completed, self.cut = completed, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.cut is None and isinstance(out, torch.Tensor) and out.dtype == torch.float32 and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            self.cut = len(self.completed)
        return out


def compare_report(arch, *, dtype, overrides=None, checkpoint=None, seed: int = 0, bf16_case: bool = True) -> dict:
    from parity.report import build_multi_report, run_metadata

    with tempfile.TemporaryDirectory(prefix="fms-parity-") as workdir:
        sections, facts = compare_architecture(arch, Path(workdir), dtype=dtype, bf16_case=bf16_case,
                                               config_overrides=overrides, checkpoint=checkpoint, seed=seed)
    meta = {**run_metadata(device="cpu", dtype=dtype, seed=None if checkpoint else seed), **facts}
    return build_multi_report(sections, meta)
