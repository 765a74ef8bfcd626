"""The harness's self-test: every planted fault (parity/faults.py) must fail the run and be located at the probe
where it was planted, by the propagated first divergence and by teacher forcing (the module's own error)."""

import pytest
import torch
from transformers import AutoConfig

from parity.granite.faults import CATALOGUE
from parity.granite.run import make_inputs, run_parity
from granite_speech.checkpoint import load_model


@pytest.fixture(scope="module")
def fault_inputs(speech_dataset, hf_processor, device, dtype):
    row = min(speech_dataset, key=lambda r: abs(len(r["audio"]["array"]) - 64320))
    return make_inputs(hf_processor, [torch.tensor(row["audio"]["array"], dtype=torch.float32)], device, dtype)


@pytest.mark.parametrize("fault", CATALOGUE, ids=[f.name for f in CATALOGUE])
def test_planted_fault_is_caught_and_located(fault, hf_model, checkpoint_dir, fault_inputs, device, dtype):
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
