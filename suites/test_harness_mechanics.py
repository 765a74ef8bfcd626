"""Mechanics of the parity harness on toy modules (fast, CPU): hooks, captures, teacher forcing, judging, reports,
and the Granite Speech probe table against a real tiny HF model.

The toy "reference" and "candidate" are the same network with a fault planted in the candidate, so every expected
status follows from where the fault is, not from numbers produced by the harness itself.
"""

import copy
import dataclasses
import gc
import json
import math
import os
import weakref

import pytest
import torch
from torch import nn

from parity.adapters import build_adapter
from parity.capture import (Captures, ModelRun, capture_model, capture_pair, checkpoint_param_bytes, heap_frozen,
                            plan_phases)
from parity.diff import Status, compare, diff_captures
from parity.hooks import HookSet, assert_no_hooks, attached_hooks, leftover_hooks
from parity.granite.hf import hf_divides_logits
from parity.granite.probes import (
    HF_LAYOUT_ALIASES,
    TEXT,
    GraniteSpeechDims,
    granite_decoder_rows,
    granite_speech_probes,
    text_mask,
)
from parity.probes import Probe, ProbeResolutionError, Repeat, expand, resolve_module
from parity.report import build_report, read_json, render_html, render_terminal, result_from_report, run_metadata, write_json
from parity.tolerances import Tolerance, tolerance_for, ulp

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # toy models and the tiny HF model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

N_LAYERS, DIM = 5, 16
FP32 = Tolerance(1e-3, 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# toy models


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.linear(x)) + x


class Chain(nn.Module):
    def __init__(self, n=N_LAYERS, dim=DIM):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(n))
        self.unused = nn.Linear(dim, dim)  # exists but never runs

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


CHAIN_TABLE = (Repeat("i", 0, "n", (Probe("layer.{i}", "layers.{i}", "layers.{i}"),)),)


def chain_probes(n=N_LAYERS):
    return expand(CHAIN_TABLE, {"n": n})


def make_chain(seed=0):
    torch.manual_seed(seed)
    return Chain().eval()


def planted(model, *layers, amount=0.5):
    """A copy of `model` with the bias of each listed layer shifted: the candidate with a known fault."""
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        for i in layers:
            faulty.layers[i].linear.bias.add_(amount)
    return faulty


def chain_input(seed=1):
    return torch.randn(3, 7, DIM, generator=torch.Generator().manual_seed(seed))


def run_pair(reference, candidate, probes, mode="propagated", x=None, **kw):
    x = chain_input() if x is None else x
    pair = capture_pair(probes, ModelRun(reference, {"x": x}), ModelRun(candidate, {"x": x}), mode=mode,
                        hf_aliases=(), **kw)
    return pair, diff_captures(pair)


# ---------------------------------------------------------------------------------------------------------------
# hooks


def test_hooks_removed_when_the_forward_raises():
    model = make_chain()
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with attached_hooks() as hooks:
            hooks.forward(model.layers[0], lambda *a: calls.append("post"))
            hooks.pre_forward(model.layers[1], lambda *a: calls.append("pre"))
            assert len(leftover_hooks(model)) == 2
            model(chain_input())
            raise RuntimeError("boom")
    assert calls == ["post", "pre"]
    assert_no_hooks(model)
    assert leftover_hooks(model, ours_only=False) == []


def test_capture_pair_removes_hooks_when_the_run_raises():
    model, other = make_chain(), make_chain()

    def explode(m):
        m(chain_input())
        raise ValueError("inputs callable failed")

    with pytest.raises(ValueError, match="inputs callable failed"):
        capture_pair(chain_probes(), ModelRun(model, {"x": chain_input()}), ModelRun(other, explode),
                     mode="teacher_forced", hf_aliases=())
    assert_no_hooks(model)
    assert_no_hooks(other)


class Raising(nn.Module):
    def forward(self, x):
        raise RuntimeError("planted crash")


@pytest.mark.parametrize("mode", ["propagated", "teacher_forced"])
def test_a_candidate_that_raises_is_a_finding_named_at_the_module_it_raised_in(mode):
    """on_raise="record": the crash is status `raised` on the innermost probed module that was running, the probes
    before it keep their verdicts, the enclosing probe is raised too, and later ones are missing."""
    reference = make_chain()
    candidate = copy.deepcopy(reference)
    candidate.layers[2].linear = nn.Sequential(candidate.layers[2].linear, Raising()).eval()
    probes = (Probe("model", "", ""), *chain_probes(), Probe("layer.2.linear", "layers.2.linear", "layers.2.linear"))
    pair, result = run_pair(reference, candidate, probes, mode=mode, on_raise="record")
    status = {p.name: p.propagated.status for p in result.probes}
    assert status == {"model": Status.RAISED, "layer.0": Status.PASS, "layer.1": Status.PASS,
                      "layer.2": Status.RAISED, "layer.2.linear": Status.RAISED, "layer.3": Status.MISSING,
                      "layer.4": Status.MISSING}
    assert result.first_divergence == "layer.2.linear"
    detail = next(p.propagated.detail for p in result.probes if p.name == "layer.2.linear")
    assert "RuntimeError" in detail and "planted crash" in detail and "test_harness_mechanics.py" in detail
    assert "inside layer.2.linear" in next(p.propagated.detail for p in result.probes if p.name == "model")
    assert pair.fms.raised and pair.hf.raised is None
    assert_no_hooks(candidate)
    with pytest.raises(RuntimeError, match="planted crash"):  # the default still raises
        run_pair(reference, candidate, probes, mode=mode)


def test_on_raise_is_validated():
    with pytest.raises(ValueError, match="on_raise must be one of"):
        run_pair(make_chain(), make_chain(), chain_probes(), on_raise="ignore")


def test_assert_no_hooks_reports_a_leftover_hook():
    model = make_chain()
    hooks = HookSet()
    hooks.forward(model.layers[2], lambda *a: None)
    with pytest.raises(AssertionError, match="layers.2"):
        assert_no_hooks(model)
    foreign = model.layers[3].register_forward_hook(lambda *a: None)  # not ours: only seen with ours_only=False
    hooks.remove_all()
    assert_no_hooks(model)
    with pytest.raises(AssertionError, match="layers.3"):
        assert_no_hooks(model, ours_only=False)
    foreign.remove()


# ---------------------------------------------------------------------------------------------------------------
# takes


class PairOut(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class Scaled(nn.Module):
    def forward(self, x, bias=None, *, scale):
        return x * scale + (0 if bias is None else bias)


class Takes(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.scaled = PairOut(), Scaled()

    def forward(self, x):
        doubled, plus_one = self.pair(x)
        return self.scaled(doubled, bias=plus_one, scale=torch.full_like(x, 3.0))


def test_capture_output_input_kwarg_and_tuple_element():
    model, x = Takes().eval(), torch.randn(2, 3)
    probes = [
        Probe("pair.first", "pair", "pair", hf_take="output[0]"),
        Probe("pair.second", "pair", "pair", hf_take="output[1]"),
        Probe("scaled.out", "scaled", "scaled", hf_take="output[0?]"),  # a tensor output is taken as itself
        Probe("scaled.x", "scaled", "scaled", hf_take="input[0]", teacher=()),
        Probe("scaled.x_by_name", "scaled", "scaled", hf_take="input.x", teacher=()),
        Probe("scaled.bias_by_position", "scaled", "scaled", hf_take="input[1]", teacher=()),  # passed by keyword
        Probe("scaled.scale", "scaled", "scaled", hf_take="input.scale", teacher=()),
    ]
    caps = capture_model(model, {"x": x}, probes)
    assert torch.equal(caps.get("pair.first"), x * 2)
    assert torch.equal(caps.get("pair.second"), x + 1)
    assert torch.equal(caps.get("scaled.out"), (x * 2) * 3 + (x + 1))
    assert torch.equal(caps.get("scaled.x"), x * 2)
    assert torch.equal(caps.get("scaled.x_by_name"), x * 2)
    assert torch.equal(caps.get("scaled.bias_by_position"), x + 1)
    assert torch.equal(caps.get("scaled.scale"), torch.full_like(x, 3.0))
    assert all(caps.calls(p.name) == 1 for p in probes)
    assert_no_hooks(model)


def test_take_that_does_not_fit_is_a_capture_error():
    model = Takes().eval()
    probes = [Probe("pair.whole", "pair", "pair"), Probe("scaled.missing", "scaled", "scaled",
                                                         hf_take="input.nothing", fms_take="input.nothing", teacher=())]
    _, result = run_pair(model, copy.deepcopy(model), probes, x=torch.randn(2, 3))
    whole, missing = result.probe("pair.whole"), result.probe("scaled.missing")
    assert whole.status == Status.CAPTURE_ERROR and "output[0]" in whole.propagated.detail
    assert missing.status == Status.CAPTURE_ERROR and "nothing" in missing.propagated.detail


def test_capture_is_a_copy_not_affected_by_later_in_place_ops():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            y = self.inner(x * 1)
            y += 100  # HF's mid-layer CTC does this to the block output
            return y

    x = torch.randn(4)
    caps = capture_model(InPlace().eval(), {"x": x}, [Probe("inner", "inner", "inner")])
    assert torch.equal(caps.get("inner"), x)


# ---------------------------------------------------------------------------------------------------------------
# teacher forcing, first divergence


def test_teacher_forced_separates_own_from_inherited_error():
    reference = make_chain()
    candidate = planted(reference, 2)
    _, result = run_pair(reference, candidate, chain_probes(), mode="teacher_forced")
    propagated = [p.status for p in result.probes]
    own = [p.teacher.status for p in result.probes]
    assert propagated == [Status.PASS, Status.PASS, Status.FAIL, Status.FAIL, Status.FAIL]
    assert own == [Status.PASS, Status.PASS, Status.FAIL, Status.PASS, Status.PASS]
    assert [p.attribution for p in result.probes] == ["ok", "ok", "own", "inherited", "inherited"]
    assert result.first_divergence == "layer.2" and result.first_own_error == "layer.2"
    # the own error of layer 2 is exactly the planted bias shift passed through tanh on the reference input
    with torch.no_grad():
        h = chain_input()
        for i in range(2):
            h = reference.layers[i](h)
        expected = (candidate.layers[2](h) - reference.layers[2](h)).abs().max().item()
    assert result.probe("layer.2").teacher.metrics.max_abs == pytest.approx(expected, rel=1e-6)
    assert_no_hooks(reference)
    assert_no_hooks(candidate)


def test_teacher_forced_values_equal_propagated_when_nothing_differs():
    reference = make_chain()
    pair, result = run_pair(reference, copy.deepcopy(reference), chain_probes(), mode="teacher_forced")
    assert result.passed
    for probe in result.probes:
        assert probe.teacher.metrics.max_abs == 0.0 and probe.propagated.metrics.max_abs == 0.0


def test_first_divergence_is_the_earliest_in_execution_order_not_table_order():
    reference = make_chain()
    candidate = planted(reference, 1, 3)
    probes = tuple(reversed(chain_probes()))  # declared last-to-first
    _, result = run_pair(reference, candidate, probes, mode="teacher_forced")
    assert result.first_divergence == "layer.1"
    assert result.first_own_error == "layer.1"
    assert result.probe("layer.3").attribution == "own"
    assert result.probe("layer.2").attribution == "inherited"


class Flat(nn.Module):
    """Same math as Block, but takes [N, D] rows: the HF input [B, T, D] cannot be substituted as is."""

    def __init__(self, block):
        super().__init__()
        self.linear = block.linear

    def forward(self, rows):
        return torch.tanh(self.linear(rows)) + rows


class FlatChain(nn.Module):
    def __init__(self, chain):
        super().__init__()
        self.layers = nn.ModuleList(Flat(b) for b in chain.layers)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for layer in self.layers:
            x = layer(x)
        return x.reshape(shape)


def test_teacher_forcing_records_inputs_it_cannot_substitute():
    reference = make_chain()
    candidate = FlatChain(reference).eval()
    probes = [Probe("layer.0", "layers.0", "layers.0")]
    _, result = run_pair(reference, candidate, probes, mode="teacher_forced")
    layer = result.probe("layer.0")
    assert layer.status == Status.SHAPE_MISMATCH  # propagated outputs have different shapes too
    assert layer.teacher.status == Status.SHAPE_MISMATCH
    assert "cannot substitute" in layer.teacher.detail and "[3, 7, 16]" in layer.teacher.detail


class FakeCache:
    """Stands in for an HF DynamicCache: an object a re-run would append to a second time."""


class CacheBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIM, DIM)

    def forward(self, x, cache=None):
        return torch.tanh(self.linear(x)) + x


class CachedOuter(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = CacheBlock()

    def forward(self, x):
        return self.layer(x, cache=FakeCache())


def test_teacher_forcing_refuses_a_kv_cache_argument():
    model = CachedOuter().eval()
    _, result = run_pair(model, copy.deepcopy(model), [Probe("layer", "layer", "layer")], mode="teacher_forced")
    layer = result.probe("layer")
    assert layer.status == Status.PASS
    assert layer.teacher.status == Status.CAPTURE_ERROR and "use_cache=False" in layer.teacher.detail


def test_missing_probes_say_why():
    reference = make_chain()
    probes = [Probe("nowhere", "layers.9", "layers.9"), Probe("never.ran", "unused", "unused")]
    _, result = run_pair(reference, copy.deepcopy(reference), probes)
    nowhere, never = result.probe("nowhere"), result.probe("never.ran")
    assert nowhere.status == Status.MISSING and "no module at 'layers.9'" in nowhere.propagated.detail
    assert never.status == Status.MISSING and "never ran" in never.propagated.detail
    assert result.first_divergence == "nowhere"


def test_training_mode_is_rejected():
    model = make_chain().train()
    with pytest.raises(ValueError, match="training mode"):
        capture_pair(chain_probes(), ModelRun(model, {"x": chain_input()}), ModelRun(make_chain(), {"x": chain_input()}),
                     hf_aliases=())
    assert_no_hooks(model)


# ---------------------------------------------------------------------------------------------------------------
# judging tensors


def test_nonfinite_shape_and_dtype_statuses():
    hf = torch.randn(4, 5)
    nan = hf.clone()
    nan[1, 2] = float("nan")
    result = compare(hf, nan, FP32)
    assert result.status == Status.NONFINITE and result.metrics.nonfinite_fms == 1
    same_nan = compare(nan, nan.clone(), FP32)  # identical NaN positions: judged on the finite elements
    assert same_nan.status == Status.PASS and "same 1 NaN/Inf" in same_nan.detail
    inf_sign = hf.clone()
    inf_sign[0, 0] = float("inf")
    neg = inf_sign.clone()
    neg[0, 0] = -float("inf")
    assert compare(inf_sign, neg, FP32).status == Status.NONFINITE
    shape = compare(hf, hf.reshape(5, 4), FP32)
    assert shape.status == Status.SHAPE_MISMATCH and shape.metrics is None
    dtype = compare(hf, hf.to(torch.float64), FP32)
    assert dtype.status == Status.DTYPE_MISMATCH and dtype.metrics.max_abs == 0.0


def test_metrics_match_their_definitions():
    g = torch.Generator().manual_seed(3)
    hf = torch.randn(50, generator=g, dtype=torch.float64)
    fms = hf + 1e-3 * torch.randn(50, generator=g, dtype=torch.float64)
    m = compare(hf, fms, FP32).metrics
    diff = (fms - hf).abs()
    assert m.max_abs == pytest.approx(diff.max().item())
    assert m.mean_abs == pytest.approx(diff.mean().item())
    assert m.max_rel == pytest.approx((diff / hf.abs()).max().item())
    assert m.cosine == pytest.approx(torch.nn.functional.cosine_similarity(hf, fms, dim=0).item())
    assert m.sqnr_db == pytest.approx(10 * math.log10((hf**2).sum().item() / ((fms - hf) ** 2).sum().item()))
    worst = int(diff.argmax())
    assert m.worst_index == [worst] and m.worst_hf == hf[worst].item() and m.worst_fms == fms[worst].item()
    assert m.outside_count == int((diff > 1e-3 + 1e-3 * hf.abs()).sum())
    assert m.tol_ratio == pytest.approx((diff / (1e-3 + 1e-3 * hf.abs())).max().item())


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_their_definitions_over_masked_and_nonfinite_elements(seed):
    """The same definitions where a validity mask drops rows, both sides hold the same NaN/Inf, and 10% of the
    elements may fall outside: computed here over the compared elements picked out by boolean indexing, against
    `compare`, which keeps every tensor whole and reads its metrics back at once."""
    g = torch.Generator().manual_seed(seed)
    hf = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    fms = hf + 1e-3 * torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    flat_hf, flat_fms = hf.view(-1), fms.view(-1)
    for index, value in ((3, math.nan), (40, math.inf), (100, -math.inf)):
        flat_hf[index] = flat_fms[index] = value
    flat_fms[7] = flat_hf[7] + 0.5  # one large error: the worst element
    valid = torch.tensor([True, False, True, True, False, True])
    tol = Tolerance(atol=1e-4, rtol=1e-3, max_outside_fraction=0.1)
    m = compare(hf, fms, tol, valid=valid).metrics
    keep = valid.view(6, 1, 1).expand_as(hf) & hf.isfinite() & fms.isfinite()
    a, b = fms[keep], hf[keep]
    diff, bound = (a - b).abs(), 1e-4 + 1e-3 * b.abs()
    allowed = math.floor(0.1 * diff.numel())
    assert (m.numel, m.masked_out) == (int(keep.sum()), 2 * 35)
    assert (m.nonfinite_hf, m.nonfinite_fms) == (2, 2)  # the Inf at flat index 40 lies in masked row 1
    assert m.max_abs == diff.max().item() and m.mean_abs == pytest.approx(diff.mean().item(), rel=1e-12)
    assert m.outside_count == int((diff > bound).sum())
    assert m.min_atol == pytest.approx(max(torch.sort(diff - 1e-3 * b.abs(), descending=True).values[allowed].item(),
                                           0.0), rel=1e-12)
    assert m.tol_ratio == pytest.approx(torch.sort(diff / bound, descending=True).values[allowed].item(), rel=1e-12)
    assert m.cosine == pytest.approx(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), rel=1e-12)
    assert m.worst_index == [0, 1, 0] and (m.worst_hf, m.worst_fms) == (hf[0, 1, 0].item(), fms[0, 1, 0].item())
    empty = compare(hf, fms, tol, valid=torch.zeros(6, dtype=torch.bool))
    assert empty.status == Status.EMPTY and "all 210 elements masked out" in empty.detail


@pytest.mark.parametrize("tol", [FP32, Tolerance(atol=0.0, rtol=0.0), Tolerance(1e-2, 1e-2, ulps=1.0),
                                 Tolerance(1e-4, 1e-3, max_outside_fraction=0.1)], ids=["fp32", "zero", "ulp", "frac"])
def test_the_whole_tensor_path_equals_the_element_wise_one(tol):
    """`compare` skips the element-wise exclusions where nothing is masked or non-finite (two finite sums say so);
    the same tensors with a masked-out row appended (NaN and a large error in it) take the element-wise path: every
    metric but the masked count, and the verdict, must be the same. Sums that overflow though every element is
    finite take the element-wise path and still count no NaN/Inf."""
    g = torch.Generator().manual_seed(7)
    hf = torch.randn(4, 9, 16, generator=g).bfloat16()
    hf[0, 0, :4] = 0.0  # zeros in the reference: relative error skips them
    fms = (hf.double() + 3e-3 * torch.randn(4, 9, 16, generator=g, dtype=torch.float64)).bfloat16()
    junk = torch.randn(1, 9, 16, generator=g).bfloat16()
    junk[0, 0, 0] = math.nan
    whole = compare(hf, fms, tol).to_dict()
    padded = compare(torch.cat([hf, junk]), torch.cat([fms, junk + 1]), tol,
                     valid=torch.tensor([True] * 4 + [False])).to_dict()
    assert (whole["metrics"].pop("masked_out"), padded["metrics"].pop("masked_out")) == (0, 9 * 16)
    for side in ("hf_shape", "fms_shape"):
        assert (whole.pop(side), padded.pop(side)) == ([4, 9, 16], [5, 9, 16])
    assert whole == padded and whole["metrics"]["numel"] == hf.numel()
    huge = torch.full((8,), 1e308, dtype=torch.float64)
    overflowing = compare(huge, huge.clone(), FP32)
    assert overflowing.status == Status.PASS and overflowing.metrics.numel == 8
    assert (overflowing.metrics.nonfinite_hf, overflowing.metrics.nonfinite_fms) == (0, 0)


@pytest.mark.parametrize("scale", [1e-4, 1e-3, 3e-3, 1e-2])
def test_error_to_tolerance_ratio_agrees_with_the_verdict(scale):
    g = torch.Generator().manual_seed(11)
    hf = torch.randn(300, generator=g)
    result = compare(hf, hf + scale * torch.randn(300, generator=g), FP32)
    assert (result.metrics.tol_ratio > 1) == (result.status == Status.FAIL)


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_min_passing_atol_is_exact(fraction):
    g = torch.Generator().manual_seed(5)
    hf = torch.randn(200, generator=g)
    fms = hf + 0.01 * torch.randn(200, generator=g)
    tol = Tolerance(atol=1e-6, rtol=2e-3, max_outside_fraction=fraction)
    need = compare(hf, fms, tol).metrics.min_atol
    assert need > 0
    at = compare(hf, fms, dataclasses.replace(tol, atol=need))
    below = compare(hf, fms, dataclasses.replace(tol, atol=math.nextafter(need, 0.0)))
    assert at.status == Status.PASS and below.status == Status.FAIL
    # the same verdict from torch's own closeness rule (no ulp term, fraction 0)
    if fraction == 0.0:
        torch.testing.assert_close(fms.double(), hf.double(), atol=need, rtol=2e-3)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(fms.double(), hf.double(), atol=need * 0.999, rtol=2e-3)


@pytest.mark.parametrize("dtype, bits, width", [(torch.float64, torch.int64, 64), (torch.float32, torch.int32, 32),
                                                (torch.float16, torch.int16, 16), (torch.bfloat16, torch.int16, 16)])
def test_ulp_is_the_gap_to_the_next_representable_value(dtype, bits, width):
    """`ulp(v, dtype)` (read off float64's exponent bits) against its definition, measured in the dtype itself: the
    gap from v to the next value up (the bit pattern plus one), over random bit patterns of every positive finite
    magnitude, subnormals and zero included."""
    g = torch.Generator().manual_seed(width)
    patterns = torch.randint(0, 2 ** (width - 1) - 1, (20000,), generator=g, dtype=torch.int64)
    patterns = torch.cat([patterns, torch.tensor([0, 1])]).to(bits)  # zero and the smallest subnormal
    values = patterns.view(dtype)
    values, patterns = values[torch.isfinite(values)], patterns[torch.isfinite(values)]
    up = (patterns + 1).view(dtype)
    keep = torch.isfinite(up)  # the largest finite value has no finite neighbour above
    gap = up[keep].double() - values[keep].double()  # exact: both are float64 values this close
    assert torch.equal(ulp(values[keep].double(), dtype), gap)


def test_ulp_term_accepts_adjacent_bfloat16_values():
    assert ulp(torch.tensor(16.0), torch.bfloat16).item() == 0.125
    assert ulp(torch.tensor(31.9), "bf16").item() / 2 == 0.0625  # half an ulp at |v| in [16, 32)
    assert ulp(torch.tensor(1.0), torch.float32).item() == 2.0**-23
    assert ulp(torch.tensor(0.0), torch.bfloat16).item() == 2.0 ** (-126 - 7)
    hf = torch.tensor([20.0], dtype=torch.bfloat16)
    neighbour = torch.nextafter(hf.float(), torch.tensor([100.0])).to(torch.bfloat16)
    neighbour = hf + 0.125 if neighbour.item() == hf.item() else neighbour
    assert neighbour.item() - hf.item() == 0.125
    assert compare(hf, neighbour, Tolerance(0.0, 0.0, ulps=1.0)).status == Status.PASS
    assert compare(hf, neighbour, Tolerance(0.0, 0.0, ulps=0.0)).status == Status.FAIL
    assert compare(hf, hf + 0.25, Tolerance(0.0, 0.0, ulps=1.0)).status == Status.FAIL


def test_tolerance_table_lookup():
    fp32 = tolerance_for(torch.float32, "cpu")
    assert (fp32.atol, fp32.rtol, fp32.ulps) == (1e-3, 1e-3, 0.0)
    assert tolerance_for("float32", torch.device("cuda", 0)) == fp32
    bf16 = tolerance_for(torch.bfloat16, "cuda")
    assert (bf16.atol, bf16.rtol, bf16.ulps) == (1e-2, 1e-2, 1.0)
    # a (dtype, device, class) entry refines one class only: bf16 logits carry the measured 40-layer floor
    bf16_logits = tolerance_for(torch.bfloat16, "cuda", "logits")
    assert (bf16_logits.atol, bf16_logits.rtol, bf16_logits.ulps) == (3e-2, 1e-2, 1.0)
    assert tolerance_for(torch.float32, "cpu", "logits") == fp32
    assert tolerance_for("float32", "cpu", overrides={"atol": 5e-3}).atol == 5e-3
    with pytest.raises(ValueError, match="no tolerance for dtype int8"):
        tolerance_for(torch.int8, "cpu")
    with pytest.raises(ValueError, match="unknown tolerance class"):
        tolerance_for(torch.float32, "cpu", "weights")


# ---------------------------------------------------------------------------------------------------------------
# two phases, determinism


def _factory(builder, registry):
    def build():
        model = builder()
        registry.append(weakref.ref(model))
        return model

    return build


def test_two_phase_equals_one_phase_and_frees_the_reference():
    reference = make_chain()
    candidate = planted(reference, 3, amount=0.2)
    refs = []
    alive_when_fms_built = []

    def build_fms():
        gc.collect()
        alive_when_fms_built.append(refs[0]() is not None)
        return copy.deepcopy(candidate)

    x = chain_input()
    for mode in ("propagated", "teacher_forced"):
        refs.clear()
        alive_when_fms_built.clear()
        one = capture_pair(chain_probes(), ModelRun(reference, {"x": x}), ModelRun(candidate, {"x": x}), mode=mode,
                           hf_aliases=())
        two = capture_pair(chain_probes(), ModelRun(_factory(lambda: copy.deepcopy(reference), refs), {"x": x}),
                           ModelRun(build_fms, {"x": x}), mode=mode, phases="two", hf_aliases=())
        assert two.plan.two_phase and not one.plan.two_phase
        assert alive_when_fms_built == [False]  # one model in memory at a time
        assert one.digest() == two.digest()
        assert isinstance(two.hf, Captures) and two.hf._file is not None and two.hf._file.suffix == ".safetensors"
        assert diff_captures(one).to_dict()["probes"] == diff_captures(two).to_dict()["probes"]


def test_auto_phase_plan():
    small, loaded = make_chain(), make_chain()
    assert not plan_phases(ModelRun(loaded, {}), ModelRun(small, {})).two_phase
    fits = plan_phases(ModelRun(make_chain, {}, param_bytes=1024), ModelRun(make_chain, {}, param_bytes=1024))
    assert not fits.two_phase and fits.available_bytes > fits.needed_bytes
    huge = plan_phases(ModelRun(make_chain, {}, param_bytes=1 << 60), ModelRun(make_chain, {}, param_bytes=1 << 60))
    assert huge.two_phase and "exceeds" in huge.reason
    assert plan_phases(ModelRun(make_chain, {}), ModelRun(make_chain, {})).two_phase  # unknown size: safe choice


def test_checkpoint_size_hint_reads_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(10, 3, dtype=torch.bfloat16), "b": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    save_file({"e": torch.zeros(2, 5, dtype=torch.float16)}, str(tmp_path / "b.safetensors"))
    assert checkpoint_param_bytes(tmp_path) == 30 * 2 + 4 * 4 + 10 * 2
    assert checkpoint_param_bytes(tmp_path, torch.float32) == (30 + 4 + 10) * 4
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        checkpoint_param_bytes(tmp_path / "empty")


def test_same_seed_gives_identical_captures():
    def digest(seed, input_seed=1):
        model = make_chain(seed)
        return capture_model(model, {"x": chain_input(input_seed)}, chain_probes()).digest()

    assert digest(0) == digest(0)
    assert digest(0) != digest(1)
    assert digest(0) != digest(0, input_seed=2)


# ---------------------------------------------------------------------------------------------------------------
# reports


@pytest.fixture(scope="module")
def planted_result():
    reference = make_chain()
    _, result = run_pair(reference, planted(reference, 2), chain_probes(), mode="teacher_forced")
    return result


def test_html_escapes_every_string_and_embeds_the_plot(planted_result):
    hostile = "<script>alert('x')</script>"
    probes = [dataclasses.replace(p, name=hostile + p.name, note=hostile) for p in planted_result.probes]
    result = dataclasses.replace(planted_result, probes=probes, first_divergence=probes[2].name,
                                 first_own_error=probes[2].name)
    report = build_report(result, run_metadata(device="cpu", dtype="float32", seed=0, checkpoint=hostile,
                                               mode="teacher_forced"))
    page = render_html(report)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;layer.2" in page
    assert page.count("<svg") == 1 and "</svg>" in page
    assert "<details" in page and "http://" not in page and "https://" not in page
    assert page.index("First divergence") < page.index("<svg") < page.index("All probes")


def test_json_round_trip(tmp_path, planted_result):
    report = build_report(planted_result, run_metadata(device="cpu", dtype="float32", seed=0, mode="teacher_forced"))
    path = write_json(report, tmp_path / "parity.json")

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads(path.read_text(), parse_constant=reject)  # strict JSON: no NaN / Infinity literals
    again = read_json(path)
    assert again == json.loads(json.dumps(report))
    assert result_from_report(again) == planted_result
    assert again["summary"]["first_divergence"]["name"] == "layer.2"
    assert again["summary"]["status_counts"] == {"pass": 2, "fail": 3}
    assert result_from_report(again).probe("layer.0").propagated.metrics.sqnr_db == math.inf


def test_terminal_table_names_the_first_divergence(planted_result):
    text = render_terminal(build_report(planted_result, {"mode": "teacher_forced"}))
    assert "PARITY FAIL" in text
    assert "first divergence: #2 layer.2 [fail]" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("3 layer.3", "4 layer.4"))]
    assert len(rows) == 2 and all("inherited" in row for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# probe table


def test_probe_rows_are_validated():
    with pytest.raises(ValueError, match="typeable"):
        Probe("bad name", "a", "b")
    with pytest.raises(ValueError, match="take spec"):
        Probe("p", "a", "b", hf_take="outputs[0]")
    with pytest.raises(ValueError, match="unknown adapter"):
        Probe("p", "a", "b", fms_adapter="transpose")
    with pytest.raises(ValueError, match="cannot be teacher-forced"):
        Probe("p", "a", "b", hf_take="input[0]", fms_take="input[0]")
    with pytest.raises(ValueError, match="duplicate probe name"):
        expand((Probe("p", "a", "b"), Probe("p", "c", "d")), {})


def test_layout_resolver_picks_whichever_layout_exists():
    legacy = nn.Module()
    legacy.encoder = nn.Module()
    legacy.encoder.layers = nn.ModuleList([nn.Linear(2, 2)])
    legacy.language_model = nn.Module()
    legacy.language_model.model = nn.Module()
    legacy.language_model.lm_head = nn.Linear(2, 2)
    current = nn.Module()
    current.model = nn.Module()
    current.model.encoder = legacy.encoder
    current.model.language_model = legacy.language_model.model
    current.lm_head = legacy.language_model.lm_head
    for path, legacy_path, current_path in [
        ("encoder.layers.0", "encoder.layers.0", "model.encoder.layers.0"),
        ("language_model.model", "language_model.model", "model.language_model"),
        ("language_model.lm_head", "language_model.lm_head", "lm_head"),
    ]:
        assert resolve_module(legacy, path, HF_LAYOUT_ALIASES)[0] == legacy_path
        assert resolve_module(current, path, HF_LAYOUT_ALIASES)[0] == current_path
    with pytest.raises(ProbeResolutionError, match="model.encoder.layers.5"):
        resolve_module(current, "encoder.layers.5", HF_LAYOUT_ALIASES)


@pytest.mark.parametrize("version, divides", [("4.57.6", True), ("5.9.0", True), ("5.10.1", False), ("5.23.0", False)])
def test_model_logits_adapter_follows_the_transformers_version(version, divides):
    assert hf_divides_logits(version) is divides
    dims = GraniteSpeechDims(encoder_layers=2, qformer_layers=1, decoder_layers=1, logits_scaling=8.0)
    logits = {p.name: p for p in granite_speech_probes(dims, version)}["logits"]
    assert logits.hf_adapter == ("identity" if divides else "div_logits_scaling(8.0)")
    assert torch.equal(build_adapter(logits.hf_adapter)(torch.full((2,), 16.0)), torch.full((2,), 16.0 if divides else 2.0))


def test_adapters_rope_permutations_are_inverse_and_qkv_split_checks_width():
    t = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)
    there = build_adapter("rope_halves_to_interleaved(6)")
    back = build_adapter("rope_interleaved_to_halves(6)")
    assert torch.equal(back(there(t)), t) and not torch.equal(there(t), t)
    assert there(t)[0, 0, :6].tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]  # (x0, y0, x1, y1, ...) per head
    fused = torch.randn(5, (4 + 2 * 2) * 3)
    assert torch.equal(build_adapter("qkv_split(k, 4, 2, 3)")(fused), fused[:, 12:18])
    with pytest.raises(ValueError, match="last dim of 24"):
        build_adapter("qkv_split(q, 4, 2, 3)")(torch.randn(5, 23))


TINY_SPEECH = dict(
    encoder_config=dict(input_dim=160, num_layers=4, hidden_dim=32, num_heads=4, dim_head=8, output_dim=11,
                        context_size=20, max_pos_emb=32, feedforward_mult=2, conv_kernel_size=5),
    projector_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                          encoder_hidden_size=32, cross_attention_frequency=1),
    text_config=dict(vocab_size=64, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=40, max_position_embeddings=256, logits_scaling=4.0, embedding_multiplier=3.0),
    audio_token_index=63,
)


@pytest.fixture(scope="module")
def tiny_hf_speech():
    import transformers
    config = transformers.GraniteSpeechConfig(**copy.deepcopy(TINY_SPEECH))
    torch.manual_seed(0)
    model = transformers.GraniteSpeechForConditionalGeneration(config).eval()
    # 30 encoder frames -> 2 windows of 15 -> 2 * 3 = 6 audio tokens
    inputs = {"input_ids": torch.tensor([[1, 2] + [63] * 6 + [3, 4, 5]]),
              "input_features": torch.randn(1, 30, 160, generator=torch.Generator().manual_seed(1)), "use_cache": False}
    return config, model, inputs


def test_granite_speech_table_resolves_on_a_tiny_hf_model(tiny_hf_speech):
    config, model, _ = tiny_hf_speech
    for detail in (False, True):
        probes = granite_speech_probes(config, detail=detail)
        per_block, per_decoder = 6, (6 if detail else 1)
        assert len(probes) == 1 + 4 * per_block + 1 + 2 + 1 + 1 + 3 * per_decoder + 3
        names = [p.name for p in probes]
        assert names.index("encoder.ctc_mid") == names.index("encoder.block.1") + 1  # after block L//2 (1-based)
        modules = dict(model.named_modules())
        legacy_layout = hasattr(model, "encoder")  # transformers 4.57; 5.10.1+ nests under .model
        for probe in probes:
            path, module = resolve_module(model, probe.hf, HF_LAYOUT_ALIASES)
            assert modules[path] is module
            if probe.name == "logits":
                assert path == "" and module is model
            elif legacy_layout:
                assert path == probe.hf
            else:
                assert path.startswith(("model.encoder.", "model.projector.", "model.language_model")) or path == "lm_head"


def _hf_as_candidate(probes, model):
    """The table with the FMS side pointed at the HF model itself (FMS paths are checked once the port exists)."""
    out = []
    for p in probes:
        path = resolve_module(model, p.hf, HF_LAYOUT_ALIASES)[0]
        out.append(dataclasses.replace(p, fms=path, fms_take=p.hf_take, fms_adapter=p.hf_adapter,
                                       teacher=tuple((hf, hf) for hf, _ in p.teacher)))
    return out


def test_granite_speech_table_captures_and_localizes_a_planted_fault(tiny_hf_speech):
    config, model, inputs = tiny_hf_speech
    probes = _hf_as_candidate(granite_speech_probes(config), model)
    same = capture_pair(probes, ModelRun(model, inputs), ModelRun(model, inputs), mode="teacher_forced",
                        hf_aliases=HF_LAYOUT_ALIASES)
    clean = diff_captures(same, masks={TEXT: text_mask(inputs)})
    assert clean.passed and clean.first_divergence is None
    assert all(p.calls_hf == 1 for p in clean.probes)
    assert clean.probe("decoder.inputs_embeds").propagated.hf_shape == [1, 11, 24]
    assert clean.probe("logits").propagated.hf_shape == [1, 11, 64]

    faulty = copy.deepcopy(model)
    encoder = faulty.model.encoder if hasattr(faulty, "model") else faulty.encoder
    with torch.no_grad():
        encoder.layers[1].conv.down_conv.bias.add_(0.05)
    result = diff_captures(capture_pair(probes, ModelRun(model, inputs), ModelRun(faulty, inputs), mode="teacher_forced",
                                        hf_aliases=HF_LAYOUT_ALIASES), masks={TEXT: text_mask(inputs)})
    assert result.first_divergence == "encoder.block.1.conv"
    assert result.first_own_error == "encoder.block.1.conv"
    assert result.probe("encoder.block.1.conv").attribution == "own"
    assert result.probe("encoder.block.1.ff1").status == Status.PASS
    assert all(p.attribution in ("ok", "inherited") for p in result.probes if p.name != "encoder.block.1.conv")
    assert_no_hooks(model)
    assert_no_hooks(faulty)


def test_decoder_detail_rows_match_real_fms_granite(tmp_path):
    """HF GraniteForCausalLM vs FMS Granite built from the same checkpoint: fused-QKV split and RoPE adapters."""
    import transformers
    from fms.models import get_model

    config = transformers.GraniteConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64,
                                        logits_scaling=4.0, embedding_multiplier=3.0, attention_multiplier=0.3,
                                        residual_multiplier=0.5)
    torch.manual_seed(0)
    hf = transformers.GraniteForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    fms = get_model("hf_pretrained", model_path=str(tmp_path), device_type="cpu", data_type=torch.float32).eval()
    dims = GraniteSpeechDims(0, 0, 2, 4.0, decoder_heads=4, decoder_kv_heads=2, decoder_head_dim=6)
    table = (Repeat("i", 0, "decoder_layers", granite_decoder_rows("model", "base_model", dims, detail=True)),
             Probe("decoder.norm", "model.norm", "base_model.dec_norm"), Probe("logits.head", "lm_head", "head"))
    probes = expand(table, dims.as_mapping())
    ids = torch.tensor([[1, 5, 7, 9, 11]])  # length != kvheads (FMS sdpa quirk, see fms.md)
    pair = capture_pair(probes, ModelRun(hf, {"input_ids": ids, "use_cache": False}), ModelRun(fms, lambda m: m(ids)),
                        mode="teacher_forced", hf_aliases=())
    masks = {TEXT: text_mask({"input_ids": ids})}
    result = diff_captures(pair, masks=masks)
    assert result.passed, render_terminal(build_report(result))
    assert all(p.teacher.status == Status.PASS for p in result.probes)
    # without the RoPE permutation the q and k projections differ, v does not: the adapter is doing real work
    no_rope = [dataclasses.replace(p, fms_adapter="identity") for p in probes]
    raw = diff_captures(capture_pair(no_rope, ModelRun(hf, {"input_ids": ids, "use_cache": False}),
                                     ModelRun(fms, lambda m: m(ids)), hf_aliases=()), masks=masks)
    assert raw.probe("decoder.layer.0.attn.q").status == Status.FAIL
    assert raw.probe("decoder.layer.0.attn.k").status == Status.FAIL
    assert raw.probe("decoder.layer.0.attn.v").status == Status.PASS


@pytest.mark.runs_at("session")  # the session's models: at --model 2b the real table on the real dimensions
def test_granite_speech_table_resolves_and_substitutes_on_both_real_models(
    hf_model, fms_model, hf_processor, speech_dataset, device, dtype
):
    """Every probe of the table (detailed decoder rows included) resolves on the HF reference AND the FMS port, every
    take applies, and every teacher-forced input can be substituted: the run yields numbers for every probe.
    (Whether those numbers are within tolerance is the parity suites' claim, not this one's.)"""
    from parity.granite.hf import set_hf_adapter

    set_hf_adapter(hf_model, True)
    clip = torch.tensor(speech_dataset[0]["audio"]["array"], dtype=torch.float32)
    batch = hf_processor(text=["<|audio|> transcribe this."], audio=[clip], return_tensors="pt")
    common = {"input_ids": batch["input_ids"].to(device), "input_features": batch["input_features"].to(device, dtype),
              "input_features_mask": batch["input_features_mask"].to(device)}
    probes = granite_speech_probes(hf_model.config, detail=True)
    pair = capture_pair(probes, ModelRun(hf_model, {**common, "use_cache": False}), ModelRun(fms_model, common),
                        mode="teacher_forced", hf_aliases=HF_LAYOUT_ALIASES)
    result = diff_captures(pair, dtype=dtype, device=device, masks={TEXT: text_mask(common)})
    assert_no_hooks(hf_model)
    assert_no_hooks(fms_model)
    for probe in result.probes:
        assert probe.propagated.metrics is not None, f"{probe.name}: {probe.status} {probe.propagated.detail}"
        assert (probe.calls_hf, probe.calls_fms) == (1, 1), probe.name
        if probe.name in ("decoder.inputs_embeds", "logits"):
            assert probe.teacher.status == Status.NOT_APPLICABLE
        else:
            assert probe.teacher.metrics is not None, f"{probe.name}: {probe.teacher.status} {probe.teacher.detail}"


def test_a_tensor_on_cuda_0_is_on_the_device_cuda(monkeypatch):
    """`torch.device("cuda") != torch.device("cuda:0")`: the float64 room (parking the working models in host memory
    on a small card) must still find the models a "cuda" run holds on its card."""
    from types import SimpleNamespace

    from parity.granite.models import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda where, device: on_device(SimpleNamespace(device=torch.device(where)), torch.device(device))  # noqa
    assert on("cuda:0", "cuda") and on("cuda:0", "cuda:0") and on("cpu", "cpu")
    assert not on("cuda:1", "cuda") and not on("cuda:0", "cuda:1") and not on("cpu", "cuda")
    assert not on("cuda:0", "cpu")


class _CardModel(torch.nn.Module):
    """A model whose one parameter says where it lives ("cuda" or "cpu") without a card: `.to` moves the label."""

    def __init__(self, values: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(values, dtype=dtype), requires_grad=False)
        self.weight.where = "cuda"

    def to(self, where, *args, **kwargs):
        self.weight.where = torch.device(where).type
        return self


def test_the_float64_room_parks_the_fewest_working_models_other_dtypes_first(monkeypatch, tmp_path):
    """On a card too small for the float64 copies beside every working model, only as many models wait in host
    memory as make the room (each round trip of a 2b model costs seconds), the other dtypes' before the case's own;
    they come back after, and HF's float64 copy stays on the card when they fit beside it."""
    import parity.granite.models as granite_models  # where `Models` and `shortfall` look these names up

    card = 3000  # bytes
    hf32, fms32, fms32_audio = (_CardModel(100, torch.float32) for _ in range(3))  # 400 bytes each
    hf16, fms16 = _CardModel(100, torch.bfloat16), _CardModel(100, torch.bfloat16)  # 200 bytes each
    hf64 = _CardModel(100, torch.float64)  # 800 bytes
    everything = (hf32, fms32, fms32_audio, hf16, fms16, hf64)
    held = lambda: sum(m.weight.numel() * m.weight.element_size() for m in everything  # noqa: E731
                       if m.weight.where == "cuda")
    monkeypatch.setattr(granite_models, "on_device", lambda tensor, device: getattr(tensor, "where", "cpu") == "cuda")
    monkeypatch.setattr(granite_models, "available_bytes", lambda device: card - held())
    monkeypatch.setattr(granite_models, "free_memory", lambda: None)
    models = granite_models.Models(tmp_path, torch.bfloat16, torch.device("cuda"),
                                   hf={torch.float32: hf32, torch.bfloat16: hf16, torch.float64: hf64},
                                   fms={(torch.float32, "merged"): fms32, (torch.float32, "audio_only"): fms32_audio,
                                        (torch.bfloat16, "merged"): fms16})
    assert models.float64_bytes() == 8 * (100 + 100)  # HF's copy and FMS's (here all audio path) in float64
    with models.float64_room():
        inside = {name for name, m in zip(("hf32", "fms32", "fms32_audio", "hf16", "fms16", "hf64"), everything)
                  if m.weight.where == "cpu"}
        # free 600 + HF's float64 copy 800 (reused) < 1.25 x 1600: two float32 models out make 2200 >= 2000
        assert len(inside) == 2 and inside < {"hf32", "fms32", "fms32_audio"}, inside
    assert all(m.weight.where == "cuda" for m in everything), "every model back on the card, HF's float64 copy too"


@pytest.mark.gpu
@pytest.mark.runs_at("toy", device="session", dtype="float32")
def test_metrics_on_the_card_equal_the_hosts(run_scope):
    """`compare` and the row floors computed on the run's card (`Workspace.for_run`, what a CUDA run uses) give the
    host's maxima, counts, worst element and verdict, and its sums to 1e-12."""
    from parity.diff import HOST, Workspace, compare, row_floors
    from parity.tolerances import Tolerance

    if run_scope.device.type != "cuda":
        pytest.skip("needs --device cuda: the card's workspace is what a CUDA run uses")
    work = Workspace.for_run(run_scope.device)
    assert work.device.type == "cuda" and work.of(1 << 20).type == "cuda"
    g = torch.Generator().manual_seed(7)
    hf = torch.randn(3, 40, 512, generator=g).to(torch.bfloat16).float()
    fms = hf + 0.02 * torch.randn(hf.shape, generator=g)
    fms[1, 5, 7] += 3.0  # one badly wrong element
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[2, 30:] = False
    tol = Tolerance(1e-2, 1e-2, 2.0, 0.0, "a 16-bit-like rule with an ulp term")
    on_host, on_card = (compare(hf, fms, tol, ulp_dtype="bfloat16", valid=valid, work=w) for w in (HOST, work))
    assert on_card.status == on_host.status == "fail"
    host, card = on_host.metrics, on_card.metrics
    for name in ("numel", "outside_count", "max_abs", "min_atol", "tol_ratio", "ref_absmax", "worst_index",
                 "worst_hf", "worst_fms", "masked_out"):
        assert getattr(card, name) == getattr(host, name), name
    for name in ("mean_abs", "cosine", "sqnr_db"):
        assert getattr(card, name) == pytest.approx(getattr(host, name), rel=1e-12), name
    hf64 = hf.double() + 1e-3 * torch.randn(hf.shape, generator=g, dtype=torch.float64)
    assert torch.equal(row_floors(hf, hf64, "bfloat16", valid, work).cpu(), row_floors(hf, hf64, "bfloat16", valid))


def test_models_no_later_case_uses_are_freed(tmp_path):
    """compare frees a working model after its last case: the bf16 case of a float32 run holds only the bf16 pair,
    so its float64 copies find room on an 80 GB card at 2b without parking."""
    from parity.granite import pipeline
    from parity.granite.cases import default_cases
    from parity.granite.models import Models

    cases = default_cases()
    transcribed = pipeline._transcribe_case(cases)
    last = cases[-1]
    assert last.dtype == "bfloat16" and transcribed is not last
    assert pipeline._models_used(cases[-1:], torch.float32, transcribed) == ({(torch.bfloat16, "merged")},
                                                                            {torch.bfloat16})
    fms, hf = pipeline._models_used(cases, torch.float32, transcribed)
    assert (torch.float32, "audio_only") in fms and torch.float32 in hf
    models = Models(tmp_path, torch.float32, torch.device("cpu"),
                    hf={dtype: _CardModel(4, dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16)},
                    fms={(torch.float32, "merged"): _CardModel(4, torch.float32),
                         (torch.float32, "audio_only"): _CardModel(4, torch.float32),
                         (torch.bfloat16, "merged"): _CardModel(4, torch.bfloat16)})
    models.at(torch.bfloat16).keep_only(*pipeline._models_used(cases[-1:], torch.float32, transcribed))
    assert set(models.fms) == {(torch.bfloat16, "merged")}
    assert set(models.hf) == {torch.bfloat16, torch.float64}, "HF's float64 copy stays (replaced when needed)"


def test_heap_frozen_unfreezes_even_when_the_run_raises():
    """`compare` freezes the heap alive at its start out of the collector (free_memory then scans only what the run
    made); after the run, failed or not, nothing may stay frozen: a frozen cycle holding a model is never freed."""
    before = gc.get_freeze_count()
    with pytest.raises(RuntimeError, match="run failed"):
        with heap_frozen():
            assert gc.get_freeze_count() > before
            raise RuntimeError("run failed")
    assert gc.get_freeze_count() == before
