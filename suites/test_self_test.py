"""The harness's self-test: every planted fault (parity/faults.py) must fail the run and be located at the probe
where it was planted, by the propagated first divergence and by teacher forcing (the module's own error).

Fixed size (`fixed:tiny/cpu/float32`): localisation is the harness's logic, not the model's width, so the CPU gate
runs it and real-size runs leave it out (the session's own tiny models serve it at --model tiny)."""

import pytest
import torch
from transformers import AutoConfig

from parity.granite.faults import CATALOGUE
from parity.granite.run import make_inputs, run_parity
from granite_speech.checkpoint import load_model
from parity.granite.plugin import marked_scope

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny(request, models_at):
    return models_at(marked_scope(request))


@pytest.fixture(scope="module")
def fault_inputs(request, speech_dataset, tiny):
    from transformers import AutoProcessor

    scope = marked_scope(request)
    row = min(speech_dataset, key=lambda r: abs(len(r["audio"]["array"]) - 64320))
    processor = AutoProcessor.from_pretrained(str(tiny[0]))
    return make_inputs(processor, [torch.tensor(row["audio"]["array"], dtype=torch.float32)], scope.device,
                       scope.dtype)


@pytest.mark.parametrize("fault", CATALOGUE, ids=[f.name for f in CATALOGUE])
def test_planted_fault_is_caught_and_located(fault, tiny, fault_inputs, run_scope):
    checkpoint_dir, hf_model, _ = tiny
    device, dtype = run_scope.device, run_scope.dtype
    model = load_model(checkpoint_dir, dtype=dtype, device=device, lora_mode=fault.lora_mode)
    with torch.no_grad():
        fault.apply(model)
    result, report = run_parity(
        hf_model, model, fault_inputs, hf_config=AutoConfig.from_pretrained(str(checkpoint_dir)),
        mode="teacher-forced", dtype=dtype, device=device,
    )
    assert not result.passed, f"{fault.name} went unnoticed"
    assert result.first_divergence == fault.probe, (
        f"{fault.name}: first divergence {result.first_divergence}, planted at {fault.probe}"
    )
    assert result.first_own_error == fault.expected_own_error, (
        f"{fault.name}: teacher forcing blames {result.first_own_error}, expected {fault.expected_own_error}"
    )
