"""The judge's own cost: `parity.diff.compare` per tensor pair, at the sizes `compare` judges (a tiny probe, a 2b
decoder hidden state [1, 330, 2048]), with the dtype's table, with and without a validity mask. A 2b `compare` judges
about 7,300 pairs (results/gpu-h100-2026-12-07e/prof-2b-float32-tottime.txt), so this is the per-pair term of its
wall time.

The pairs start on the host, as captures do, and are judged where `compare` judges them (`Workspace.for_run`: the
card when there is one, else the host). Run: `GRANITE_SPEECH_BENCH_DEVICE=cpu GRANITE_SPEECH_BENCH_OUT=FILE pytest -m
benchmark suites/bench/test_diff_benchmarks.py` (or on a card without the device variable).
"""

import statistics
import time

import pytest
import torch

from bench_models import DEVICE, synchronize
from parity.diff import Status, Workspace, compare
from parity.tolerances import tolerance_for

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="benchmarks need a CUDA device (GRANITE_SPEECH_BENCH_DEVICE=cpu times the host's judge)")]

SIZES = {"tiny-probe": (1, 37, 64), "2b-hidden-state": (1, 330, 2048)}
ROUNDS = 30


def _pair(shape, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    hf = torch.randn(shape, generator=g)
    fms = hf + 1e-6 * hf.abs().mean() * torch.randn(shape, generator=g)
    return hf.to(dtype), fms.to(dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("size", list(SIZES))
def test_compare_per_pair(benchmark, results, size, dtype, masked):
    hf, fms = _pair(SIZES[size], dtype)
    valid = torch.ones(hf.shape[:2], dtype=torch.bool) if masked else None
    if masked:
        valid[:, -3:] = False  # padding at the end of the sequence
    tol, work = tolerance_for(dtype, DEVICE), Workspace.for_run(DEVICE)
    judged = compare(hf, fms, tol, valid=valid, work=work)
    assert judged.status == Status.PASS, judged.detail
    durations = []

    def once():
        synchronize()
        start = time.perf_counter()
        compare(hf, fms, tol, valid=valid, work=work)
        synchronize()
        durations.append(time.perf_counter() - start)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    results.add("judge", f"compare_{size}_{'masked' if masked else 'whole'}", str(dtype).removeprefix("torch."),
                statistics.median(durations) * 1e3, "ms", values=hf.numel(), threads=torch.get_num_threads())
