"""Which precision-sensitive ops each side runs in 16 bits, and where: the upcast audit.

A missing fp32 upcast (a softmax, a norm's statistics computed in bf16) adds about one 16-bit rounding: on random
weights that is below what a value comparison can tell from noise. It is plain as an op, though: the candidate runs
`softmax` or `mean` on a bf16 tensor where the reference runs none. The audit records, during one forward, each
sensitive op whose input is 16-bit and that does not upcast itself (`dtype=`), under the innermost named module that
was running; `missing_upcasts` lists what the candidate runs in 16 bits at a place where the reference does not.
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Set

import torch
from torch.overrides import TorchFunctionMode

from parity.hooks import attached_hooks

# reductions whose 16-bit evaluation loses accuracy (softmax normalisers, means and variances of norms)
SENSITIVE_OPS = ("softmax", "log_softmax", "mean", "var", "std", "var_mean", "rsqrt")
LOW_PRECISION = (torch.float16, torch.bfloat16)
OUTSIDE = ""  # the place of an op run outside every named module


class _Audit(TorchFunctionMode):
    def __init__(self, place: Callable[[], str], seen: Dict[str, Set[str]]):
        super().__init__()
        self.place, self.seen = place, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SENSITIVE_OPS and args and isinstance(args[0], torch.Tensor):
            dtype = args[0].dtype
            if dtype in LOW_PRECISION and kwargs.get("dtype") not in (torch.float32, torch.float64):
                self.seen.setdefault(self.place(), set()).add(f"{name} in {str(dtype).removeprefix('torch.')}")
        return func(*args, **kwargs)


@contextmanager
def audit_ops(model: Optional[torch.nn.Module] = None, places: Optional[Mapping[str, str]] = None,
              place: Optional[Callable[[], str]] = None) -> Iterator[Dict[str, Set[str]]]:
    """Record 16-bit sensitive ops while the block runs: {place: {"softmax in bfloat16", ...}}. The place is the
    innermost running module of `places` (module path in `model` -> place name), or `place()` when given."""
    seen: Dict[str, Set[str]] = {}
    running: List[str] = []
    with attached_hooks() as hooks:
        for path, name in (places or {}).items():
            module = model.get_submodule(path) if path else model

            def enter(mod, args, kwargs, name=name):
                running.append(name)

            def leave(mod, args, kwargs, output, name=name):
                del running[len(running) - 1 - running[::-1].index(name):]

            hooks.pre_forward(module, enter)
            hooks.forward(module, leave)
        where = place or (lambda: running[-1] if running else OUTSIDE)
        with _Audit(where, seen):
            yield seen


def missing_upcasts(reference: Mapping[str, Set[str]], candidate: Mapping[str, Set[str]],
                    reference_place: Callable[[str], str] = lambda place: place) -> Dict[str, List[str]]:
    """{place: ops the candidate runs in 16 bits there and the reference does not at `reference_place(place)`}."""
    found = {}
    for place, ops in candidate.items():
        extra = sorted(ops - set(reference.get(reference_place(place), ())))
        if extra:
            found[place] = extra
    return found
