"""Attach forward hooks / pre-hooks to modules for the duration of a `with` block, and prove none are left behind.

Every hook function the harness installs is tagged, so `assert_no_hooks` can tell our hooks from a model's own
(transformers 4.57 and 5.x install several forward hooks of their own at construction).
"""

from contextlib import contextmanager
from typing import Callable, Iterator, List

import torch

_TAG = "__parity_hook__"


def _tagged(fn: Callable) -> Callable:
    def hook(*args, **kwargs):
        return fn(*args, **kwargs)

    setattr(hook, _TAG, True)
    return hook


class HookSet:
    """Handles of hooks registered through it; `remove_all` removes every one (idempotent)."""

    def __init__(self):
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs, output) after forward; its return value is ignored (the output is never replaced)."""

        def observe(mod, args, kwargs, output):
            fn(mod, args, kwargs, output)
            return None

        self._handles.append(module.register_forward_hook(_tagged(observe), with_kwargs=True))

    def pre_forward(self, module: torch.nn.Module, fn: Callable) -> None:
        """fn(module, args, kwargs) before forward; inputs are never replaced."""

        def observe(mod, args, kwargs):
            fn(mod, args, kwargs)
            return None

        self._handles.append(module.register_forward_pre_hook(_tagged(observe), with_kwargs=True))

    def __len__(self) -> int:
        return len(self._handles)

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()


@contextmanager
def attached_hooks() -> Iterator[HookSet]:
    """`with attached_hooks() as hooks: hooks.forward(module, fn); model(...)` -- every hook registered through
    `hooks` is removed on every exit path, exceptions included."""
    hooks = HookSet()
    try:
        yield hooks
    finally:
        hooks.remove_all()


def _hook_dicts(module: torch.nn.Module):
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        yield attr, getattr(module, attr, {}) or {}


def leftover_hooks(model: torch.nn.Module, *, ours_only: bool = True) -> List[str]:
    """'path: kind' for each hook still attached under `model` (only the harness's own unless ours_only=False)."""
    found = []
    for path, module in model.named_modules():
        for attr, hooks in _hook_dicts(module):
            for fn in hooks.values():
                if not ours_only or getattr(fn, _TAG, False):
                    found.append(f"{path or '<root>'}: {attr}")
    return found


def assert_no_hooks(model: torch.nn.Module, *, ours_only: bool = True) -> None:
    """Raise AssertionError listing every parity hook left on `model` (any hook at all with ours_only=False)."""
    left = leftover_hooks(model, ours_only=ours_only)
    if left:
        raise AssertionError(f"{len(left)} hook(s) left attached: {left[:10]}{' ...' if len(left) > 10 else ''}")
