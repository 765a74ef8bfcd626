"""Fixtures of the benchmarks: the models per variant (bench_models.py), the results writer, the copy bandwidth.

  GRANITE_SPEECH_BENCH_OUT       JSON file to write (default results/bench/<date>-<card>.json; a run with
                                 GRANITE_SPEECH_BENCH_DEVICE=cpu writes to the temporary folder's granite-speech-bench/)
"""

import gc
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from bench_models import DEVICE, DTYPE, VARIANTS, BenchModels, build_models, synchronize
from bench_results import BenchResults, render_markdown


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA device (set GRANITE_SPEECH_BENCH_DEVICE=cpu to debug)")
        here = Path(__file__).parent
        for item in items:  # this hook sees the whole session's items: only the benchmarks' own take this reason
            if "gpu" in item.keywords and here in Path(item.path).parents:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def results():
    writer = BenchResults.from_env(on_card=DEVICE.type == "cuda")
    yield writer
    writer.write()
    print(f"\nbenchmark results written to {writer.path}\n")
    print(render_markdown({"meta": writer.meta, "notes": writer.notes, "rows": writer.rows}))


@pytest.fixture(scope="session")
def copy_bandwidth(results) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (perf-anchors.md)."""
    nbytes = (1 << 30) if DEVICE.type == "cuda" else (1 << 26)
    src = torch.randn(nbytes // 2, dtype=DTYPE, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - start)
    bandwidth = 2 * nbytes / sorted(times)[len(times) // 2]
    results.note("copy_bandwidth_TBps", bandwidth / 1e12)
    del src, dst
    return bandwidth


@pytest.fixture(scope="session", params=VARIANTS)
def models(request, results) -> BenchModels:
    built: Optional[BenchModels] = build_models(request.param)
    results.note(
        f"{request.param}_model",
        {
            "hf_GiB": built.hf_bytes / 2**30,
            "fms_GiB": built.fms_bytes / 2**30,
            "decoder_GiB": built.decoder_bytes / 2**30,
            "build_s": built.build_s,
        },
    )
    yield built
    built.generators.clear()
    built.tokens.clear()
    built.hf = built.fms = None
    del built
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
