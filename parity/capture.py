"""Record probe values from both models: the `Captures` store and the runner (propagated, teacher-forced, two-phase).

The runner knows no model family: it takes a probe list, and for each side a model (or a factory that builds
one) plus its inputs (a kwargs dict or a callable model -> output). It records; judging is `parity.diff`'s job.

- propagated: both models run on the same inputs; each probe records the value its hook sees.
- teacher-forced: additionally, each probed FMS module is re-run inside its forward hook with its inputs replaced by
  the HF module's captured inputs (hooks suppressed), so a module's own error is told apart from inherited error.
  When an input cannot be substituted (shape differs, not passed, HF never ran) the record says so.
What is compared (`mode`: propagated | teacher_forced) and how memory is scheduled (`phases`: one | two | auto)
are separate arguments: any mode runs in one or two phases.
- two phases: HF runs first and its captures go to a safetensors file; the HF model is freed; then the FMS model is
  built and run, reading HF teacher inputs lazily from disk. One model in memory at a time. `phases="auto"` picks it
  when parameter bytes of both (with headroom) exceed the free memory of the run device.

Values are detached, copied to CPU contiguous, in their own dtype (no upcast: a dtype mismatch is reported, not hidden).
Only the first call of a module is recorded; later calls are counted (the report shows call counts).
"""

import contextlib
import gc
import hashlib
import inspect
import json
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parity.hooks import attached_hooks
from parity.probes import Probe, ProbeResolutionError, Take, resolve_module

MODES = ("propagated", "teacher_forced")
PHASES = ("auto", "one", "two")
# one-phase needs both models plus activations and captures: parameter bytes times this factor must fit
MEMORY_HEADROOM = 1.25


class CaptureError(ValueError):
    """A take spec could not be applied to what the module received or returned."""


# ---------------------------------------------------------------------------------------------------------------
# keys


def value_key(name: str) -> str:
    return name


def teacher_input_key(name: str, spec: str) -> str:
    return f"{name}#tf_input:{spec}"


def teacher_output_key(name: str) -> str:
    return f"{name}#tf_output"


# ---------------------------------------------------------------------------------------------------------------
# selecting from module inputs / outputs


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """One copy: detached, CPU, contiguous, same dtype (a later in-place op on the original cannot change it)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return out.copy_(tensor.detach())


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    return type(value).__name__


def select_output(take: Take, output: Any) -> torch.Tensor:
    if take.kind != "output":
        raise CaptureError(f"take {take} is not an output spec")
    value = output
    if isinstance(take.key, int):
        if isinstance(output, Mapping) and not isinstance(output, torch.Tensor):
            output = tuple(output.values())  # a mapping output (e.g. a ModelOutput): its fields in order
        if isinstance(output, (tuple, list)):
            if take.key >= len(output):
                raise CaptureError(f"output[{take.key}] requested but the output is a {_describe(output)}")
            value = output[take.key]
        elif not (take.optional_index and isinstance(output, torch.Tensor)):
            raise CaptureError(f"output[{take.key}] requested but the output is a {_describe(output)}")
    elif isinstance(take.key, str):
        if isinstance(output, Mapping) and take.key in output:
            value = output[take.key]
        elif hasattr(output, take.key):
            value = getattr(output, take.key)
        else:
            raise CaptureError(f"output.{take.key} requested but the output ({_describe(output)}) has no such field")
    if not isinstance(value, torch.Tensor):
        hint = "; use output[0] or output.<field>" if take.key is None else ""
        raise CaptureError(f"the selected output is a {_describe(value)}, not a tensor{hint}")
    return value


_SIGNATURES: Dict[type, List[str]] = {}


def _parameter_names(module: torch.nn.Module) -> List[str]:
    cls = type(module)
    if cls not in _SIGNATURES:
        try:
            params = inspect.signature(module.forward).parameters.values()
            _SIGNATURES[cls] = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
        except (TypeError, ValueError):
            _SIGNATURES[cls] = []
    return _SIGNATURES[cls]


def _locate_input(take: Take, module: torch.nn.Module, args: tuple, kwargs: dict) -> Tuple[str, Union[int, str]]:
    """('arg', position) or ('kwarg', name) where the requested input was passed."""
    if take.kind != "input":
        raise CaptureError(f"take {take} is not an input spec")
    names = _parameter_names(module)
    if isinstance(take.key, int):
        if take.key < len(args):
            return "arg", take.key
        if take.key < len(names) and names[take.key] in kwargs:
            return "kwarg", names[take.key]
        label = f"input[{take.key}]" + (f" ({names[take.key]})" if take.key < len(names) else "")
    else:
        if take.key in kwargs:
            return "kwarg", take.key
        if take.key in names and names.index(take.key) < len(args):
            return "arg", names.index(take.key)
        label = f"input.{take.key}"
    raise CaptureError(
        f"{label} was not passed to {type(module).__name__}.forward (got {len(args)} positional, "
        f"keywords {sorted(kwargs)}; defaults are not captured)"
    )


def select_input(take: Take, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    where, key = _locate_input(take, module, args, kwargs)
    value = args[key] if where == "arg" else kwargs[key]
    if not isinstance(value, torch.Tensor):
        raise CaptureError(f"input {key!r} of {type(module).__name__} is a {_describe(value)}, not a tensor")
    return value


def substitute_input(take: Take, module: torch.nn.Module, args: tuple, kwargs: dict, value: Any) -> Tuple[tuple, dict]:
    where, key = _locate_input(take, module, args, kwargs)
    if where == "arg":
        return args[:key] + (value,) + args[key + 1 :], kwargs
    return args, {**kwargs, key: value}


# ---------------------------------------------------------------------------------------------------------------
# the store


class Captures:
    """key -> CPU tensor, plus per-key records (execution order, call count, error). In memory, or backed lazily by
    a safetensors file (`save` / `load`). Value keys are probe names; teacher keys add '#tf_input:spec' / '#tf_output'."""

    def __init__(self, side: str = ""):
        self.side = side
        self.resolved: Dict[str, str] = {}  # probe name -> module path actually hooked
        self.raised: Optional[str] = None  # the side's forward raised (recorded with on_raise="record")
        self._tensors: Dict[str, torch.Tensor] = {}
        self._records: Dict[str, dict] = {}
        self._next_order = 0
        self._file: Optional[Path] = None
        self._reader = None
        self._stored_keys: set = set()

    # recording
    def _record(self, key: str, ordered: bool) -> Tuple[dict, bool]:
        record = self._records.get(key)
        if record is not None:
            record["calls"] += 1
            return record, False
        record = {"calls": 1, "order": None, "error": None, "error_kind": None}
        if ordered:
            record["order"] = self._next_order
            self._next_order += 1
        self._records[key] = record
        return record, True

    def seen(self, key: str) -> bool:
        return key in self._records

    def count_call(self, key: str) -> None:
        self._records[key]["calls"] += 1

    def put(self, key: str, tensor: torch.Tensor, *, ordered: bool = True, note: str = "") -> None:
        """Store the first value of `key` (copied to CPU); later calls only count."""
        record, first = self._record(key, ordered)
        if first:
            self._tensors[key] = _to_cpu(tensor)
            if note:
                record["note"] = note

    def put_error(self, key: str, message: str, *, kind: str = "capture", ordered: bool = True) -> None:
        record, first = self._record(key, ordered)
        if first:
            record["error"], record["error_kind"] = str(message), kind

    # reading
    def keys(self) -> List[str]:
        return list(self._records)

    def has_tensor(self, key: str) -> bool:
        return key in self._tensors or (self._reader is not None and key in self._stored_keys)

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key in self._tensors:
            return self._tensors[key]
        if self._reader is not None and key in self._stored_keys:
            return self._reader.get_tensor(key)
        return None

    def error(self, key: str) -> Optional[str]:
        record = self._records.get(key)
        return None if record is None else record["error"]

    def error_kind(self, key: str) -> Optional[str]:
        record = self._records.get(key)
        return None if record is None else record["error_kind"]

    def note(self, key: str) -> str:
        record = self._records.get(key)
        return "" if record is None else record.get("note", "")

    def calls(self, key: str) -> int:
        record = self._records.get(key)
        return 0 if record is None else record["calls"]

    def order(self, key: str) -> Optional[int]:
        record = self._records.get(key)
        return None if record is None else record["order"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def digest(self) -> str:
        """sha256 over (key, dtype, shape, bytes) of every stored tensor in sorted key order, and every error."""
        sha = hashlib.sha256()
        for key in sorted(self._records):
            tensor = self.get(key)
            sha.update(key.encode())
            if tensor is not None:
                sha.update(f"|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                sha.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                sha.update(f"|error:{self._records[key]['error']}".encode())
        return sha.hexdigest()

    # disk
    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: self.get(key) for key in self._records if self.has_tensor(key)}
        meta = {"side": self.side, "records": self._records, "resolved": self.resolved, "next_order": self._next_order}
        save_file(tensors, str(path), metadata={"parity_captures": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Captures":
        """Open a saved store; tensors are read from disk on `get`, one at a time."""
        path = Path(path)
        reader = safe_open(str(path), framework="pt", device="cpu")
        raw = (reader.metadata() or {}).get("parity_captures")
        if raw is None:
            raise ValueError(f"{path} is not a parity capture file (no 'parity_captures' metadata)")
        meta = json.loads(raw)
        store = cls(meta["side"])
        store._records, store.resolved, store._next_order = meta["records"], meta["resolved"], meta["next_order"]
        store._file, store._reader, store._stored_keys = path, reader, set(reader.keys())
        return store


# ---------------------------------------------------------------------------------------------------------------
# hooks for one side


class _Suppress:
    """While active (a teacher re-run is in progress), every capture hook of the side does nothing."""

    def __init__(self):
        self.depth = 0

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1


def _capture_value(captures: Captures, key: str, take: Take, select: Callable[[], torch.Tensor]) -> None:
    if captures.seen(key):
        captures.count_call(key)
        return
    try:
        captures.put(key, select())
    except CaptureError as err:
        captures.put_error(key, f"{take.kind} take failed: {err}")


def _install_reference(hooks, model, probes, captures: Captures, *, teacher: bool, aliases) -> None:
    for probe in probes:
        try:
            path, module = resolve_module(model, probe.hf, aliases)
        except ProbeResolutionError as err:
            captures.put_error(value_key(probe.name), str(err), kind="unresolved", ordered=False)
            continue
        captures.resolved[probe.name] = path
        _hook_value(hooks, module, probe.name, Take.parse(probe.hf_take), captures, suppress=None)
        if teacher:
            for hf_spec, _ in probe.teacher:
                _hook_teacher_input(hooks, module, probe.name, hf_spec, captures)


def _hook_value(hooks, module, name: str, take: Take, captures: Captures, suppress: Optional[_Suppress],
                whole: Callable[[torch.Tensor], torch.Tensor] = lambda value: value) -> None:
    key = value_key(name)
    if take.kind == "output":

        def on_output(mod, args, kwargs, output):
            if suppress is None or not suppress.depth:
                _capture_value(captures, key, take, lambda: whole(select_output(take, output)))

        hooks.forward(module, on_output)
    else:

        def on_input(mod, args, kwargs):
            if suppress is None or not suppress.depth:
                _capture_value(captures, key, take, lambda: whole(select_input(take, mod, args, kwargs)))

        hooks.pre_forward(module, on_input)


def _hook_teacher_input(hooks, module, name: str, spec: str, captures: Captures) -> None:
    key, take = teacher_input_key(name, spec), Take.parse(spec)

    def on_input(mod, args, kwargs):
        if captures.seen(key):
            captures.count_call(key)
            return
        try:
            captures.put(key, select_input(take, mod, args, kwargs), ordered=False)
        except CaptureError as err:
            captures.put_error(key, str(err), ordered=False)

    hooks.pre_forward(module, on_input)


_PLAIN = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, slice)


def _stateful_arguments(args: tuple, kwargs: dict) -> List[str]:
    """Arguments that are objects with state (e.g. an HF DynamicCache): a re-run would see and change that state."""

    def plain(value) -> bool:
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        if isinstance(value, Mapping):
            return all(plain(v) for v in value.values())
        return isinstance(value, _PLAIN)

    named = [(f"arg {i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    return [f"{name} ({type(value).__name__})" for name, value in named if not plain(value)]


class _TeacherError(Exception):
    def __init__(self, message: str, kind: str = "teacher"):
        super().__init__(message)
        self.kind = kind  # "teacher_shape" when an input could not be substituted for its shape


def _teacher_rerun(probe: Probe, mod, args, kwargs, reference: Captures, suppress: _Suppress) -> Tuple[torch.Tensor, str]:
    """Re-run `mod` with the HF inputs substituted; returns (selected output, notes)."""
    notes = []
    for hf_spec, fms_spec in probe.teacher:
        hf_key = teacher_input_key(probe.name, hf_spec)
        if reference.error(hf_key):
            raise _TeacherError(f"HF {hf_spec} was not captured: {reference.error(hf_key)}")
        hf_value = reference.get(hf_key)
        if hf_value is None:
            raise _TeacherError(f"HF {hf_spec} was never captured (the HF module did not run, or its path did not resolve)")
        fms_take = Take.parse(fms_spec)
        try:
            fms_value = select_input(fms_take, mod, args, kwargs)
        except CaptureError as err:
            raise _TeacherError(f"cannot substitute FMS {fms_spec}: {err}") from None
        if hf_value.shape != fms_value.shape:
            raise _TeacherError(
                f"cannot substitute: HF {hf_spec} has shape {list(hf_value.shape)}, FMS {fms_spec} has shape "
                f"{list(fms_value.shape)}",
                kind="teacher_shape",
            )
        if hf_value.dtype != fms_value.dtype:
            notes.append(f"HF {hf_spec} cast {hf_value.dtype} -> {fms_value.dtype}")
        # always a fresh copy: an in-place op inside the module must not alter the stored HF capture
        fed = hf_value.to(device=fms_value.device, dtype=fms_value.dtype, copy=True)
        args, kwargs = substitute_input(fms_take, mod, args, kwargs, fed)
    stateful = _stateful_arguments(args, kwargs)
    caches = [s for s in stateful if "Cache" in s]
    if caches:  # the cache already holds this layer's keys from the propagated run: the re-run would attend to both
        raise _TeacherError(f"cannot re-run with a KV cache argument ({', '.join(caches)}): capture with use_cache=False")
    if stateful:
        notes.append(f"re-run shares stateful argument(s) {', '.join(stateful)} with the propagated run")
    with suppress, torch.no_grad():
        # through __call__, so the model's own hooks (e.g. a LoRA added to a projection's output) apply as in the
        # propagated run; the harness's hooks are suppressed
        output = mod(*args, **kwargs)
    try:
        return select_output(Take.parse(probe.fms_take), output), "; ".join(notes)
    except CaptureError as err:
        raise _TeacherError(f"teacher-forced output: {err}") from None


def _install_candidate(hooks, model, probes, captures: Captures, *, reference: Optional[Captures], aliases,
                       gather: Optional[Callable[[Probe, torch.Tensor], torch.Tensor]] = None) -> None:
    suppress = _Suppress()
    for probe in probes:
        try:
            path, module = resolve_module(model, probe.fms, aliases)
        except ProbeResolutionError as err:
            captures.put_error(value_key(probe.name), str(err), kind="unresolved", ordered=False)
            continue
        captures.resolved[probe.name] = path
        take = Take.parse(probe.fms_take)
        whole = (lambda value, probe=probe: gather(probe, value)) if gather is not None else (lambda value: value)
        _hook_value(hooks, module, probe.name, take, captures, suppress, whole)
        if reference is not None and probe.teacher and take.kind == "output":
            _hook_teacher_rerun(hooks, module, probe, captures, reference, suppress, whole)


def _hook_teacher_rerun(hooks, module, probe: Probe, captures: Captures, reference: Captures, suppress: _Suppress,
                        whole: Callable[[torch.Tensor], torch.Tensor]):
    key = teacher_output_key(probe.name)

    def on_output(mod, args, kwargs, output):
        if suppress.depth:
            return
        if captures.seen(key):
            captures.count_call(key)
            return
        try:
            value, notes = _teacher_rerun(probe, mod, args, kwargs, reference, suppress)
            captures.put(key, whole(value), ordered=False, note=notes)
        except _TeacherError as err:
            captures.put_error(key, str(err), kind=err.kind, ordered=False)
        except Exception as err:  # the re-run itself failed: recorded, the propagated run goes on
            captures.put_error(key, f"teacher-forced re-run raised {type(err).__name__}: {err}", kind="teacher",
                               ordered=False)

    hooks.forward(module, on_output)


# ---------------------------------------------------------------------------------------------------------------
# the runner


@dataclass
class ModelRun:
    """One side of a comparison: a loaded model or a factory building it, and its inputs (kwargs for model(**inputs),
    or a callable model -> output). `param_bytes` sizes a factory's model for the memory plan."""

    model: Union[torch.nn.Module, Callable[[], torch.nn.Module]]
    inputs: Union[Mapping[str, Any], Callable[[torch.nn.Module], Any]]
    param_bytes: Optional[int] = None
    device: Union[str, torch.device, None] = None
    # candidate side only: makes a value held in shards (tensor parallelism) whole before it is recorded. Every rank
    # runs the same forward and calls it at the same points, so it may run collectives (an all-gather).
    gather: Optional[Callable[[Probe, torch.Tensor], torch.Tensor]] = None

    def __post_init__(self):
        if not (isinstance(self.model, torch.nn.Module) or callable(self.model)):
            raise TypeError(f"ModelRun.model must be an nn.Module or a factory, got {type(self.model).__name__}")
        if not (isinstance(self.inputs, Mapping) or callable(self.inputs)):
            raise TypeError(f"ModelRun.inputs must be a kwargs mapping or a callable, got {type(self.inputs).__name__}")

    @property
    def loaded(self) -> bool:
        return isinstance(self.model, torch.nn.Module)

    def size_bytes(self) -> Optional[int]:
        if self.loaded:
            return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))
        return self.param_bytes


@dataclass(frozen=True)
class PhasePlan:
    two_phase: bool
    reason: str
    needed_bytes: Optional[int] = None
    available_bytes: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_param_bytes(folder: Union[str, Path], dtype: Union[torch.dtype, None] = None) -> int:
    """Bytes the tensors of every *.safetensors file under `folder` take once loaded (in `dtype` when given, else in
    their stored dtype), read from the file headers without loading anything: the size hint for a factory."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}; cannot estimate the model size")
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                piece = reader.get_slice(key)
                numel = 1
                for dim in piece.get_shape():
                    numel *= dim
                stored = _SAFETENSORS_DTYPES.get(piece.get_dtype(), 4)
                total += numel * (torch.empty((), dtype=dtype).element_size() if dtype is not None else stored)
    return total


_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _host_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device: Union[str, torch.device, None]) -> Optional[int]:
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _host_available_bytes()


def plan_phases(hf: ModelRun, fms: ModelRun, phases: str = "auto") -> PhasePlan:
    if phases not in PHASES:
        raise ValueError(f"phases must be one of {PHASES}, got {phases!r}")
    if phases == "one":
        return PhasePlan(False, "requested one phase")
    if phases == "two":
        if hf.loaded:
            raise ValueError("two-phase needs the HF model as a factory (a loaded model cannot be freed between phases)")
        return PhasePlan(True, "requested two phases")
    if hf.loaded:
        return PhasePlan(False, "the HF model was passed loaded, so it cannot be freed; pass a factory to allow two phases")
    hf_bytes, fms_bytes = hf.size_bytes(), fms.size_bytes()
    if hf_bytes is None or (fms_bytes is None and not fms.loaded):
        return PhasePlan(True, "model size unknown (no param_bytes); one model at a time is the safe choice")
    needed = int((hf_bytes + (0 if fms.loaded else fms_bytes)) * MEMORY_HEADROOM)  # a loaded FMS model is already in use
    available = available_bytes(hf.device or fms.device)
    if available is None:
        return PhasePlan(True, "free memory unknown; one model at a time is the safe choice", needed, None)
    two = needed > available
    verdict = "exceeds" if two else "fits in"
    return PhasePlan(two, f"both models x{MEMORY_HEADROOM} ({needed / 2**30:.2f} GiB) {verdict} free memory "
                          f"({available / 2**30:.2f} GiB)", needed, available)


@dataclass
class PairCaptures:
    hf: Captures
    fms: Captures
    mode: str
    plan: PhasePlan
    probes: Tuple[Probe, ...] = field(default_factory=tuple)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.hf.digest()}|{self.fms.digest()}".encode()).hexdigest()


def _check_eval(model: torch.nn.Module, side: str) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"the {side} model has modules in training mode ({training[:3]}...); dropout/batch-norm updates make a "
            "parity run meaningless: call model.eval() first"
        )


def _forward(model: torch.nn.Module, inputs) -> Any:
    with torch.no_grad():
        return inputs(model) if callable(inputs) else model(**inputs)


ON_RAISE = ("raise", "record")


def _check_on_raise(on_raise: str) -> None:
    if on_raise not in ON_RAISE:
        raise ValueError(f"on_raise must be one of {ON_RAISE}, got {on_raise!r}")


def _run_side(model, inputs, side: str, probes, captures: Captures, install, on_raise: str = "raise") -> None:
    """One forward with the probes hooked. With on_raise="record", an exception inside the forward is a finding,
    not the end of the run: it is recorded on the innermost probed module that was running (then on the probes
    around it), and every probe captured before it keeps its value."""
    _check_eval(model, side)
    running: List[Tuple[str, ...]] = []  # the probes of each module entered and not left, outermost first
    with attached_hooks() as hooks:
        install(hooks, model, probes, captures)
        if on_raise == "record":
            _track_running(hooks, model, probes, captures, running)
        try:
            _forward(model, inputs)
        except Exception as err:
            if on_raise != "record":
                raise
            _record_raise(captures, side, err, running)


def _track_running(hooks, model, probes, captures: Captures, running: List[Tuple[str, ...]]) -> None:
    by_path: Dict[str, List[str]] = {}
    for probe in probes:
        if probe.name in captures.resolved:
            by_path.setdefault(captures.resolved[probe.name], []).append(probe.name)

    def track(names: Tuple[str, ...]) -> Tuple[Callable, Callable]:
        def enter(mod, args, kwargs):
            running.append(names)

        def leave(mod, args, kwargs, output):
            # back to this module's latest entry: a call that raised inside it (a teacher re-run whose exception
            # was recorded) left its entries behind
            last = max(i for i, entry in enumerate(running) if entry is names)
            del running[last:]

        return enter, leave

    for path, names in by_path.items():
        enter, leave = track(tuple(names))
        module = model.get_submodule(path) if path else model
        hooks.pre_forward(module, enter)
        hooks.forward(module, leave)


def _record_raise(captures: Captures, side: str, err: Exception, running: List[Tuple[str, ...]]) -> None:
    import traceback

    frame = traceback.extract_tb(err.__traceback__)[-1]
    message = f"{side} raised {type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}: {err}"
    names = [name for entry in reversed(running) for name in entry]  # innermost module first
    innermost = next((name for name in names if not captures.seen(value_key(name))), None)
    for name in names:  # the innermost record comes first in execution order
        if not captures.seen(value_key(name)):
            captures.put_error(value_key(name), message if name == innermost else
                               f"{side} raised inside {innermost}", kind="raised")
    captures.raised = message


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def heap_frozen():
    """Every object alive now (after a collection: imports, loaded libraries) left out of later collections until
    the end: `free_memory` between models then scans only what the run made, a quarter of the time (10 collections:
    1.64 s -> 0.42 s in a compare of 2b's depths, CPU). Unfrozen after, so nothing stays out of the collector."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def capture_model(
    model: torch.nn.Module,
    inputs: Union[Mapping[str, Any], Callable[[torch.nn.Module], Any]],
    probes: Sequence[Probe],
    *,
    side: str = "hf",
    aliases: Sequence[Tuple[str, str]] = (),
    on_raise: str = "raise",
) -> Captures:
    """Record the probes of one model (HF paths/takes with side="hf", FMS ones with side="fms"); no comparison.
    `on_raise="record"`: a raising forward is recorded on the probe it was in (as `capture_pair`)."""
    if side not in ("hf", "fms"):
        raise ValueError(f"side must be 'hf' or 'fms', got {side!r}")
    captures = Captures(side)

    def install(hooks, m, ps, caps):
        if side == "hf":
            _install_reference(hooks, m, ps, caps, teacher=False, aliases=aliases)
        else:
            _install_candidate(hooks, m, ps, caps, reference=None, aliases=aliases)

    _run_side(model, inputs, side.upper(), tuple(probes), captures, install, on_raise=on_raise)
    return captures


def normalize_mode(mode: str) -> str:
    """'propagated' | 'teacher_forced'; accepts the CLI spelling 'teacher-forced'."""
    name = mode.replace("-", "_") if isinstance(mode, str) else mode
    if name not in MODES:
        raise ValueError(f"mode must be one of {MODES} (what is compared; memory scheduling is `phases`), got {mode!r}")
    return name


def capture_pair(
    probes: Sequence[Probe],
    hf: ModelRun,
    fms: ModelRun,
    *,
    mode: str = "propagated",
    phases: str = "auto",
    workdir: Union[str, Path, None] = None,
    hf_aliases: Sequence[Tuple[str, str]] = (),
    fms_aliases: Sequence[Tuple[str, str]] = (),
    on_raise: str = "raise",
) -> PairCaptures:
    """Run HF (the reference) then FMS (the candidate) with the probes hooked; return both capture stores.
    In two-phase runs the HF captures are written to `workdir` (default: a temporary directory) as safetensors.
    `hf_aliases` / `fms_aliases` rewrite probe paths for models whose layout differs from the table's.
    `on_raise="record"`: a side whose forward raises is a finding (status `raised` on the module it was in), not the
    end of the run."""
    mode = normalize_mode(mode)
    _check_on_raise(on_raise)
    plan = plan_phases(hf, fms, phases)
    teacher = mode == "teacher_forced"
    probes = tuple(probes)

    hf_captures = Captures("hf")

    def install_hf(hooks, model, ps, caps):
        _install_reference(hooks, model, ps, caps, teacher=teacher, aliases=hf_aliases)

    if not plan.two_phase:
        hf_model = hf.model if hf.loaded else hf.model()
        fms_model = fms.model if fms.loaded else fms.model()
        _run_side(hf_model, hf.inputs, "HF", probes, hf_captures, install_hf, on_raise)
    else:
        hf_model = hf.model()
        hf_ref = weakref.ref(hf_model)
        _run_side(hf_model, hf.inputs, "HF", probes, hf_captures, install_hf, on_raise)
        del hf_model
        free_memory()
        if hf_ref() is not None:
            raise RuntimeError(
                "two-phase run: the HF model is still referenced after its phase (the factory or the inputs callable "
                "keeps it alive), so it would share memory with the FMS model"
            )
        directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="parity-"))
        hf_captures = Captures.load(hf_captures.save(directory / "hf_captures.safetensors"))
        fms_model = fms.model if fms.loaded else fms.model()

    fms_captures = Captures("fms")

    def install_fms(hooks, model, ps, caps):
        _install_candidate(hooks, model, ps, caps, reference=hf_captures if teacher else None, aliases=fms_aliases,
                           gather=fms.gather)

    _run_side(fms_model, fms.inputs, "FMS", probes, fms_captures, install_fms, on_raise)
    return PairCaptures(hf_captures, fms_captures, mode, plan, probes)


def pair_from_values(rows: Sequence[Tuple[Probe, Any, Any]], *, mode: str = "propagated") -> PairCaptures:
    """Captures of values computed outside hooks (pipeline stages, generation steps): one (probe, reference value,
    candidate value) row per probe, in execution order. A value may be a tensor, or an exception raised while
    computing it (recorded as a capture error naming it), or None (the stage did not run: missing)."""
    hf, fms = Captures("hf"), Captures("fms")
    for probe, reference, candidate in rows:
        for captures, value in ((hf, reference), (fms, candidate)):
            key = value_key(probe.name)
            if isinstance(value, torch.Tensor):
                captures.put(key, value)
            elif isinstance(value, BaseException):
                captures.put_error(key, f"raised {type(value).__name__}: {value}", kind="raised")
            elif value is None:
                captures.put_error(key, "this stage did not run", kind="unresolved")
            else:
                raise TypeError(f"probe {probe.name}: a value must be a tensor, an exception or None, got "
                                f"{type(value).__name__}")
    plan = PhasePlan(False, "values computed outside hooks")
    return PairCaptures(hf, fms, normalize_mode(mode), plan, tuple(row[0] for row in rows))


class ReferenceMismatch(ValueError):
    """Reference captures that do not belong to this run (another checkpoint, other inputs or mode, no fingerprint):
    the user's input is wrong, not the candidate."""


def capture_against(probes: Sequence[Probe], reference: Captures, fms: ModelRun, *, mode: str = "propagated",
                    fms_aliases: Sequence[Tuple[str, str]] = (), on_raise: str = "raise") -> PairCaptures:
    """The candidate run against reference captures recorded earlier, in another process or on another machine
    (`save_capture_sets` / `load_capture_sets`): the reference model is never loaded here."""
    mode = normalize_mode(mode)
    _check_on_raise(on_raise)
    if mode == "teacher_forced" and not any("#tf_input:" in key for key in reference.keys()):
        raise ReferenceMismatch("teacher-forced comparison needs reference captures recorded in teacher-forced "
                                "mode (they hold the inputs each module is re-run on); these were recorded "
                                "propagated: save them again with --mode teacher-forced, or compare --mode propagated")
    probes = tuple(probes)
    fms_captures = Captures("fms")

    def install(hooks, model, ps, caps):
        _install_candidate(hooks, model, ps, caps, reference=reference if mode == "teacher_forced" else None,
                           aliases=fms_aliases, gather=fms.gather)

    model = fms.model if fms.loaded else fms.model()
    _run_side(model, fms.inputs, "FMS", probes, fms_captures, install, on_raise)
    return PairCaptures(reference, fms_captures, mode, PhasePlan(False, "reference captures read from disk"), probes)


def save_capture_sets(path: Union[str, Path], sets: Mapping[str, Captures],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Several named capture stores of one side in one safetensors file (keys prefixed by the store's position);
    `metadata`: more string entries for the file's header (`parity.store` writes its fingerprint there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, index = {}, []
    for position, (name, store) in enumerate(sets.items()):
        for key in store.keys():
            if store.has_tensor(key):
                tensors[f"{position}|{key}"] = store.get(key).contiguous()
        index.append({"name": name, "side": store.side, "records": store._records, "resolved": store.resolved,
                      "next_order": store._next_order})
    sides = {store.side for store in sets.values()}
    meta = {"side": sides.pop() if len(sides) == 1 else "mixed", "sets": index}
    save_file(tensors, str(path), metadata={**(metadata or {}), "parity_captures": json.dumps(meta)})
    return path


def load_capture_sets(path: Union[str, Path]) -> Dict[str, Captures]:
    """The stores written by `save_capture_sets`, by name (tensors read into memory)."""
    reader = safe_open(str(path), framework="pt", device="cpu")
    raw = (reader.metadata() or {}).get("parity_captures")
    meta = json.loads(raw) if raw else {}
    if "sets" not in meta:
        raise ValueError(f"{path} holds no named capture sets (not written by save_capture_sets)")
    stored = set(reader.keys())
    out = {}
    for position, entry in enumerate(meta["sets"]):
        store = Captures(entry["side"])
        store._records, store.resolved, store._next_order = entry["records"], entry["resolved"], entry["next_order"]
        for key in store._records:
            if f"{position}|{key}" in stored:
                store._tensors[key] = reader.get_tensor(f"{position}|{key}")
        out[entry["name"]] = store
    return out
