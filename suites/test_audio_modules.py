"""ConformerEncoder and QFormerProjector against HF's GraniteSpeechCTCEncoder / GraniteSpeechEncoderProjector.

fp32 on CPU at fixed toy sizes (`fixed:toy/cpu/float32` in the test ids, whatever --model says), HF as the oracle. HF modules get realistic-scale random weights (see `_randomise_weights`: HF's init
leaves norms ~identity and attention ~uniform, which would hide mistakes), copied through the modules' own HF -> FMS name maps.
Every comparison records the max |diff| (`record_property`) and asserts it <= 1e-5; the planted-fault tests show that
realistic mistakes move the output far beyond that tolerance.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from granite_speech import conformer, projector
from granite_speech.config import conformer_config_from_hf, projector_config_from_hf
from granite_speech.conformer import ConformerEncoder
from granite_speech.projector import QFormerProjector

import transformers  # noqa: E402  (a hard dependency: no importorskip escape hatch)
from transformers.models.granite_speech.configuration_granite_speech import (  # noqa: E402
    GraniteSpeechConfig as HFGraniteSpeechConfig,
)
from transformers.models.granite_speech.modeling_granite_speech import (  # noqa: E402
    GraniteSpeechCTCEncoder,
    GraniteSpeechEncoderProjector,
)

TF_MAJOR = int(transformers.__version__.split(".")[0])
# Q-Former kernels HF offers: 4.57's Blip2QFormer is eager only (it refuses sdpa, tested below), 5.x has both
QFORMER_KERNELS = ("eager", "sdpa") if TF_MAJOR >= 5 else ("eager",)

TOL = 1e-5
FAULT_MIN_DIFF = 10 * TOL  # a planted fault must move the output at least 10x the tolerance

# Tiny dims of the contract: dim_head 24 != hidden 64 / heads 4; context 40 < max_pos_emb 64.
ENCODER = dict(
    input_dim=160, num_layers=4, hidden_dim=64, num_heads=4, dim_head=24, context_size=40, max_pos_emb=64,
    output_dim=42, feedforward_mult=4, conv_kernel_size=15, conv_expansion_factor=2, dropout=0.1,
)
# Odd layer count (self-conditioning after block 1), even depthwise kernel (asymmetric padding), context == max_pos_emb.
ENCODER_EVEN_KERNEL = dict(
    ENCODER, num_layers=3, conv_kernel_size=4, context_size=32, max_pos_emb=32, feedforward_mult=2,
    conv_expansion_factor=1,
)
PROJECTOR = dict(
    model_type="blip_2_qformer", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    encoder_hidden_size=64, cross_attention_frequency=2, layer_norm_eps=1e-12,
)
TEXT = dict(model_type="granite", hidden_size=48, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=99)
WINDOW, DOWNSAMPLE = 15, 5

C = ENCODER["context_size"]
LENGTHS = {
    "below_one_block": 7,
    "exactly_context": C,  # 40
    "window_multiple": 75,  # 5 windows, 1 block + 35
    "context_and_window_multiple": 120,
    "k_context_plus_r_97": 97,
    "k_context_plus_r_123": 123,
}


def _hf_config(encoder=ENCODER, cross_attention_frequency=2, qformer_attn=None) -> HFGraniteSpeechConfig:
    """qformer_attn None: the installed version's default Q-Former kernel (4.57 eager, 5.x SDPA)."""
    config = HFGraniteSpeechConfig(
        encoder_config=dict(encoder),
        projector_config=dict(PROJECTOR, cross_attention_frequency=cross_attention_frequency),
        text_config=dict(TEXT),
        window_size=WINDOW,
        downsample_rate=DOWNSAMPLE,
    )
    if qformer_attn is not None:
        config.projector_config._attn_implementation = qformer_attn
    return config


def _randomise_weights(module: torch.nn.Module, seed: int) -> None:
    """Realistic-scale weights: HF's init (std 0.02) leaves attention almost uniform and GELU almost linear, which
    hides mistakes (tanh GELU differs from erf GELU by < 1e-6 there). Linear/conv weights get std fan_in**-0.5
    (unit-variance activations), biases and the Shaw table std 0.1 / 1, norms non-identity affine, BatchNorm
    non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * fan_in**-0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))


def _renamed(hf_module: torch.nn.Module, rename, drop_batches_tracked: bool = False) -> dict:
    return {
        rename(key): value
        for key, value in hf_module.state_dict().items()
        if not (drop_batches_tracked and key.endswith("num_batches_tracked"))
    }


def _hf_encode(hf_encoder, x: torch.Tensor) -> torch.Tensor:
    out = hf_encoder(x)
    return getattr(out, "last_hidden_state", out)  # 5.x returns a ModelOutput, 4.57 a tensor


def _features(batch: int, frames: int, seed: int, dim: int = ENCODER["input_dim"]) -> torch.Tensor:
    return torch.randn(batch, frames, dim, generator=torch.Generator().manual_seed(seed))


def _check(record_property, name: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != HF {tuple(reference.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite output"
    max_diff = (ours - reference).abs().max().item()
    record_property(f"max_abs_diff[{name}]", max_diff)
    print(f"{name}: max |diff| = {max_diff:.3e} (output max |x| = {reference.abs().max().item():.3f})")
    assert max_diff <= TOL, f"{name}: max |diff| {max_diff:.3e} > {TOL}"
    return max_diff


def _build_encoders(encoder=ENCODER, seed=0):
    torch.manual_seed(seed)
    hf_config = _hf_config(encoder)
    hf = GraniteSpeechCTCEncoder(hf_config.encoder_config).eval()
    _randomise_weights(hf, seed + 1)
    ours = ConformerEncoder(conformer_config_from_hf(hf_config.encoder_config)).eval()
    ours.load_state_dict(_renamed(hf, conformer.hf_to_fms_name), strict=True)
    return hf, ours


def _build_projectors(cross_attention_frequency=2, qformer_attn=None, seed=0):
    torch.manual_seed(seed)
    hf_config = _hf_config(cross_attention_frequency=cross_attention_frequency, qformer_attn=qformer_attn)
    hf = GraniteSpeechEncoderProjector(hf_config).eval()
    _randomise_weights(hf, seed + 1)
    ours = QFormerProjector(
        projector_config_from_hf(
            hf_config.projector_config, window_size=WINDOW, downsample_rate=DOWNSAMPLE, text_dim=TEXT["hidden_size"]
        )
    ).eval()
    ours.load_state_dict(_renamed(hf, projector.hf_to_fms_name), strict=True)
    return hf, ours


pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.runs_at("toy", device="cpu", dtype="float32")]


@pytest.fixture(scope="module")
def encoders():
    return _build_encoders()


@pytest.fixture(scope="module")
def projectors():
    return _build_projectors()


# ----------------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("frames", list(LENGTHS.values()), ids=list(LENGTHS))
def test_encoder_matches_hf(encoders, record_property, frames, batch):
    hf, ours = encoders
    x = _features(batch, frames, seed=frames * 10 + batch)
    with torch.no_grad():
        _check(record_property, f"encoder T={frames} B={batch}", ours(x), _hf_encode(hf, x))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: the reference
@pytest.mark.parametrize("frames", list(LENGTHS.values()), ids=list(LENGTHS))
def test_encoder_with_the_flex_attention_kernel_matches_hf(encoders, record_property, frames):
    """The flex_attention kernel (Shaw term by a score_mod, the last block's padding by a block mask) against HF's
    math path, eager: every block count, a padded last block and a single short one, in a padded batch of 2."""
    hf, ours = encoders
    x = _features(2, frames, seed=frames * 10 + 7)
    ours.set_attention_kernel("flex")
    try:
        with torch.no_grad():
            _check(record_property, f"encoder flex T={frames}", ours(x), _hf_encode(hf, x))
    finally:
        ours.set_attention_kernel("math")


def test_an_unknown_attention_kernel_is_refused(encoders):
    _, ours = encoders
    with pytest.raises(ValueError, match="attention kernel must be one of \\('math', 'flex'\\), got 'sdpa'"):
        ours.set_attention_kernel("sdpa")
    assert all(layer.attn.kernel == "math" for layer in ours.layers)


@pytest.mark.parametrize("frames", [5, 32, 70])
def test_encoder_even_kernel_odd_layers_matches_hf(record_property, frames):
    hf, ours = _build_encoders(ENCODER_EVEN_KERNEL, seed=3)
    assert ours.layers[0].conv.depth_padding == (2, 1)
    x = _features(2, frames, seed=frames)
    with torch.no_grad():
        _check(record_property, f"encoder K=4 L=3 T={frames}", ours(x), _hf_encode(hf, x))


def test_encoder_submodule_outputs_match_hf(encoders, record_property):
    """Each probed sub-module alone (same input, same weights) equals its HF counterpart."""
    hf, ours = encoders
    h = _features(2, 97, seed=5, dim=ENCODER["hidden_dim"])
    mine, theirs, dists = ours.layers[1], hf.layers[1], hf.attention_dists
    with torch.no_grad():
        for name in ("ff1", "conv", "ff2"):
            _check(record_property, f"layer1.{name}", getattr(mine, name)(h), getattr(theirs, name)(h))
        _check(record_property, "layer1.attn", mine.attn(h), theirs.attn(h, attention_dists=dists))
        _check(record_property, "layer1 block", mine(h), theirs(h, attention_dists=dists))


def test_encoder_relative_distances_equal_hf_buffer(encoders):
    hf, ours = encoders
    assert torch.equal(ours.layers[0].attn.relative_distances(torch.device("cpu")), hf.attention_dists)


def test_encoder_padded_batch_matches_hf(encoders, record_property):
    """Zero-padded utterances of different lengths: no mask on either side (HF attends to batch padding)."""
    hf, ours = encoders
    x = _features(3, 123, seed=11)
    x[1, 97:] = 0
    x[2, 40:] = 0
    with torch.no_grad():
        _check(record_property, "encoder padded batch", ours(x), _hf_encode(hf, x))


def test_encoder_built_on_meta_then_loaded_matches_hf(encoders, record_property):
    """get_model's path: build on meta, to_empty, load (adapter drops num_batches_tracked), post_init."""
    hf, _ = encoders
    config = conformer_config_from_hf(_hf_config().encoder_config)
    with torch.device("meta"):
        ours = ConformerEncoder(config)
    ours.to_empty(device="cpu")
    missing, unexpected = ours.load_state_dict(
        _renamed(hf, conformer.hf_to_fms_name, drop_batches_tracked=True), strict=False
    )
    # BatchNorm tolerates the missing counter (leaving to_empty's garbage in it); post_init zeroes it
    assert missing == [] and unexpected == []
    ours.post_init()
    ours.eval()
    # the Shaw index is computed in forward, so BatchNorm statistics are the only buffers
    assert all(".batch_norm." in name for name, _ in ours.named_buffers())
    assert all(block.conv.batch_norm.num_batches_tracked.item() == 0 for block in ours.layers)
    x = _features(3, 97, seed=13)
    with torch.no_grad():
        _check(record_property, "encoder meta-built", ours(x), _hf_encode(hf, x))


def test_encoder_compiles_fullgraph_and_matches_eager(record_property):
    hf, ours = _build_encoders(dict(ENCODER, num_layers=2), seed=7)  # 2 layers: half the CPU compile time
    x = _features(2, 97, seed=17)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = ours(x)
        # fullgraph=True raises at the first graph break, naming it. The traced graph runs through AOTAutograd
        # without inductor's code generation: inductor's numerics are test_compile.py's (the session model's
        # encoder) under --device cuda, where users compile
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
        _check(record_property, "encoder compiled vs eager", compiled, eager)
        _check(record_property, "encoder compiled vs HF", compiled, _hf_encode(hf, x))


def test_encoder_has_dropout_inactive_in_eval(encoders):
    _, ours = encoders
    dropouts = [m for m in ours.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 4 * ENCODER["num_layers"]  # ff1, attn, conv, ff2 of every block
    assert all(m.p == ENCODER["dropout"] for m in dropouts)
    x = _features(1, 50, seed=19)
    with torch.no_grad():
        assert torch.equal(ours(x), ours(x))


def test_encoder_rejects_bad_input(encoders):
    _, ours = encoders
    with pytest.raises(ValueError, match=r"\[batch, frames > 0, 160\].*\(2, 10, 80\)"):
        ours(torch.zeros(2, 10, 80))
    with pytest.raises(ValueError, match=r"\(10, 160\)"):
        ours(torch.zeros(10, 160))


def _swap_glu_halves(enc):
    for block in enc.layers:
        for p in (block.conv.up_conv.weight, block.conv.up_conv.bias):
            p.copy_(torch.cat(p.chunk(2, dim=0)[::-1], dim=0))


def _flip_shaw_direction(enc):  # table row P - (i - j) instead of P + (i - j): key minus query
    for block in enc.layers:
        block.attn.rel_pos_emb.weight.copy_(block.attn.rel_pos_emb.weight.flip(0))


def _unmask_last_block(enc):
    for block in enc.layers:
        attn = block.attn
        attn._last_block_padding_mask = lambda nb, valid, device, ctx=attn.context_size: torch.zeros(
            nb, 1, ctx, ctx, dtype=torch.bool, device=device
        )


def _batchnorm_eps_1e3(enc):
    for block in enc.layers:
        block.conv.batch_norm.eps = 1e-3


def _skip_self_conditioning(enc):
    enc.self_conditioning_layer = -1


ENCODER_FAULTS = {
    "glu_halves_swapped": _swap_glu_halves,
    "shaw_direction_flipped": _flip_shaw_direction,
    "last_block_padding_unmasked": _unmask_last_block,
    "batchnorm_eps_1e-3": _batchnorm_eps_1e3,
    "self_conditioning_skipped": _skip_self_conditioning,
}


@pytest.mark.parametrize("fault", list(ENCODER_FAULTS))
def test_encoder_planted_fault_is_caught(encoders, record_property, fault):
    hf, ours = encoders
    faulty = copy.deepcopy(ours)
    with torch.no_grad():
        ENCODER_FAULTS[fault](faulty)
        x = _features(2, 97, seed=23)
        reference = _hf_encode(hf, x)
        assert (ours(x) - reference).abs().max().item() <= TOL  # the unmodified copy passes
        max_diff = (faulty(x) - reference).abs().max().item()
    record_property(f"fault_max_abs_diff[{fault}]", max_diff)
    print(f"planted fault {fault}: max |diff| = {max_diff:.3e}")
    assert max_diff > FAULT_MIN_DIFF, f"planted fault {fault} moved the output only {max_diff:.3e}"


# --------------------------------------------------------------------------------------------- projector


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("frames", list(LENGTHS.values()), ids=list(LENGTHS))
def test_projector_matches_hf(projectors, record_property, frames, batch):
    hf, ours = projectors
    h = _features(batch, frames, seed=frames * 10 + batch, dim=PROJECTOR["encoder_hidden_size"])
    with torch.no_grad():
        out = ours(h)
        _check(record_property, f"projector T={frames} B={batch}", out, hf(h))
    assert out.shape == (batch, -(-frames // WINDOW) * (WINDOW // DOWNSAMPLE), TEXT["hidden_size"])


@pytest.mark.parametrize("qformer_attn", QFORMER_KERNELS)
@pytest.mark.parametrize("cross_attention_frequency", [1, 2])
def test_projector_variants_match_hf(record_property, cross_attention_frequency, qformer_attn):
    """Cross-attention in every layer (published checkpoints) or every other; HF's eager and SDPA Q-Former kernels."""
    hf, ours = _build_projectors(cross_attention_frequency, qformer_attn, seed=cross_attention_frequency)
    assert [layer.has_cross_attention for layer in ours.layers] == [
        index % cross_attention_frequency == 0 for index in range(PROJECTOR["num_hidden_layers"])
    ]
    h = _features(3, 97, seed=29, dim=PROJECTOR["encoder_hidden_size"])
    with torch.no_grad():
        _check(record_property, f"projector f={cross_attention_frequency} {qformer_attn}", ours(h), hf(h))


if TF_MAJOR < 5:  # collected on the 4.57 line only: what it does instead of the sdpa variant above

    def test_qformer_sdpa_is_refused_by_transformers_4():
        with pytest.raises(ValueError, match="does not support an attention implementation"):
            _build_projectors(2, "sdpa", seed=2)


def test_encoder_then_projector_padded_batch_matches_hf(encoders, projectors, record_property):
    """The audio path end to end on a zero-padded batch; padded frames of the last window are attended to (no mask),
    as in HF."""
    hf_enc, enc = encoders
    hf_proj, proj = projectors
    x = _features(3, 123, seed=31)
    x[1, 97:] = 0
    x[2, 40:] = 0
    with torch.no_grad():
        hf_h = _hf_encode(hf_enc, x)
        _check(record_property, "projector on HF encoder output, padded batch", proj(hf_h), hf_proj(hf_h))
        _check(record_property, "encoder+projector padded batch", proj(enc(x)), hf_proj(hf_h))


def test_projector_output_depends_on_the_audio(projectors):
    """Guards the tolerance: two different inputs give outputs far apart (the queries are not ignoring the audio)."""
    _, ours = projectors
    with torch.no_grad():
        a = ours(_features(1, 45, seed=37, dim=PROJECTOR["encoder_hidden_size"]))
        b = ours(_features(1, 45, seed=38, dim=PROJECTOR["encoder_hidden_size"]))
    assert (a - b).abs().max().item() > FAULT_MIN_DIFF


def test_projector_built_on_meta_then_loaded_matches_hf(projectors, record_property):
    hf, _ = projectors
    reference = projectors[1]
    with torch.device("meta"):
        ours = QFormerProjector(reference.config)
    ours.to_empty(device="cpu")
    ours.load_state_dict(_renamed(hf, projector.hf_to_fms_name), strict=True)
    ours.post_init()
    ours.eval()
    h = _features(3, 97, seed=41, dim=PROJECTOR["encoder_hidden_size"])
    with torch.no_grad():
        _check(record_property, "projector meta-built", ours(h), hf(h))


def test_projector_compiles_fullgraph_and_matches_eager(projectors, record_property):
    hf, ours = projectors
    h = _features(2, 97, seed=43, dim=PROJECTOR["encoder_hidden_size"])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = ours(h)
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")(h)  # inductor: as for the encoder
        _check(record_property, "projector compiled vs eager", compiled, eager)
        _check(record_property, "projector compiled vs HF", compiled, hf(h))


def test_projector_rejects_bad_input(projectors):
    _, ours = projectors
    with pytest.raises(ValueError, match=r"\[batch, frames > 0, 64\].*\(2, 10, 32\)"):
        ours(torch.zeros(2, 10, 32))
    with pytest.raises(ValueError, match=r"\(1, 0, 64\)"):
        ours(torch.zeros(1, 0, 64))


def _gelu_tanh(proj):
    for layer in proj.layers:
        ff = layer.ff
        ff.forward = lambda x, ff=ff: ff.ln(ff.w2(F.gelu(ff.w1(x), approximate="tanh")) + x)


def _swap_cross_key_value(proj):
    attn = proj.layers[0].cross_attn
    for name in ("weight", "bias"):
        key, value = getattr(attn.key, name), getattr(attn.value, name)
        saved = key.clone()
        key.copy_(value)
        value.copy_(saved)


def _mask_padded_frames(proj):
    """Excludes the zero padding of the last window from cross-attention (what HF does NOT do)."""
    for layer in proj.layers:
        if not layer.has_cross_attention:
            continue
        attn = layer.cross_attn

        def masked_forward(x, context, attn=attn):
            q, k, v = (attn._split_heads(lin(src)) for lin, src in ((attn.query, x), (attn.key, context),
                                                                   (attn.value, context)))
            real = context.abs().sum(-1) != 0  # [B*nb, W]: the test input has no all-zero real frames
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :], scale=attn.head_dim**-0.5)
            out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
            return attn.ln(attn.dense(out) + x)

        attn.forward = masked_forward


PROJECTOR_FAULTS = {
    "gelu_tanh_instead_of_erf": _gelu_tanh,
    "cross_attention_key_value_swapped": _swap_cross_key_value,
    "padded_frames_of_last_window_masked": _mask_padded_frames,
}


@pytest.mark.parametrize("fault", list(PROJECTOR_FAULTS))
def test_projector_planted_fault_is_caught(projectors, record_property, fault):
    hf, ours = projectors
    faulty = copy.deepcopy(ours)
    h = _features(2, 97, seed=47, dim=PROJECTOR["encoder_hidden_size"])
    with torch.no_grad():
        PROJECTOR_FAULTS[fault](faulty)
        reference = hf(h)
        assert (ours(h) - reference).abs().max().item() <= TOL
        max_diff = (faulty(h) - reference).abs().max().item()
    record_property(f"fault_max_abs_diff[{fault}]", max_diff)
    print(f"planted fault {fault}: max |diff| = {max_diff:.3e}")
    assert max_diff > FAULT_MIN_DIFF, f"planted fault {fault} moved the output only {max_diff:.3e}"


# ---------------------------------------------------------------------------------------------- name maps


def test_name_maps_cover_every_hf_key_and_tolerate_prefixes(encoders, projectors):
    for (hf, ours), module, prefix in ((encoders, conformer, "encoder."), (projectors, projector, "projector.")):
        hf_keys = list(hf.state_dict())
        renamed = [module.hf_to_fms_name(key) for key in hf_keys]
        assert sorted(renamed) == sorted(ours.state_dict()), set(renamed) ^ set(ours.state_dict())
        assert len(set(renamed)) == len(renamed)
        for key, new in zip(hf_keys, renamed):
            assert module.hf_to_fms_name(prefix + key) == prefix + new
            assert module.hf_to_fms_name(new) == new  # idempotent on FMS names
    assert conformer.hf_to_fms_name("out.weight") == "ctc_out.weight"
    assert conformer.hf_to_fms_name("out_mid.bias") == "ctc_out_mid.bias"
    assert conformer.hf_to_fms_name("layers.3.conv.depth_conv.conv.weight") == "layers.3.conv.depth_conv.weight"
    assert (
        projector.hf_to_fms_name("qformer.encoder.layer.1.crossattention.output.LayerNorm.weight")
        == "layers.1.cross_attn.ln.weight"
    )
    assert projector.hf_to_fms_name("linear.bias") == "out_proj.bias"
    assert projector.hf_to_fms_name("query") == "query"
