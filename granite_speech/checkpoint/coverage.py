"""The weight-coverage audit: every checkpoint tensor consumed exactly once, every model tensor loaded.

FMS loads a checkpoint in partial state dicts through the registered adapter steps and gives each step only
`model_config`. The model opens a ledger for its config when it is built (`open_ledger`); the `coverage_ledger`
step checks shapes against the model and records each key handed over; `GraniteSpeech.post_init` closes the
ledger with `audit_loaded_checkpoint`. Ledgers live here, keyed by the config object, not inside the config.
"""

import re
import weakref
from typing import Dict, List, Optional

import torch

SKIPPED = re.compile(r"\.num_batches_tracked$")  # eval BatchNorm never reads it


class CheckpointCoverageError(ValueError):
    """The checkpoint does not cover the model exactly: missing, extra or duplicated tensors, or wrong shapes."""


class _Ledger:
    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)
        self.keys: List[str] = []
        self.used = False  # a load went through the adapter (randomly initialised models have nothing to audit)
        self._shapes: Optional[Dict[str, tuple]] = None

    def shapes(self) -> Dict[str, tuple]:
        if self._shapes is None:
            model = self.model()
            self._shapes = {} if model is None else {k: tuple(v.shape) for k, v in _unsharded(model).state_dict().items()}
        return self._shapes


def _unsharded(model: torch.nn.Module) -> torch.nn.Module:
    """The model as its checkpoint describes it. A tensor-parallel model holds this rank's shards while the adapter
    steps see full tensors (FMS shards them after the steps), so their shapes come from an unsharded copy on the
    meta device."""
    from fms.distributed.strategy import TensorParallelStrategy

    if not isinstance(getattr(model, "distributed_strategy", None), TensorParallelStrategy):
        return model
    with torch.device("meta"):
        full = type(model)(model.config)
    _LEDGERS.pop(id(full.config), None)
    return full


_LEDGERS: Dict[int, _Ledger] = {}


def open_ledger(model: torch.nn.Module) -> None:
    """Called by the model's constructor: the adapter steps of a load into `model` record into this ledger."""
    _LEDGERS[id(model.config)] = _Ledger(model)


def _ledger(model_config) -> Optional[_Ledger]:
    ledger = _LEDGERS.get(id(model_config))
    if ledger is None or ledger.model() is None or ledger.model().config is not model_config:
        return None
    return ledger


def record(model_config, keys) -> None:
    """Note keys handed to the model (or set aside) during a load."""
    ledger = _ledger(model_config)
    if ledger is not None:
        ledger.used = True
        ledger.keys.extend(keys)


class CheckpointValuesError(CheckpointCoverageError):
    """A weight tensor holds NaN or Inf: the checkpoint is damaged (or saved from a diverged run)."""


def check_finite(state_dict) -> None:
    """Every floating-point tensor handed to the model is finite; raises naming the first that is not. Runs in the
    ledger step, on tensors FMS has just read (one reduction per tensor over memory already in cache; its cost
    against the load is measured in results/bad-inputs/README.md)."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.is_meta or not value.is_floating_point():
            continue
        # a NaN or Inf always makes the sum non-finite; one reduction is ~30x faster than isfinite().all() on the
        # CPU (results/bad-inputs/README.md), and the exact test runs only when the sum is not finite (or overflowed)
        if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
            bad = ~torch.isfinite(value)
            first = [int(i) for i in bad.nonzero()[0]]
            raise CheckpointValuesError(
                f"tensor {key} (FMS name) holds {int(bad.sum())} NaN/Inf value(s), the first at index {first}; "
                f"expected finite weights (is the checkpoint damaged, or saved from a diverged run?)")


def check_shapes(model_config, state_dict) -> None:
    """FMS's copy reports a bare size mismatch without the tensor's name: check here, before it copies. Also the
    values' finiteness (`check_finite`): this is the one step every member's ledger runs on the loaded tensors."""
    ledger = _ledger(model_config)
    if ledger is None:
        return
    check_finite(state_dict)
    expected = ledger.shapes()
    wrong = sorted(
        f"{k}: checkpoint {list(v.shape)}, model {list(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    if wrong:
        raise CheckpointCoverageError(
            "shape mismatch between the checkpoint and the model built from its config.json (are the config's "
            "dimensions those of the weights?):\n- " + "\n- ".join(wrong)
        )


def close_ledger(model: torch.nn.Module) -> Optional[Dict[str, int]]:
    """Close the model's ledger: checkpoint key -> times consumed, or None when the model was not loaded through
    an adapter (a randomly initialised model has nothing to audit)."""
    ledger = _LEDGERS.pop(id(model.config), None)
    if ledger is None or ledger.model() is not model or not ledger.used:
        return None
    seen: Dict[str, int] = {}
    for key in ledger.keys:
        seen[key] = seen.get(key, 0) + 1
    return seen


def coverage_problems(seen: Dict[str, int], model: torch.nn.Module, optional=()) -> List[str]:
    """What is missing, extra or consumed twice; `optional` keys (a tied head) may be present or not."""
    required = {k for k in model.state_dict().keys() if not SKIPPED.search(k)} - set(optional)
    loaded = set(seen) - set(optional)
    problems = []
    missing = sorted(required - loaded)
    extra = sorted(loaded - required)
    duplicated = sorted(k for k, n in seen.items() if n > 1)
    if missing:
        problems.append(f"{len(missing)} model tensors missing from the checkpoint: {missing}")
    if extra:
        orphans = [k for k in extra if k.startswith("lora.")]
        hint = (
            f" ({len(orphans)} are LoRA tensors with no matching decoder projection or adapter_config target)"
            if orphans
            else ""
        )
        problems.append(f"{len(extra)} checkpoint tensors the model has no place for{hint}: {extra}")
    if duplicated:
        problems.append(f"checkpoint tensors consumed more than once: {duplicated}")
    return problems


def raise_problems(problems: List[str]) -> None:
    if problems:
        raise CheckpointCoverageError("checkpoint does not match the model:\n- " + "\n- ".join(problems))


def audit_loaded_checkpoint(model: torch.nn.Module) -> None:
    """Close the model's ledger; raise listing the keys unless the checkpoint covered the model exactly.
    A model that was not loaded through the adapter has nothing to audit."""
    seen = close_ledger(model)
    if seen is None:
        return
    # a tied head is tied in post_init; checkpoints of tied models carry only the embedding (an explicit copy is ok)
    optional = {"language_model.head.weight"} if model.config.text_config.tie_heads else set()
    problems = coverage_problems(seen, model, optional)
    if model.lora is not None:
        expected = model.lora.pair_count()
        pairs = len({k.rsplit(".", 2)[0] for k in seen if k.startswith("lora.") and k.endswith("lora_B.weight")})
        if pairs != expected:
            problems.append(f"expected {expected} LoRA pairs (layers x targets), found {pairs}")
    raise_problems(problems)
