"""Split-K GEMV for the decode step's few rows: `splitk_linear(x, weight, bias)` = `F.linear` for M <= MAX_ROWS rows.

A decode step multiplies a handful of rows (the batch) by every decoder weight: memory-bound, so its floor is the
weight bytes over the card's copy bandwidth. cuBLAS picks tall GEMM tiles for these skinny shapes and reached about
71% of copy bandwidth on the 2b step (BENCHMARKS.md). Here each program reads a BLOCK_N x BLOCK_K tile of the weight
once, for every row at once, over one of SPLIT_K slices of K, and writes an fp32 partial sum; the partials are then
summed in fp32 (a fixed order: the result is deterministic, unlike atomic adds), the bias added in fp32, and the sum
rounded once to the input's dtype, as cuBLAS's fp32 accumulation does.

CUDA only in use (Triton); the tests run the same kernel on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1` when this module is imported). The fast path uses it with `StaticGenerator(gemv="splitk")`
(cuBLAS stays the default until the card's figures say otherwise): `suites/bench/test_gemv_benchmarks.py` times it
against `F.linear` per decode GEMM shape of 2b and 8b, `test_benchmarks.py::test_decode` (`fast_splitk`) end to end.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_ROWS = 8  # the decode batches it is meant for (batch 1..8); larger batches are GEMMs cuBLAS handles well


@triton.jit
def _partial_sums(x_ptr, w_ptr, out_ptr, M, N, K, K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, m, n] = sum over this split's K of x[m, k] * w[n, k], in fp32."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = split * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = k_first + k0 + tl.arange(0, BLOCK_K)
        k_in = (ks < K) & (ks < k_first + K_PER_SPLIT)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & k_in[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(out_ptr + split * M * N + rows[:, None] * N + cols[None, :], acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def default_split_k(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Enough K slices that the grid fills the card about twice over, and no slice shorter than one K block."""
    programs_wanted = 2 * (torch.cuda.get_device_properties(device).multi_processor_count
                           if device.type == "cuda" else 4)
    column_blocks = triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(k, block_k), triton.cdiv(programs_wanted, column_blocks)))


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  split_k: Optional[int] = None, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] holding at most MAX_ROWS rows and a contiguous weight [N, K]."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight [{n}, {k}] expects {k}")
    rows = x.reshape(-1, k)
    m = rows.size(0)
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"splitk_linear is for 1..{MAX_ROWS} rows (decode steps), got {m}; use F.linear")
    if not weight.is_contiguous() or x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"need a contiguous weight of x's dtype and device: weight {weight.dtype} on {weight.device} "
                         f"(contiguous: {weight.is_contiguous()}), x {x.dtype} on {x.device}")
    split_k = split_k or default_split_k(n, k, block_n, block_k, weight.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty slice
    partials = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    _partial_sums[grid](rows.contiguous(), weight, partials, m, n, k, K_PER_SPLIT=k_per_split,
                        BLOCK_M=max(2, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k)
    out = partials.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
