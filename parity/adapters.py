"""Output adapters: map a captured tensor into the space it is compared in, named by a typeable spec string.

A spec is `name` or `name(arg, ...)`, chained left to right with `|`:
    "identity"
    "div_logits_scaling(8.0)"                      HF >= 5.10.1 returns raw lm_head logits; FMS divides by 8
    "qkv_split(q, 32, 8, 64) | rope_interleaved_to_halves(64)"
The spec string is what the report shows, so every transformation applied before a comparison is visible.
"""

import re
from typing import Callable, Dict, Tuple

import torch

Adapter = Callable[[torch.Tensor], torch.Tensor]

_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def _identity() -> Adapter:
    return lambda t: t


def _div_logits_scaling(scaling: float) -> Adapter:
    if not scaling > 0:
        raise ValueError(f"div_logits_scaling needs a positive logits_scaling, got {scaling!r}")
    return lambda t: t / scaling


def _mul(factor: float) -> Adapter:
    return lambda t: t * factor


def _qkv_split(part: str, nheads: int, kvheads: int, head_dim: int) -> Adapter:
    """FMS fused projection output [..., (nheads + 2*kvheads) * head_dim] -> the q, k or v slice."""
    sizes = {"q": nheads * head_dim, "k": kvheads * head_dim, "v": kvheads * head_dim}
    if part not in sizes:
        raise ValueError(f"qkv_split part must be q, k or v, got {part!r}")
    start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[part]
    total = sum(sizes.values())

    def split(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != total:
            raise ValueError(
                f"qkv_split({part}, {nheads}, {kvheads}, {head_dim}) expects a last dim of {total}, "
                f"got shape {list(t.shape)}"
            )
        return t[..., start : start + sizes[part]]

    return split


def _rope_permute(head_dim: int, to_halves: bool) -> Adapter:
    """FMS rotates interleaved pairs (x0, y0, x1, y1, ...) per head; HF rotates halves (x0, x1, ..., y0, y1, ...).
    FMS's checkpoint adapter permutes q/k rows accordingly, so q/k projection outputs differ by this permutation."""
    if head_dim % 2:
        raise ValueError(f"RoPE permutation needs an even head_dim, got {head_dim}")

    def permute(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] % head_dim:
            raise ValueError(f"last dim {t.shape[-1]} is not a multiple of head_dim {head_dim}")
        heads = t.shape[-1] // head_dim
        lead = t.shape[:-1]
        if to_halves:  # [.., H, Dh/2, 2] -> [.., H, 2, Dh/2]
            out = t.reshape(*lead, heads, head_dim // 2, 2).transpose(-1, -2)
        else:  # [.., H, 2, Dh/2] -> [.., H, Dh/2, 2]
            out = t.reshape(*lead, heads, 2, head_dim // 2).transpose(-1, -2)
        return out.reshape(*lead, heads * head_dim)

    return permute


def _feature_slice(start: int, stop: int) -> Adapter:
    """Columns [start, stop) of the last dim: one part of a tensor concatenated on the feature axis."""
    if not 0 <= start < stop:
        raise ValueError(f"feature_slice needs 0 <= start < stop, got ({start}, {stop})")

    def take(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] < stop:
            raise ValueError(f"feature_slice({start}, {stop}) needs a last dim >= {stop}, got shape {list(t.shape)}")
        return t[..., start:stop]

    return take


ADAPTERS: Dict[str, Callable[..., Adapter]] = {
    "feature_slice": _feature_slice,
    "identity": _identity,
    "div_logits_scaling": _div_logits_scaling,
    "mul": _mul,
    "qkv_split": _qkv_split,
    "rope_interleaved_to_halves": lambda head_dim: _rope_permute(head_dim, to_halves=True),
    "rope_halves_to_interleaved": lambda head_dim: _rope_permute(head_dim, to_halves=False),
}


def _parse_arg(text: str):
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if not re.fullmatch(r"[A-Za-z_]\w*", text):
        raise ValueError(f"adapter argument {text!r} is neither a number nor a bare name")
    return text


def parse_adapter_spec(spec: str) -> Tuple[Tuple[str, tuple], ...]:
    """'a(1) | b' -> (('a', (1,)), ('b', ())); raises ValueError naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an adapter spec must be a non-empty string, got {spec!r}")
    steps = []
    for part in spec.split("|"):
        match = _CALL.match(part)
        if not match:
            raise ValueError(f"cannot parse adapter step {part.strip()!r} in {spec!r}; expected name or name(args)")
        name, args = match.group(1), match.group(2)
        if name not in ADAPTERS:
            raise ValueError(f"unknown adapter {name!r} in {spec!r}; known: {sorted(ADAPTERS)}")
        parsed = tuple(_parse_arg(a) for a in args.split(",")) if args and args.strip() else ()
        steps.append((name, parsed))
    return tuple(steps)


def build_adapter(spec: str) -> Adapter:
    steps = []
    for name, args in parse_adapter_spec(spec):
        try:
            steps.append(ADAPTERS[name](*args))
        except TypeError as err:
            raise ValueError(f"adapter {name!r} in {spec!r} got arguments {args}: {err}") from None

    def apply(t: torch.Tensor) -> torch.Tensor:
        for step in steps:
            t = step(t)
        return t

    return apply
