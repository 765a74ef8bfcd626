"""Tensor-parallel `compare` (`torchrun --nproc-per-node N -m parity.granite compare --tp N`).

Every rank runs the whole job: the HF reference (replicated, so teacher-forced inputs are the same on every rank),
the FMS model sharded by FMS's TensorParallelStrategy (decoder attention heads and MLP columns; the encoder and the
projector replicated), the same probes in the same order. Probe values an FMS module holds in shards are all-gathered
at capture time; rank 0 writes the report.
"""

import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from parity.probes import Probe

# FMS TP modules whose probed output stays sharded: the fused QKV projection of TPMultiHeadAttention (column
# parallel, split into contiguous per-rank blocks of heads). Row-parallel outputs (attention `dense`, MLP `w2`) and
# whole blocks are all-reduced by FMS, so they are already whole.
SHARDED_OUTPUTS = (".attn.in_proj",)


def launched_ranks() -> int:
    """The world size torchrun set for this process (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA); this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_writer() -> bool:
    """Only rank 0 prints the verdict and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def gather_shards(probe: Probe, value: torch.Tensor) -> torch.Tensor:
    """`ModelRun.gather` of a tensor-parallel FMS model: a probe on a sharded output gets every rank's heads,
    concatenated in rank order along the feature dimension; any other value is already whole."""
    if not probe.fms.endswith(SHARDED_OUTPUTS):
        return value
    value = value.contiguous()
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value)
    return torch.cat(parts, dim=-1)


def tp_gather() -> Optional[Callable[[Probe, torch.Tensor], torch.Tensor]]:
    """The gather of this process's FMS models: `gather_shards` under tensor parallelism, else None."""
    return gather_shards if dist.is_initialized() and dist.get_world_size() > 1 else None
