"""`granite_speech.gemv.splitk_linear` (the split-K GEMV for decode steps) computes `F.linear`: each output is the
exact sum rounded once to the input's dtype, to within fp32 accumulation, for 1..8 rows, ragged N and K and any
number of K slices; the same inputs give the same bits; what it is not for is refused.

Its Triton kernel runs here on the CPU through Triton's interpreter, which Triton reads once per process (its own
library is defined interpreted or compiled when it is first imported): so the kernel runs in an interpreter of its
own, with `TRITON_INTERPRET=1`, launched when collection ends; it saves each output, and the tests judge them here
against float64. On a card, the benchmark (`suites/bench/test_gemv_benchmarks.py`) times the compiled kernel
against `F.linear`.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity.granite.launches import launch_fixture, launch_logged
from parity.testing import assert_linear_rounded_once, assert_parity

pytest.importorskip("triton", reason="Triton comes with torch's CUDA wheels; a CPU-only torch has none")

pytestmark = pytest.mark.runs_at("toy", device="cpu", dtype="float32")  # its own small shapes
REPO_ROOT = Path(__file__).resolve().parents[1]
# name -> (rows, N, K, K slices or None for the default, dtype, seed): N and K off the block sizes, 1 to 8 rows
CASES = {
    "one_row_default_split": (1, 100, 300, None, "float32", 0),
    "ragged_three_splits": (3, 100, 300, 3, "float32", 0),
    "eight_rows_one_split": (8, 64, 128, 1, "float32", 0),
    "ragged_bf16": (3, 100, 300, 3, "bfloat16", 0),
    "ragged_fp16": (3, 100, 300, 3, "float16", 0),
}
REFUSALS = {"nine_rows": ((9, 64), (32, 64), False), "wrong_k": ((2, 63), (32, 64), False),
            "strided_weight": ((2, 64), (64, 32), True)}
CHILD = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[3])
from suites.test_gemv import inputs
from granite_speech.gemv import splitk_linear

outputs, refusals, notes = {}, {}, {}
for name, (rows, n, k, split, dtype, seed) in json.loads(sys.argv[1]).items():
    x, w, b = inputs(rows, n, k, dtype, seed)
    outputs[name] = splitk_linear(x, w, b, split_k=split, block_n=32, block_k=64)
x, w, b = inputs(3, 100, 300, "bfloat16", 1)
outputs["again"] = splitk_linear(x.reshape(3, 1, 300), w, b, split_k=3, block_n=32, block_k=64).reshape(3, 100)
outputs["first"] = splitk_linear(x, w, b, split_k=3, block_n=32, block_k=64)
for name, (x_shape, w_shape, transposed) in json.loads(sys.argv[4]).items():
    weight = torch.randn(*w_shape)
    try:
        splitk_linear(torch.randn(*x_shape), weight.T if transposed else weight)
        refusals[name] = None
    except ValueError as err:
        refusals[name] = str(err)

# the fast path's decode with gemv="splitk" beside its cuBLAS twin, the kernel's calls counted
import granite_speech.gemv as gemv
from suites.test_gemv import decode_logits
calls = []
kernel = gemv.splitk_linear
gemv.splitk_linear = lambda x, *args, **kwargs: (calls.append(x.numel() // x.size(-1)), kernel(x, *args, **kwargs))[1]
for name in ("cublas", "splitk"):
    outputs[f"decode_{name}_logits"], outputs[f"decode_{name}_tokens"] = decode_logits(name)
notes["splitk_calls"] = calls
gemv.splitk_linear = kernel

# `compare --fast-gemv splitk` on the ragged batch of three, as users run it (default flags)
from parity.granite.cli import main
notes["compare_exit"] = main(["compare", "--fast-gemv", "splitk", "--case", "padded batch of 3", "--json",
                                 sys.argv[2] + "/compare.json", "--report", sys.argv[2] + "/compare.html"])
save_file({k: v.contiguous() for k, v in outputs.items()}, sys.argv[2] + "/outputs.safetensors")
open(sys.argv[2] + "/notes.json", "w").write(json.dumps({"refusals": refusals, **notes}))
"""
DECODE_STEPS = 4


def inputs(rows, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(getattr(torch, dtype)) for t in (torch.randn(rows, k, generator=g),
                                                       torch.randn(n, k, generator=g), torch.randn(n, generator=g)))


def decode_logits(gemv: str):
    """(per-step logits [B, 1 + DECODE_STEPS, vocab], tokens) of the fast path on the tiny fixture, eager steps."""
    from granite_speech.checkpoint import load_model
    from granite_speech.fast_generate import StaticGenerator
    from parity.granite.fixtures import build_checkpoint
    from suites.test_fast_generate import make_prompts

    model = load_model(build_checkpoint("tiny-untied"), lora_mode="audio_only")
    cfg = model.config
    # test_fast_generate's batch3 shapes: ragged audio and text, left-padded, 3 rows (within gemv.MAX_ROWS)
    prompts = make_prompts([60, 30, 45], [4, 7, 2], cfg.audio_token_index, cfg.text_config.src_vocab_size, seed=0)
    length = prompts["input_ids"].size(1)
    generator = StaticGenerator(model, length + DECODE_STEPS + 1, use_cuda_graph=False, gemv=gemv)
    with torch.no_grad():
        audio = generator.encode_audio(prompts["input_features"])
        logits = [generator.prefill(prompts["input_ids"], audio, prompts["input_features_mask"],
                                    prompts["attention_mask"]).clone()]
        logits += [generator.decode_step().clone() for _ in range(DECODE_STEPS)]
    return torch.stack(logits, 1), generator.tokens(length + DECODE_STEPS + 1)


def _launch_interpreted(folder: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return launch_logged([sys.executable, "-c", CHILD, json.dumps(CASES), str(folder), str(REPO_ROOT),
                          json.dumps(REFUSALS)], folder, env=env)


EARLY_LAUNCHES = {"interpreted_kernel": _launch_interpreted}  # started when collection ends (see the plugin)


interpreted_kernel = launch_fixture("interpreted_kernel")


@pytest.fixture(scope="module")
def kernel_outputs(interpreted_kernel):
    proc, folder = interpreted_kernel
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(folder / "outputs.safetensors")), json.loads((folder / "notes.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_splitk_linear_is_the_exact_sum_rounded_once(kernel_outputs, name):
    rows, n, k, _, dtype, seed = CASES[name]
    out = kernel_outputs[0][name]
    assert out.dtype == getattr(torch, dtype) and out.shape == (rows, n)
    assert_linear_rounded_once(out, *inputs(rows, n, k, dtype, seed))


def test_splitk_linear_gives_the_same_bits_twice_and_with_leading_dims(kernel_outputs):
    outputs = kernel_outputs[0]
    assert torch.equal(outputs["first"], outputs["again"])


def test_splitk_linear_refuses_what_it_is_not_for(kernel_outputs):
    refusals = kernel_outputs[1]["refusals"]
    expected = {"nine_rows": "1..8 rows", "wrong_k": "expects 64", "strided_weight": "contiguous weight"}
    assert {name: (refusals[name] or "").count(part) for name, part in expected.items()} == dict.fromkeys(expected, 1)


def test_the_fast_path_with_splitk_gemv_decodes_as_with_cublas(kernel_outputs, record_property):
    """StaticGenerator(gemv="splitk"): every weight product of every decode step (4 per layer and the head) runs the
    kernel (the prefill is the model's forward); the tokens are the cuBLAS path's and the logits within the logits
    tolerance of its (fp32: only the summation order differs)."""
    from parity.granite.fixtures import load_hf_config

    outputs, calls = kernel_outputs[0], kernel_outputs[1]["splitk_calls"]
    layers = load_hf_config("tiny-untied")["text_config"]["num_hidden_layers"]
    assert calls == [3] * (DECODE_STEPS * (4 * layers + 1)), f"split-K calls (rows each): {calls}"
    assert torch.equal(outputs["decode_splitk_tokens"], outputs["decode_cublas_tokens"])
    assert_parity("splitk_decode_logits", outputs["decode_cublas_logits"], outputs["decode_splitk_logits"],
                  dtype=torch.float32, device=torch.device("cpu"), tolerance_class="logits", record=record_property)


def test_compare_judges_the_splitk_fast_path_and_passes_a_correct_port(interpreted_kernel, kernel_outputs):
    """`compare --fast-gemv splitk`: the fast path's generation section runs the split-K GEMV (in place of the cuBLAS
    one) and a correct port passes it with default flags. Planted kernel faults are the mutation table's
    (`splitk_*` in parity.granite.mutants: caught there, localised to the decode steps)."""
    report = json.loads((interpreted_kernel[1] / "compare.json").read_text())
    verdicts = {s["title"].split(" · ", 1)[1]: s["summary"]["verdict"] for s in report["sections"]}
    assert kernel_outputs[1]["compare_exit"] == 0 and report["summary"]["verdict"] == "pass", verdicts
    assert verdicts["generation: fast path, splitk GEMV vs HF generate"] == "pass", verdicts
    assert "generation: fast path vs HF generate" not in verdicts and report["meta"]["fast_gemv"] == "splitk"
