"""The fast decode step's primitives against the FMS modules they stand in for, bit for bit in 16-bit: the step
re-implements them without FMS's module machinery (CUDA-graph friendly), and a difference of one 16-bit rounding
(statistics in bf16 instead of fp32) is below what a whole-model comparison of random weights can tell from noise."""

import pytest
import torch
from fms.modules.layernorm import LayerNormParameterized

from granite_speech.fast_generate import _rms_norm


SCALES = pytest.mark.parametrize("scale", [1e-2, 1.0, 60.0])


def _check_rms_norm(dtype: torch.dtype, scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    width = 256
    norm = LayerNormParameterized(width, elementwise_shift=False, use_mean=False, eps=1e-5,
                                  use_high_precision_pow=True).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=generator))
    # rows of mixed magnitudes: the variance of a row spans several binades, where 16-bit statistics round
    x = (torch.randn(8, 5, width, generator=generator) * scale
         * torch.logspace(-1, 1, width).roll(3)).to(dtype)
    with torch.no_grad():
        expected = norm(x)
        got = _rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), f"max |diff| {(got.float() - expected.float()).abs().max().item():.3g}"


@pytest.mark.runs_at("toy", device="cpu", dtype="bfloat16")
@SCALES
def test_rms_norm_is_fms_decoder_norm_bit_for_bit_bf16(run_scope, scale):
    _check_rms_norm(run_scope.dtype, scale)


@pytest.mark.runs_at("toy", device="cpu", dtype="float16")
@SCALES
def test_rms_norm_is_fms_decoder_norm_bit_for_bit_fp16(run_scope, scale):
    _check_rms_norm(run_scope.dtype, scale)


@pytest.mark.runs_at("toy", device="cpu", dtype="float32")
@SCALES
def test_rms_norm_is_fms_decoder_norm_bit_for_bit_fp32(run_scope, scale):
    _check_rms_norm(run_scope.dtype, scale)
