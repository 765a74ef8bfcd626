"""What the load-time NaN/Inf check (`coverage.check_finite`, run in the adapters' ledger step) costs against the
load: the tiny fixture through `load_model` (the check's own time summed over the partial state dicts it saw), and
the CPU throughput of the fast path (one `sum` per tensor) and of `isfinite().all()` on a 256 MiB float32 tensor,
against reading that tensor from a safetensors file (page cache). Run from the repository root:

    PYTHONPATH=$PWD python results/bad-inputs/measure_finite_check.py
"""

import os
import platform
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import granite_speech  # noqa: F401
from granite_speech.checkpoint import coverage, load_model
from parity.granite.fixtures import build_checkpoint


def _best(f, repeat=3):
    f()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    folder = build_checkpoint("tiny")
    spent = []
    original = coverage.check_finite

    def timed(state_dict):
        start = time.perf_counter()
        original(state_dict)
        spent.append(time.perf_counter() - start)

    coverage.check_finite = timed
    for _ in range(3):
        spent.clear()
        start = time.perf_counter()
        load_model(folder)
        total = time.perf_counter() - start
        print(f"tiny load_model: {total:.3f} s, of which the finite check {sum(spent) * 1000:.1f} ms "
              f"({100 * sum(spent) / total:.1f}%) over {len(spent)} partial state dicts")
    coverage.check_finite = original

    x = torch.randn(64, 1024, 1024)  # 256 MiB
    gib = x.numel() * 4 / 2**30
    fast = _best(lambda: bool(torch.isfinite(x.sum())))
    exact = _best(lambda: bool(torch.isfinite(x).all()))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.safetensors")
        save_file({"x": x}, path)
        read = _best(lambda: load_file(path)["x"].clone())
    print(f"256 MiB float32: sum fast path {fast:.3f} s ({gib / fast:.2f} GiB/s); isfinite().all() {exact:.3f} s "
          f"({gib / exact:.2f} GiB/s); safetensors read + copy (page cache) {read:.3f} s ({gib / read:.2f} GiB/s)")


if __name__ == "__main__":
    main()
