"""Tensor-parallel FMS (decoder sharded over 2 ranks, gloo on the CPU) against HF, through the real `compare`
launched by torchrun; and the sharding bugs a TP port typically has, planted one at a time, each failing the run
at the module it lives in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.granite.cli import main as parity_main
from parity.granite.fixtures import SPEECH_DIR
from parity.granite.launches import launch_fixture, launch_logged

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")

CLIP = SPEECH_DIR / "9002-102-0000.flac"

# each planted bug replaces one attribute (module, name) in every rank by `replacement`, defined by the source
# (which sees the attribute's `original`) for one `compare` run, then puts the original back
PLANTS = {
    # the modality LoRA merged from rank 0's rows on every rank (the per-shard slice forgotten)
    "lora_rows_of_rank_0": ("granite_speech.lora", "local_rows", """
        def replacement(full, attn):
            return full if getattr(attn, "world_size", 1) == 1 else full.chunk(attn.world_size, dim=0)[0]
    """),
    # the separate (audio_only) LoRA's hook adds rank 0's rows on every rank; the merged LoRA stays right
    "audio_only_lora_hook_rows_of_rank_0": ("granite_speech.lora", "ModalityLoRA._make_hook", """
        class Rank0:
            rank, world_size = 0, 2

        def replacement(self, layer, attn):
            return original(self, layer, Rank0())
    """),
    # the all-reduce after the row-parallel attention output projection left out
    "attention_without_all_reduce": ("fms.modules.attention", "reduce_from_tensor_model_parallel_region", """
        def replacement(tensor, group):
            return tensor
    """),
    # the harness's own gather of sharded q/k/v left out: a rank's heads must not pass for the whole tensor
    "probe_values_not_gathered": ("parity.granite.tp", "gather_shards", """
        def replacement(probe, value):
            return value
    """),
}
ONE_CLIP = ("--audio", str(CLIP), "--new-tokens", "4")
AUDIO_ONLY_CASES = ("--case", "LoRA audio_only mode", "--case", "clip 201 frames")
CLEAN = "none"  # the job with nothing planted, run first
# every rank runs each job's `compare` in turn, in one process group: one launch (interpreters, imports, the
# group) serves the clean run and every planted bug; `tp.stop` waits for the last job
LAUNCHER = """
import contextlib, importlib, json, os, sys, textwrap
from parity.granite import tp
from parity.granite.cli import main


@contextlib.contextmanager
def planted(job):
    if "module" not in job:
        yield
        return
    *path, name = job["attribute"].split(".")
    owner = importlib.import_module(job["module"])
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    scope = {"original": original}
    exec(textwrap.dedent(job["source"]), scope)
    setattr(owner, name, scope["replacement"])
    try:
        yield
    finally:
        setattr(owner, name, original)


stop, tp.stop = tp.stop, lambda: None
codes = {}
for job in json.loads(open(sys.argv[1]).read()):
    with planted(job):
        codes[job["plant"]] = main(job["argv"])
stop()
if os.environ["RANK"] == "0":
    with open(sys.argv[2], "w") as out:
        json.dump(codes, out)
"""


def _torchrun(folder: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return launch_logged([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args], folder, env=env)


def _compare_argv(folder: Path, inputs) -> list:
    return ["compare", "--tp", "2", "--device", "cpu", *inputs, "--json", str(folder / "report.json"),
            "--report", str(folder / "report.html")]


def _report(folder: Path):
    path = folder / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _launch_all_jobs(root: Path) -> subprocess.Popen:
    """One launch of 2 ranks: the clean run of the default input set, then each planted bug."""
    jobs = [{"plant": CLEAN, "argv": _compare_argv(root / CLEAN, ())}]
    for plant, (module, attribute, source) in PLANTS.items():
        # that hook runs only in the default set's audio_only case; a merged-LoRA case beside it must still pass
        inputs = AUDIO_ONLY_CASES if plant.startswith("audio_only") else ONE_CLIP
        jobs.append({"plant": plant, "module": module, "attribute": attribute, "source": source,
                     "argv": _compare_argv(root / plant, inputs)})
    for job in jobs:
        (root / job["plant"]).mkdir()
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "launch.py").write_text(LAUNCHER)
    return _torchrun(root, str(root / "launch.py"), str(root / "jobs.json"), str(root / "codes.json"))


EARLY_LAUNCHES = {"tp_launch": _launch_all_jobs}  # started when collection ends (see the plugin)


tp_launch = launch_fixture("tp_launch")


@pytest.fixture(scope="module")
def tp_runs(tp_launch):
    """(job -> (exit code of its compare, its report), the launch)."""
    proc, root = tp_launch
    codes = json.loads((root / "codes.json").read_text()) if (root / "codes.json").exists() else {}
    return {job: (codes.get(job), _report(root / job)) for job in (CLEAN, *PLANTS)}, proc


def _probe(report: dict, name: str) -> dict:
    model = next(s for s in report["sections"] if s["kind"] == "model")
    return next(p for p in model["result"]["probes"] if p["name"] == name)


def test_tp2_compare_passes_with_every_decoder_probe_whole(tp_runs):
    """The default input set: merged LoRA, the separate `audio_only` LoRA (applied per shard by its hook), text only,
    bf16 and the transcribe section, all over 2 ranks."""
    (code, report), proc = tp_runs[0][CLEAN], tp_runs[1]
    assert code == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    # rank 1 prints no verdict of its own (the planted jobs print theirs: FAIL)
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 1 + len(PLANTS) and verdicts[0].startswith("PASS: "), verdicts


@pytest.mark.parametrize("plant, first", [
    ("lora_rows_of_rank_0", "decoder.layer.0.attn.q"),
    ("attention_without_all_reduce", "decoder.layer.0.attn"),
    ("probe_values_not_gathered", "decoder.layer.0.attn.q"),
])
def test_a_sharding_bug_fails_at_its_module(tp_runs, plant, first):
    (code, report), proc = tp_runs[0][plant], tp_runs[1]
    assert code == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["summary"]["verdict"] == "fail"
    assert report["summary"]["first_divergence"]["name"] == first


def test_the_audio_only_lora_hook_applies_this_ranks_rows(tp_runs):
    (code, report), proc = tp_runs[0]["audio_only_lora_hook_rows_of_rank_0"], tp_runs[1]
    assert code == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = report["summary"]["first_divergence"]
    assert first["name"] == "decoder.layer.0.attn.q" and first["section"].startswith("LoRA audio_only mode"), first
    verdicts = {s["title"]: s["summary"]["verdict"] for s in report["sections"]}
    assert all(v == "pass" for t, v in verdicts.items() if not t.startswith("LoRA audio_only mode")), verdicts


def test_the_launch_ran_every_job(tp_runs):
    """The launch ran every job to its end (no rank died): each job has its exit code and its report."""
    runs, proc = tp_runs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(code is not None and report is not None for code, report in runs.values()), runs.keys()


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
