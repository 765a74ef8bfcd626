"""The decode step's GEMMs alone: `F.linear` (cuBLAS) against `granite_speech.gemv.splitk_linear` (Triton split-K),
per weight of a 2b / 8b decoder layer and the LM head, at batch 1 and 8, bf16. Issue 26 asks for GEMV-class kernels
at 90%+ of copy bandwidth; the decision whether the fast path's decode step uses the split-K kernel is this table's.

Method: each call is captured `CALLS` times in a CUDA graph (as the decode step runs: no launch overhead), over
enough copies of the weight that they overflow the L2 cache (each call reads its weight from HBM), and the graph
replayed; microseconds per call from CUDA events. Bandwidth = weight bytes (+ activations) per call over that time,
as a share of the measured copy bandwidth. Every split-K output is checked against the float64 product
(`parity.testing.assert_linear_rounded_once`) before it is timed. CUDA only.

Run on a GPU: `pytest -m benchmark suites/bench/test_gemv_benchmarks.py` (GRANITE_SPEECH_BENCH_VARIANTS, default
2b,8b).
"""

import pytest
import torch
import torch.nn.functional as F

from bench_models import DEVICE, DTYPE, VARIANTS
from parity.granite.fixtures import load_hf_config
from parity.testing import assert_linear_rounded_once

pytestmark = [pytest.mark.benchmark, pytest.mark.gpu]

CALLS, REPLAYS = 20, 10
L2_OVERFLOW_BYTES = 512 * 2**20  # the weight copies a graph cycles through: more than any card's L2 cache
TILES = ((32, 128), (64, 128), (64, 256), (128, 64))  # (BLOCK_N, BLOCK_K) swept for the split-K kernel


def decode_gemms(variant: str) -> dict:
    """name -> (N, K) of each weight a decode step multiplies (FMS Granite's fused qkv and gate-up projections)."""
    text = load_hf_config(variant)["text_config"]
    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    ff = text["intermediate_size"]
    return {"qkv": ((heads + 2 * kv) * head_dim, hidden), "dense": (hidden, heads * head_dim),
            "gate_up": (2 * ff, hidden), "down": (hidden, ff), "lm_head": (text["vocab_size"], hidden)}


def graph_us(fn, weights) -> float:
    """Microseconds per call of fn(weight), CALLS calls cycling through `weights` per graph replay."""
    for w in weights[:2]:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS)


@pytest.mark.parametrize("batch", (1, 8))
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_decode_gemms(results, copy_bandwidth, variant, batch):
    if DEVICE.type != "cuda":
        pytest.skip("the split-K kernel is Triton: CUDA only (its CPU check is suites/test_gemv.py)")
    from granite_speech.gemv import splitk_linear

    g = torch.Generator(device=DEVICE).manual_seed(0)
    for name, (n, k) in decode_gemms(variant).items():
        copies = max(1, min(16, L2_OVERFLOW_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, generator=g, device=DEVICE, dtype=DTYPE) * k ** -0.5 for _ in range(copies)]
        x = torch.randn(batch, k, generator=g, device=DEVICE, dtype=DTYPE)
        moved = (n * k + batch * (n + k)) * 2
        torch_us = graph_us(lambda w: F.linear(x, w), weights)
        timings = {"torch": torch_us}
        for block_n, block_k in TILES:
            assert_linear_rounded_once(splitk_linear(x, weights[0], block_n=block_n, block_k=block_k), x, weights[0])
            timings[f"splitk_{block_n}x{block_k}"] = graph_us(
                lambda w, bn=block_n, bk=block_k: splitk_linear(x, w, block_n=bn, block_k=bk), weights)
        for impl, us in timings.items():
            results.add(variant, f"gemv_{name}_b{batch}", impl, us, "us", n=n, k=k, batch=batch,
                        bandwidth_share=moved / (us * 1e-6) / copy_bandwidth)
        best = min((us, impl) for impl, us in timings.items() if impl != "torch")
        print(f"\n{variant} {name} [{n}x{k}] batch {batch}: F.linear {torch_us:.1f} us "
              f"({moved / (torch_us * 1e-6) / copy_bandwidth:.0%} of copy bandwidth); best split-K {best[1]} "
              f"{best[0]:.1f} us ({moved / (best[0] * 1e-6) / copy_bandwidth:.0%})")
        del weights
