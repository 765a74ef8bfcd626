"""Layer by layer through the harness: every probe of the Granite Speech table, FMS against HF, on a real clip.

The mode under test is --parity-mode (propagated by default); teacher-forced always runs too, so that a module's
own error is told apart from inherited error. Both are judged from one teacher-forced capture (it holds the propagated
values too: the FMS forward carries its own outputs on, the teacher re-runs are extra). Reports go to
--parity-report / --parity-json.
"""

import pytest
import torch
from transformers import AutoConfig

from parity.capture import checkpoint_param_bytes
from parity.granite.run import capture_parity, judge_parity, make_inputs
from parity.granite.hf import load_hf_model
from granite_speech.checkpoint import load_model
from parity.report import render_terminal


pytestmark = pytest.mark.runs_at("session")


@pytest.fixture(scope="module")
def layer_inputs(speech_dataset, hf_processor, device, dtype):
    # the 4.02 s clip: 201 encoder frames = one full 200-frame block + 1, and 13 windows + 6 frames
    row = min(speech_dataset, key=lambda r: abs(len(r["audio"]["array"]) - 64320))
    clip = torch.tensor(row["audio"]["array"], dtype=torch.float32)
    return make_inputs(hf_processor, [clip], device, dtype)


def pytest_generate_tests(metafunc):
    # the selected --parity-mode, plus teacher-forced so own and inherited error are always told apart
    if "mode" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--parity-mode")
        metafunc.parametrize("mode", [chosen] + (["teacher-forced"] if chosen != "teacher-forced" else []))


@pytest.fixture(scope="module")
def layer_capture(request, pytestconfig, checkpoint_dir, layer_inputs, device, dtype):
    """The one teacher-forced capture every mode's judgement reads."""
    phases = pytestconfig.getoption("--parity-phases")
    if phases == "two":
        # one model in memory at a time: hand over factories and never touch the session's loaded models
        hf, fms = (lambda: load_hf_model(checkpoint_dir, dtype, str(device))), (
            lambda: load_model(checkpoint_dir, dtype, device))
    else:
        hf, fms = request.getfixturevalue("hf_model"), request.getfixturevalue("fms_model")
    return capture_parity(hf, fms, layer_inputs, hf_config=AutoConfig.from_pretrained(str(checkpoint_dir)),
                          mode="teacher-forced", phases=phases, device=device,
                          param_bytes=checkpoint_param_bytes(checkpoint_dir, dtype))


def test_every_probe_within_tolerance(
    mode, layer_capture, checkpoint_dir, layer_inputs, device, dtype, seed, tolerance_overrides, write_parity_report,
    record_property,
):
    result, report = judge_parity(layer_capture, layer_inputs, mode=mode, dtype=dtype, device=device,
                                  overrides=tolerance_overrides, seed=seed, checkpoint=str(checkpoint_dir))
    write_parity_report(report, mode)
    summary = report["summary"]
    record_property("probes", summary["probes"])
    record_property("status_counts", summary["status_counts"])
    worst = max((p["propagated"].get("metrics") or {}).get("max_abs") or 0.0 for p in report["result"]["probes"])
    record_property("worst_max_abs", worst)
    assert summary["status_counts"].get("pass", 0) == summary["probes"], (
        f"first divergence: {result.first_divergence}\n" + render_terminal(report)
    )
    assert result.passed
