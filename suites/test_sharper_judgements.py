"""The two judgements beside the gate that see faults smaller than a run dtype's rounding, on toy models where the
fault is planted in one block: the float64 formula check (an eps) and the upcast audit (a softmax left in bf16).
Each planted fault passes the documented gate, and is marked suspect and located at its block; the correct copy
is not."""

import copy

import pytest
import torch
from torch import nn

from parity.capture import ModelRun, capture_model, capture_pair
from parity.diff import Status, diff_captures
from parity.precision import audit_ops, missing_upcasts
from parity.probes import Probe

pytestmark = pytest.mark.runs_at("toy", device="cpu", dtype="float32")  # toy models

torch.set_num_threads(1)
DIM = 16
PROBES = tuple(Probe(f"block.{i}", f"blocks.{i}", f"blocks.{i}") for i in range(3))
PLACES = {f"blocks.{i}": f"block.{i}" for i in range(3)}


class Block(nn.Module):
    def __init__(self, eps: float = 1e-12, upcast: bool = True):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM, eps=eps)
        self.upcast = upcast

    def forward(self, x):
        h = self.norm(self.proj(x))
        scores = h @ h.transpose(-1, -2) / DIM**0.5
        weights = scores.softmax(-1, dtype=torch.float32).to(h.dtype) if self.upcast else scores.softmax(-1)
        return weights @ h + x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _pair(fault=None):
    torch.manual_seed(0)
    reference = Toy().eval()
    candidate = copy.deepcopy(reference)
    if fault is not None:
        fault(candidate.blocks[1])
    return reference, candidate


def _inputs(dtype):
    return torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1)).to(dtype)


def _formula_checked(fault=None):
    reference, candidate = _pair(fault)
    x = _inputs(torch.float32)
    pair = capture_pair(PROBES, ModelRun(reference, lambda m: m(x)), ModelRun(candidate, lambda m: m(x)))
    x64 = x.double()
    floors = capture_model(copy.deepcopy(reference).double(), lambda m: m(x64), PROBES, side="hf")
    candidate64 = capture_model(copy.deepcopy(candidate).double(), lambda m: m(x64), PROBES, side="fms")
    return diff_captures(pair, dtype=torch.float32, floors=floors, candidate64=candidate64)


def _set_eps(block):
    block.norm.eps = 1e-5  # torch's default where the reference has BERT's 1e-12


def test_formula_check_passes_the_same_formula():
    result = _formula_checked()
    assert all(p.float64.status == Status.PASS and p.float64.metrics.max_abs == 0.0 for p in result.probes)
    assert result.first_divergence is None and not any(p.suspect for p in result.probes)


def test_formula_check_locates_an_eps_the_gate_passes():
    result = _formula_checked(_set_eps)
    assert all(p.status == Status.PASS for p in result.probes), "the fp32 gate alone passes this fault"
    statuses = [p.float64.status for p in result.probes]
    assert statuses[0] == Status.PASS and statuses[1] == Status.FAIL, statuses
    assert result.first_divergence == "block.1" and result.probe("block.1").suspect
    assert not result.passed, "a formula fault fails by default"
    result.lenient = True
    assert result.passed, "--lenient lets it pass as a suspect"


def _audited(dtype, fault=None):
    reference, candidate = (m.to(dtype) for m in _pair(fault))
    x = _inputs(dtype)
    with torch.no_grad():
        with audit_ops(reference, PLACES) as reference_ops:
            reference(x)
        with audit_ops(candidate, PLACES) as candidate_ops:
            candidate(x)
    return reference, candidate, x, missing_upcasts(reference_ops, candidate_ops)


def _drop_upcast(block):
    block.upcast = False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_audit_names_the_block_that_runs_softmax_in_16_bits(dtype):
    reference, candidate, x, missing = _audited(dtype, _drop_upcast)
    name = str(dtype).removeprefix("torch.")
    assert missing == {"block.1": [f"softmax in {name}"]}
    pair = capture_pair(PROBES, ModelRun(reference, lambda m: m(x)), ModelRun(candidate, lambda m: m(x)))
    result = diff_captures(pair, dtype=dtype, upcasts=missing)
    assert result.probe("block.1").missing_upcast == [f"softmax in {name}"] and result.probe("block.1").suspect
    assert result.first_divergence == "block.1"
    assert not result.probe("block.0").suspect
    assert not result.passed, "a missing upcast fails by default"


def test_upcast_audit_is_silent_on_a_correct_copy_and_in_fp32():
    assert _audited(torch.bfloat16)[3] == {}
    assert _audited(torch.float32, _drop_upcast)[3] == {}  # a 32-bit softmax needs no upcast


def test_upcast_audit_is_one_sided():
    """The candidate upcasting where the reference does not is more accurate, not a fault."""
    reference_ops = {"block.1": {"softmax in bfloat16"}}
    assert missing_upcasts(reference_ops, {}) == {}
    assert missing_upcasts({}, reference_ops) == {"block.1": ["softmax in bfloat16"]}


def _rounded_pair(seed: int = 0):
    """An fp32 value and two 16-bit computations of it, each off by its own rounding-sized noise (as eager and an
    inductor-compiled kernel of the same function are in bf16); eager's row 0 rounds 10x worse than its others."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(16, 64, generator=g)
    eager_noise = 0.05 * torch.randn(16, 64, generator=g)
    eager_noise[0] *= 10
    compiled = (reference + 0.05 * torch.randn(16, 64, generator=g)).bfloat16()
    return reference, (reference + eager_noise).bfloat16(), compiled


def test_compiled_parity_passes_a_differently_rounded_correct_kernel():
    from parity.testing import assert_compiled_parity

    reference, eager, compiled = _rounded_pair()
    measured = assert_compiled_parity("toy", eager, compiled, lambda: reference, dtype=torch.bfloat16)
    assert measured["compiled_vs_eager_max_abs"] > 0.01  # outside the bf16 table: the row floors decided


def test_compiled_parity_fails_a_row_wrong_within_eagers_worst_row():
    """A bug confined to one row (one token), its error 1.0: below eager's worst rounding error anywhere (row 0,
    1.37 from fp32 against the bug's 1.09), so the tensor-wide rule this replaced passed it, even at 1x; the row's own
    floor (about 0.15) fails it."""
    from parity.testing import assert_compiled_parity

    reference, eager, compiled = _rounded_pair()
    compiled[3] += 1.0
    with pytest.raises(AssertionError, match="compiled vs eager fail"):
        assert_compiled_parity("toy", eager, compiled, lambda: reference, dtype=torch.bfloat16)
