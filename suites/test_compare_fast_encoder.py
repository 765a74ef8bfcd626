"""`compare --fast-encoder compiled|flex`: the fast path's generation section runs with the compiled audio encoder
(`StaticGenerator(encoder=)`) and is judged against HF `generate` like the default one (`--fast-gemv splitk`, the
same for the split-K GEMV: suites/test_gemv.py, where Triton's interpreter runs it). On the CPU the compiled
encoder is traced through aot_eager (the CPU has no inductor flex kernel); on CUDA, inductor.

One case per run keeps this under half a minute on the CPU: the correct port on the ragged batch of three (partial
last attention block, padded rows); a planted distance-sign error in the flex score_mod on a single clip (the
adapter kept separate), where it fails the flex section only (the other sections run the math kernel)."""

import json

import pytest
import torch

from parity.granite.cli import main

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # the CLI's contract on the tiny fixture

RAGGED = "padded batch of 3 (window + 1, on window, tiny block + 1)"
SINGLE = "LoRA audio_only mode (on window and tiny block)"


def _flex_section(case: str) -> str:
    return f"{case} · generation: fast path, flex encoder vs HF generate"


def _compare(tmp_path, case: str):
    out = tmp_path / "r.json"
    code = main(["compare", "--case", case, "--fast-encoder", "flex", "--report", str(tmp_path / "r.html"),
                 "--json", str(out)])
    return code, json.loads(out.read_text())


def _verdicts(report) -> dict:
    return {s["title"]: s["summary"]["verdict"] for s in report["sections"]}


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_fast_encoder_passes_a_correct_port(tmp_path):
    code, report = _compare(tmp_path, RAGGED)
    verdicts = _verdicts(report)
    assert code == 0 and report["summary"]["verdict"] == "pass", verdicts
    assert verdicts[_flex_section(RAGGED)] == "pass" and report["meta"]["fast_encoder"] == "flex"
    assert not any(title.endswith("generation: fast path vs HF generate") for title in verdicts), (
        "the eager-encoder fast path ran beside the flex one")


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_fast_encoder_catches_a_distance_sign_error(tmp_path, monkeypatch):
    """The Shaw term looked up at j - i instead of i - j (query and key swapped in the score_mod): a realistic
    flex_attention porting mistake that only the flex section runs."""
    import torch.nn.attention.flex_attention as flex

    real = flex.flex_attention

    def swapped(q, k, v, score_mod=None, **kwargs):
        return real(q, k, v, score_mod=lambda s, b, h, i, j: score_mod(s, b, h, j, i), **kwargs)

    monkeypatch.setattr(flex, "flex_attention", swapped)
    torch._dynamo.reset()  # a graph compiled earlier in this process must not stand in for the planted one
    try:
        code, report = _compare(tmp_path, SINGLE)
    finally:
        torch._dynamo.reset()
    failing = {title for title, verdict in _verdicts(report).items() if verdict != "pass"}
    assert code == 1 and failing == {_flex_section(SINGLE)}, failing
    first = next(s for s in report["sections"] if s["title"] == _flex_section(SINGLE))["summary"]["first_divergence"]
    assert first["name"] == "step.0.logits", first  # the prefill's logits: the audio embeddings feed them


@pytest.mark.parametrize("args, message", [
    (["--fast-encoder", "flex", "--model", "tiny-5"], "--fast-encoder flex: granite-speech-5.0 (CTC) has no fast"),
    (["--fast-encoder", "flex", "--phases", "two"], "--fast-encoder flex: --phases two leaves generation out"),
    (["--fast-gemv", "splitk", "--device", "cpu"], "--fast-gemv splitk: the split-K GEMV is a Triton kernel for CUDA"),
])
def test_fast_path_options_are_refused_where_they_cannot_apply(tmp_path, capsys, monkeypatch, args, message):
    """Before any model loads: a fast-path option where no fast path runs, and the Triton split-K GEMV on the CPU
    (outside Triton's interpreter; suites/test_gemv.py runs that compare in an interpreter of its own)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["compare", *args, "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.html")])
    assert code == 2 and message in capsys.readouterr().err


def test_the_api_refuses_the_splitk_gemv_on_the_cpu_before_anything_loads(tmp_path, monkeypatch):
    from parity.granite.pipeline import compare_report

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fast_gemv='splitk': the split-K GEMV is a Triton kernel for CUDA"):
        compare_report(tmp_path / "no-checkpoint-here", device="cpu", fast_gemv="splitk")
