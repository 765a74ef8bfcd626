"""The probe map as data: which HF module is compared with which FMS module, what to take from each, how to adapt it.

A `Probe` is one row. Tables are tuples of rows and `Repeat` groups whose `{i}` / `{l}` placeholders expand from the
model's dimensions; adding a probe is one line, a new model family is a new table. A reference path may be
written in one layout and resolved against another through `aliases` (`resolve_module`); the tables themselves live
with the glue of each model family (e.g. `parity.granite.probes`), never here.

Take specs (what a hook records):
    output            the module output; must be a tensor
    output[0]         element 0 of a tuple/list output (or the first field of a mapping, e.g. a ModelOutput)
    output[0?]        element 0 if the output is a tuple/list, else the tensor itself (versions differ: HF 4.57
                      decoder layers return a 1-tuple, 5.x a tensor; FMS GraniteBlock returns (x, cache) with use_cache)
    output.logits     an attribute / key of the output (ModelOutput)
    input[0]          the first parameter of forward(), passed positionally or by keyword
    input.name        the parameter `name` of forward(), passed by keyword or positionally
"""

import re
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from parity.adapters import parse_adapter_spec
from parity.tolerances import TOLERANCE_CLASSES

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-{}]*$")
_TAKE = re.compile(r"^(output|input)(?:\[(\d+)(\?)?\]|\.([A-Za-z_]\w*))?$")


@dataclass(frozen=True)
class Take:
    kind: str  # "output" | "input"
    key: Union[int, str, None] = None
    optional_index: bool = False  # output[0?]

    @classmethod
    def parse(cls, spec: str) -> "Take":
        match = _TAKE.match(spec.strip()) if isinstance(spec, str) else None
        if not match:
            raise ValueError(
                f"cannot parse take spec {spec!r}; expected output, output[N], output[N?], output.name, input[N] "
                "or input.name"
            )
        kind, index, optional, attr = match.groups()
        if kind == "input" and index is None and attr is None:
            raise ValueError(f"take spec {spec!r} must say which input: input[N] or input.name")
        if kind == "input" and optional:
            raise ValueError(f"take spec {spec!r}: [N?] applies to outputs only")
        key = int(index) if index is not None else attr
        return cls(kind, key, bool(optional))


@dataclass(frozen=True)
class Probe:
    name: str  # stable, typeable: encoder.block.3.attn
    hf: str  # reference (HF) module path ("" = the whole model)
    fms: str  # candidate (FMS) module path (plain get_submodule path)
    hf_take: str = "output"
    fms_take: str = "output"
    hf_adapter: str = "identity"
    fms_adapter: str = "identity"
    tolerance_class: str = "activation"
    # teacher-forced mode: (hf input spec, fms input spec) pairs; the FMS module is re-run with each fms input
    # replaced by the HF module's captured one. () = cannot be teacher-forced (the note says why).
    teacher: Tuple[Tuple[str, str], ...] = (("input[0]", "input[0]"),)
    note: str = ""
    # name of a validity mask (given to diff_captures) over the leading dims of this probe's tensor; "" = all valid
    valid: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"probe name {self.name!r} must match {_NAME.pattern} (typeable on a command line)")
        for field_name in ("hf", "fms"):
            if not isinstance(getattr(self, field_name), str):
                raise TypeError(f"probe {self.name}: {field_name} path must be a string, got {getattr(self, field_name)!r}")
        Take.parse(self.hf_take)
        Take.parse(self.fms_take)
        parse_adapter_spec(self.hf_adapter)
        parse_adapter_spec(self.fms_adapter)
        if self.tolerance_class not in TOLERANCE_CLASSES:
            raise ValueError(f"probe {self.name}: tolerance_class {self.tolerance_class!r} not in {TOLERANCE_CLASSES}")
        if self.teacher and Take.parse(self.fms_take).kind == "input":
            raise ValueError(f"probe {self.name}: an input probe cannot be teacher-forced; set teacher=()")
        for pair in self.teacher:
            if len(pair) != 2 or any(Take.parse(spec).kind != "input" for spec in pair):
                raise ValueError(f"probe {self.name}: teacher pairs must be (hf input spec, fms input spec), got {pair!r}")


@dataclass(frozen=True)
class Repeat:
    """Rows expanded for var in range(start, stop); start/stop are ints or names of dimensions."""

    var: str
    start: Union[int, str]
    stop: Union[int, str]
    rows: Tuple[Probe, ...]


TableEntry = Union[Probe, Repeat]


def _bound(value: Union[int, str], dims: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    if value not in dims:
        raise ValueError(f"probe table needs dimension {value!r}; got {sorted(dims)}")
    return int(dims[value])


def _fill(row: Probe, var: str, index: int) -> Probe:
    token = "{" + var + "}"
    return replace(row, **{f: getattr(row, f).replace(token, str(index)) for f in ("name", "hf", "fms", "note")})


def expand(table: Iterable[TableEntry], dims: Mapping[str, int]) -> Tuple[Probe, ...]:
    """Flatten a table into concrete probes in execution order; rejects duplicate names and unfilled placeholders."""
    probes = []
    for entry in table:
        if isinstance(entry, Probe):
            probes.append(entry)
        elif isinstance(entry, Repeat):
            for index in range(_bound(entry.start, dims), _bound(entry.stop, dims)):
                probes.extend(_fill(row, entry.var, index) for row in entry.rows)
        else:
            raise TypeError(f"a probe table holds Probe and Repeat entries, got {type(entry).__name__}")
    seen = set()
    for probe in probes:
        if "{" in probe.name + probe.hf + probe.fms:
            raise ValueError(f"probe {probe.name!r} has an unfilled placeholder ({probe.hf!r} / {probe.fms!r})")
        if probe.name in seen:
            raise ValueError(f"duplicate probe name {probe.name!r}")
        seen.add(probe.name)
    return tuple(probes)


# ---------------------------------------------------------------------------------------------------------------
# resolving paths

class ProbeResolutionError(LookupError):
    pass


def _rewrite(path: str, old: str, new: str) -> Optional[str]:
    if path == old:
        return new
    if path.startswith(old + "."):
        return new + path[len(old) :]
    return None


def candidate_paths(path: str, aliases: Sequence[Tuple[str, str]] = ()) -> Tuple[str, ...]:
    """The path itself, then each alias rewrite of it."""
    found = [path]
    for old, new in aliases:
        rewritten = _rewrite(path, old, new)
        if rewritten is not None and rewritten not in found:
            found.append(rewritten)
    return tuple(found)


def resolve_module(
    model: torch.nn.Module, path: str, aliases: Sequence[Tuple[str, str]] = ()
) -> Tuple[str, torch.nn.Module]:
    """(resolved path, module): the first candidate path that exists on `model`."""
    tried = candidate_paths(path, aliases)
    for candidate in tried:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ProbeResolutionError(f"no module at {path!r} on {type(model).__name__} (tried {list(tried)})")
