"""Tensor-parallel FMS (decoder sharded over 2 ranks, gloo on the CPU) against HF, through the real `compare`
launched by torchrun; and the sharding bugs a TP port typically has, planted one at a time, each failing the run
at the module it lives in."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from parity.granite.cli import main as parity_main

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")

CLIP = Path(__file__).resolve().parents[1] / "parity" / "granite" / "fixtures" / "speech" / "9002-102-0000.flac"

# each planted bug is a patch applied in every rank before `compare` runs
PLANTS = {
    "none": "",
    # the modality LoRA merged from rank 0's rows on every rank (the per-shard slice forgotten)
    "lora_rows_of_rank_0": """
        import granite_speech.lora as lora
        lora.local_rows = lambda full, attn: full if getattr(attn, "world_size", 1) == 1 else \\
            full.chunk(attn.world_size, dim=0)[0]
    """,
    # the separate (audio_only) LoRA's hook adds rank 0's rows on every rank; the merged LoRA stays right
    "audio_only_lora_hook_rows_of_rank_0": """
        import granite_speech.lora as lora
        make_hook = lora.ModalityLoRA._make_hook

        class Rank0:
            rank, world_size = 0, 2

        lora.ModalityLoRA._make_hook = lambda self, layer, attn: make_hook(self, layer, Rank0())
    """,
    # the all-reduce after the row-parallel attention output projection left out
    "attention_without_all_reduce": """
        import fms.modules.attention as attention
        attention.reduce_from_tensor_model_parallel_region = lambda tensor, group: tensor
    """,
    # the harness's own gather of sharded q/k/v left out: a rank's heads must not pass for the whole tensor
    "probe_values_not_gathered": """
        import parity.granite.tp as tp
        tp.gather_shards = lambda probe, value: value
    """,
}


def _launch(tmp_path: Path, plant: str, *extra: str, inputs=("--audio", str(CLIP), "--new-tokens", "4")) -> tuple:
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(PLANTS[plant]) + "\nimport sys\nfrom parity.granite.cli import main\n"
                        "sys.exit(main(sys.argv[1:]))\n")
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(launcher), "compare", "--tp", "2", "--device", "cpu", *inputs,
                           "--json", str(report), "--report", str(tmp_path / "report.html"), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    data = json.loads(report.read_text()) if report.exists() else None
    return proc, data


def _probe(report: dict, name: str) -> dict:
    model = next(s for s in report["sections"] if s["kind"] == "model")
    return next(p for p in model["result"]["probes"] if p["name"] == name)


def test_tp2_compare_passes_with_every_decoder_probe_whole(tmp_path):
    """The default input set: merged LoRA, the separate `audio_only` LoRA (applied per shard by its hook), text only,
    bf16 and the transcribe section, all over 2 ranks."""
    proc, report = _launch(tmp_path, "none", inputs=())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["meta"]["tensor_parallel_ranks"] == 2
    assert report["summary"]["verdict"] == "pass"
    # the sharded q/k/v came back whole: HF's shape, values within tolerance (teacher-forced and propagated)
    for name in ("decoder.layer.0.attn.q", "decoder.layer.1.attn.k", "decoder.layer.1.attn.v"):
        probe = _probe(report, name)
        assert probe["propagated"]["hf_shape"] == probe["propagated"]["fms_shape"]
        assert probe["propagated"]["status"] == "pass" and probe["propagated"]["metrics"]["numel"] > 0
    titles = [s["title"] for s in report["sections"]]
    assert any(t.startswith("LoRA audio_only mode") and t.endswith("· model") for t in titles), titles
    generation = [s for s in report["sections"] if s["kind"] == "generation"]
    assert generation and all(s["extra"]["fast_path"] == "not run: the fast path is single-device "
                                                         "(tensor-parallel run)" for s in generation)
    # the comparison is not degenerate: HF's greedy tokens vary
    assert all(s["extra"]["distinct_hf_tokens"] > 1 for s in generation if "distinct_hf_tokens" in s["extra"])
    assert "PASS" in proc.stdout and proc.stdout.count("PASS:") == 1  # rank 1 prints no verdict of its own


@pytest.mark.parametrize("plant, first", [
    ("lora_rows_of_rank_0", "decoder.layer.0.attn.q"),
    ("attention_without_all_reduce", "decoder.layer.0.attn"),
    ("probe_values_not_gathered", "decoder.layer.0.attn.q"),
])
def test_a_sharding_bug_fails_at_its_module(tmp_path, plant, first):
    proc, report = _launch(tmp_path, plant)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["summary"]["verdict"] == "fail"
    assert report["summary"]["first_divergence"]["name"] == first


def test_the_audio_only_lora_hook_applies_this_ranks_rows(tmp_path):
    proc, report = _launch(tmp_path, "audio_only_lora_hook_rows_of_rank_0", inputs=())
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = report["summary"]["first_divergence"]
    assert first["name"] == "decoder.layer.0.attn.q" and first["section"].startswith("LoRA audio_only mode"), first
    verdicts = {s["title"]: s["summary"]["verdict"] for s in report["sections"]}
    assert all(v == "pass" for t, v in verdicts.items() if not t.startswith("LoRA audio_only mode")), verdicts


@pytest.mark.parametrize("argv, message", [
    (["compare", "--tp", "2"], "--tp 2 needs 2 processes, this is 1"),
    (["compare", "--tp", "2", "--model", "tiny-5"], "--tp 2 needs 2 processes"),
])
def test_tp_without_torchrun_is_a_usage_error(capsys, argv, message):
    assert parity_main(argv) == 2
    assert message in capsys.readouterr().err


def test_tp_refuses_what_stays_single_process(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parity_main(["compare", "--tp", "2", "--phases", "two"]) == 2
    assert "--phases two is single-process" in capsys.readouterr().err
    assert parity_main(["compare", "--tp", "2", "--model", "tiny-5"]) == 2
    assert "granite-speech-5.0 (CTC) has none" in capsys.readouterr().err
    assert parity_main(["compare", "--tp", "2", "--save-captures", str(tmp_path / "caps")]) == 2
    assert "single-process" in capsys.readouterr().err
    assert parity_main(["compare"]) == 2
    assert "pass --tp 2" in capsys.readouterr().err


def test_tp_over_more_ranks_than_cuda_devices_is_a_usage_error(monkeypatch, capsys):
    # one visible card and two ranks: each rank would take cuda:<local rank>, and rank 1 has no card
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parity_main(["compare", "--tp", "2", "--device", "cuda"]) == 2
    assert "--tp 2 on cuda needs 2 CUDA devices, this machine sees 1; pass --device cpu" in capsys.readouterr().err


def test_head_counts_that_do_not_divide_are_refused_before_loading(monkeypatch):
    import granite_speech.model as model
    from granite_speech.config import VARIANTS

    class ThreeRanks:  # stands in for a TensorParallelStrategy over 3 ranks
        group = None

    monkeypatch.setattr(model, "TensorParallelStrategy", ThreeRanks)
    monkeypatch.setattr(model.torch.distributed, "get_world_size", lambda group=None: 3)
    with pytest.raises(ValueError, match="heads \\(4\\) and kv heads \\(2\\) to be multiples of 3"):
        model.check_tensor_parallel(VARIANTS["tiny"].text_config, ThreeRanks())


def test_the_fast_path_refuses_a_tensor_parallel_model(monkeypatch):
    """Its decode step reads the weights directly, with no all-reduce: on shards it would be silently wrong."""
    import granite_speech.fast_generate as fast_generate
    from granite_speech.config import VARIANTS
    from granite_speech.model import GraniteSpeech

    class TwoRanks:  # stands in for a TensorParallelStrategy
        pass

    model = GraniteSpeech(VARIANTS["tiny"]).eval()
    monkeypatch.setattr(fast_generate, "TensorParallelStrategy", TwoRanks)
    model.distributed_strategy = TwoRanks()
    with pytest.raises(ValueError, match="the fast path is single-device"):
        fast_generate.StaticGenerator(model, 16, use_cuda_graph=False)
