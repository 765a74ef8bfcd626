"""The weight-coverage audit run on the safetensors headers, before a single weight is read.

FMS reads every tensor before the model's `post_init` runs the coverage audit, so a checkpoint of the wrong shapes,
with a tensor missing, of another family member, or holding integer tensors was reported (or, for integers, silently
cast) only after the whole load. The headers give every tensor's name, dtype and shape without reading it: here
they become meta tensors, go through the architecture's own adapter steps (the same names, RoPE permutation and
fusion as a load, the same shape check and ledger) into a model built on the meta device, and the member's own audit
judges the result. Nothing is read but the headers (a few KB per file) and nothing is allocated.

The values themselves (NaN / Inf) are checked as they are loaded, by the adapters' ledger step
(`coverage.check_finite`): reading them here would read the checkpoint twice.
"""

from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch

from granite_speech.checkpoint import coverage
from granite_speech.checkpoint.coverage import CheckpointCoverageError

# safetensors dtype names -> torch dtypes of weights that can be loaded (cast to the model dtype as FMS casts them)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class CheckpointDtypeError(CheckpointCoverageError):
    """A weight tensor stored as integers or booleans where the model holds floating-point weights."""


def read_headers(files: List[Path]) -> Dict[str, Tuple[str, Tuple[int, ...], Path]]:
    """Every tensor of the safetensors `files`: name -> (safetensors dtype, shape, file), from the headers only."""
    from safetensors import safe_open

    headers = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                headers[key] = (view.get_dtype(), tuple(view.get_shape()), path)
    return headers


def check_dtypes(headers: Dict[str, Tuple[str, Tuple[int, ...], Path]]) -> None:
    """Integer or boolean weights would be cast to floats silently (an int8 / uint8 quantised export, a mislabelled
    file): refuse them, naming each. `num_batches_tracked` (an int64 counter eval BatchNorm never reads) is exempt."""
    wrong = sorted(f"{key} ({dtype}, in {path.name})" for key, (dtype, _, path) in headers.items()
                   if dtype not in FLOAT_DTYPES and not coverage.SKIPPED.search(key))
    if wrong:
        raise CheckpointDtypeError(
            f"{len(wrong)} weight tensor(s) are not floating point: {', '.join(wrong[:5])}"
            f"{' ...' if len(wrong) > 5 else ''}; expected {', '.join(FLOAT_DTYPES)} (quantised checkpoints are not "
            "supported)"
        )


# architecture -> (its weight-coverage audit, the cleanup after auditing a meta model), for members whose audit is
# not `coverage.audit_loaded_checkpoint`: registered by the member's module (the CTC member: granite_speech.ctc5)
MEMBER_AUDITS: Dict[str, Tuple[Callable[[torch.nn.Module], None], Callable[[torch.nn.Module], None]]] = {}


def check_headers_cover_model(architecture: str, variant: str, source: str, extra_args: dict,
                              files: List[Union[str, Path]]) -> None:
    """Raise CheckpointCoverageError (CheckpointDtypeError for integer weights) unless the headers of `files` fill
    the model FMS will build from (architecture, variant, extra_args) exactly, with the right shapes."""
    from fms.models import _get_model_instance
    from fms.utils import serialization

    headers = read_headers([Path(f) for f in files])
    check_dtypes(headers)
    model = _get_model_instance(architecture, variant, device=torch.device("meta"), extra_args=dict(extra_args))
    state = {}
    for key, (dtype, shape, _) in headers.items():
        state[key] = torch.empty(shape, dtype=FLOAT_DTYPES.get(dtype, torch.int64), device="meta")
    adapter = serialization._get_adapter(architecture, source)
    audit, cleanup = MEMBER_AUDITS.get(architecture, (coverage.audit_loaded_checkpoint, lambda model: None))
    try:
        adapter(state, model_config=model.config)
        audit(model)
    finally:
        coverage.close_ledger(model)  # a meta model's ledger (and a CTC model's BatchNorm stash) must not linger
        cleanup(model)
