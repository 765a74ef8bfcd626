"""torch.compile(fullgraph=True) of the FMS model's pieces equals eager within the tolerance table.

Covered: the Conformer encoder, the Q-Former projector, the whole audio path (encoder + projector), the full forward
with audio merged at the placeholders, and one decoder step ([B, 1] token on the KV cache of an eager prefill).
Each is compiled with `fullgraph=True`, under which Dynamo raises at the first graph break (naming its reason)
instead of splitting the graph; a separate `torch._dynamo.explain` pass would trace the model a second time to find
the same. The compiled function is then compared with eager by `parity.testing.assert_compiled_parity` (the
documented gate and the tight regression bound beside it; the measured error is recorded). Runs on the session
checkpoint, device and dtype (`model:...` in the test id). At real dimensions the session model is cut, for this
module only, to its first SHALLOW_ENCODER encoder blocks (CTC self-conditioning after the middle one) and
SHALLOW_DECODER decoder layers: graph breaks and compiled-vs-eager agreement depend on the widths and the code path,
not the depth, while inductor's compile time grows with it (the 2b full forward took 193 s). The tiny model is
already that shallow: unchanged.

Backend: inductor on CUDA, where users compile; aot_eager on the CPU (`_backend`). Both run Dynamo's whole trace
(graph breaks, guards, what runs differently while compiling) and AOTAutograd's functionalization and
decompositions; inductor's CPU code generation adds a C++ compile that cost the CPU gate 108 s with a cold kernel
cache (30 s warm) and tests inductor, not the port (results/ci-time/README.md).

The eager reference always runs first: it also warms FMS's per-device RoPE cache, whose cold start is a known
data-dependent graph break on CUDA (fms.md §5). Inputs are small so that CPU compiles stay short.

16-bit runs: inductor keeps fused intermediates in fp32 where eager rounds every op's output to 16 bits, so compiled
and eager differ by eager's own rounding error (tiny encoder in bf16 on CPU, inductor: 0.06 apart, yet compiled is
the closer of the two to the fp32 value); `assert_compiled_parity` then applies compare's rule: every element outside
the table within 8x eager's own rounding error, per row, measured against the fp32 eager value.
(`torch._inductor.config.emulate_precision_casts`, made for this, crashes the CPU backend of torch 2.9.1.)
"""

import contextlib
import copy
import functools
import sys

import pytest
import torch

from parity.testing import assert_compiled_parity

pytestmark = pytest.mark.runs_at("session")

SHALLOW_ENCODER, SHALLOW_DECODER = 4, 2  # the tiny fixture's depths


def _backend(device: torch.device) -> str:
    return "inductor" if device.type == "cuda" else "aot_eager"


@contextlib.contextmanager
def _shallow(model):
    """The model cut to its first blocks and layers in place (restored after): the real widths, a few layers."""
    encoder, decoder = model.encoder, model.language_model.base_model
    saved = encoder.layers, encoder.self_conditioning_layer, decoder.layers, decoder.config.nlayers
    encoder.layers = torch.nn.ModuleList(list(encoder.layers)[:SHALLOW_ENCODER])
    encoder.self_conditioning_layer = min(encoder.self_conditioning_layer, len(encoder.layers) // 2)
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:SHALLOW_DECODER])
    decoder.config.nlayers = len(decoder.layers)
    try:
        yield model
    finally:
        encoder.layers, encoder.self_conditioning_layer, decoder.layers, decoder.config.nlayers = saved


@pytest.fixture(scope="module")
def compile_model(fms_model):
    with _shallow(fms_model) as model:
        yield model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def audio_inputs(compile_model, device, dtype):
    """Two clips of 2 * window + 2 encoder frames (the last projector window and the last attention block are both
    partial), with 1 fewer valid window in the second clip, and prompts holding exactly the valid audio tokens."""
    cfg = compile_model.config
    window, q = cfg.projector_config.window_size, cfg.projector_config.queries_per_window
    frames = 2 * window + 2
    tokens = -(-frames // window) * q
    g = torch.Generator().manual_seed(23)
    features = torch.randn(2, frames, cfg.encoder_config.input_dim, generator=g)
    valid = torch.tensor([[tokens], [tokens - q]])
    mask = torch.arange(tokens).unsqueeze(0) < valid
    audio_id = cfg.audio_token_index
    text = torch.randint(1, 200, (2, 4 + q), generator=g)
    ids = torch.stack(  # equal lengths: the second prompt's missing window is made up with text
        [
            torch.cat([text[0, :3], torch.full((tokens,), audio_id), text[0, 3:4]]),
            torch.cat([text[1, :3], torch.full((tokens - q,), audio_id), text[1, 3:]]),
        ]
    )
    return {"input_ids": ids.to(device), "input_features": features.to(device, dtype),
            "input_features_mask": mask.to(device)}


@pytest.fixture(scope="module")
def fp32_model(compile_model):
    """The fp32 copy of the (shallow) model, made on first use (only 16-bit runs whose compiled-vs-eager check
    misses)."""
    loaded = {}

    def get():
        if "model" not in loaded:
            loaded["model"] = _fp32_copy(compile_model)
        return loaded["model"]

    yield get
    loaded.clear()


def _judge(name, compiled, eager, fp32_reference, dtype, device, record_property, tolerance_class="activation"):
    """`fp32_reference()` computes the same value in fp32 eager; called only when needed (see the module doc)."""
    assert_compiled_parity(name, eager, compiled, fp32_reference, dtype=dtype, device=device,
                           tolerance_class=tolerance_class, record=record_property)


def _fp32_copy(module):
    return copy.deepcopy(module).float()


@pytest.mark.parametrize("kernel", ["math", "flex"])
@torch.no_grad()
def test_encoder_compiles_fullgraph(compile_model, audio_inputs, dtype, device, record_property, kernel):
    """The encoder with each attention kernel (`ConformerEncoder.set_attention_kernel`), traced whole and compiled,
    against the default math kernel run eagerly. "flex" is the fast encoder's candidate for issue 26, not yet its
    default: inductor fuses it on CUDA (on the CPU inductor has no flex_attention template for these shapes either:
    NoValidChoicesError, torch 2.9.1)."""
    name = "encoder" if kernel == "math" else f"encoder_{kernel}"
    features = audio_inputs["input_features"]
    encoder = compile_model.encoder
    eager = encoder(features)
    encoder.set_attention_kernel(kernel)
    try:
        compiled = torch.compile(encoder, fullgraph=True, backend=_backend(device))(features)
    finally:
        encoder.set_attention_kernel("math")
    _judge(name, compiled, eager, lambda: _fp32_copy(encoder)(features.float()), dtype, device, record_property)


@pytest.mark.gpu
@torch.no_grad()
def test_flex_encoder_compiles_in_bfloat16(compile_model, audio_inputs, device, record_property):
    """The flex encoder in bf16 whatever the session's dtype: inductor folds the score_mod's constants in the
    scores' dtype, where float32's lowest value overflows (it did, H100, 2b, 30 s). CUDA only: the CPU has no inductor
    flex kernel. The last attention block is partial, so the padding branch of the score_mod is traced."""
    if device.type != "cuda":
        pytest.skip("inductor's flex_attention kernel needs CUDA (run with --device cuda)")
    encoder = copy.deepcopy(compile_model.encoder).to(torch.bfloat16)
    features = audio_inputs["input_features"].to(torch.bfloat16)
    eager, fp32_encoder = encoder(features), _fp32_copy(encoder)
    encoder.set_attention_kernel("flex")
    compiled = torch.compile(encoder, fullgraph=True)(features)
    _judge("encoder_flex_bf16", compiled, eager, lambda: fp32_encoder(features.float()), torch.bfloat16, device,
           record_property)


@torch.no_grad()
def test_projector_compiles_fullgraph(compile_model, audio_inputs, dtype, device, record_property):
    encoded = compile_model.encoder(audio_inputs["input_features"])
    eager = compile_model.projector(encoded)
    compiled = torch.compile(compile_model.projector, fullgraph=True, backend=_backend(device))(encoded)
    _judge("projector", compiled, eager, lambda: _fp32_copy(compile_model.projector)(encoded.float()), dtype, device,
           record_property)


@torch.no_grad()
def test_full_forward_with_audio_compiles_fullgraph(compile_model, fp32_model, audio_inputs, dtype, device,
                                                    record_property):
    def forward(input_ids, input_features, input_features_mask, model=compile_model):
        return model(input_ids, input_features=input_features, input_features_mask=input_features_mask)

    args = (audio_inputs["input_ids"], audio_inputs["input_features"], audio_inputs["input_features_mask"])
    eager = forward(*args)
    compiled = torch.compile(forward, fullgraph=True, backend=_backend(device))(*args)
    reference = lambda: forward(args[0], args[1].float(), args[2], model=fp32_model())  # noqa: E731
    _judge("full_forward_logits", compiled, eager, reference, dtype, device, record_property, "logits")


def _prefill_then_step(model, audio_inputs, next_token=None, features_dtype=None):
    """Eager prefill with the KV cache; returns (next greedy token, the step's arguments)."""
    ids = audio_inputs["input_ids"]
    features = audio_inputs["input_features"]
    logits, cache = model(
        ids,
        input_features=features if features_dtype is None else features.to(features_dtype),
        input_features_mask=audio_inputs["input_features_mask"],
        use_cache=True,
    )
    if next_token is None:
        next_token = logits[:, -1].argmax(-1, keepdim=True)
    return next_token, (next_token, cache, torch.full_like(next_token, ids.size(1)))


@torch.no_grad()
def test_decoder_step_on_kv_cache_compiles_fullgraph(compile_model, fp32_model, audio_inputs, dtype, device,
                                                     record_property):
    def decode_step(token, past_key_value_states, position_ids, model=compile_model):
        return model(token, past_key_value_states=past_key_value_states, use_cache=True, position_ids=position_ids)

    next_token, args = _prefill_then_step(compile_model, audio_inputs)
    eager_logits, eager_cache = decode_step(*args)
    compiled_logits, compiled_cache = torch.compile(decode_step, fullgraph=True, backend=_backend(device))(*args)

    @functools.cache
    def fp32_step():
        _, fp32_args = _prefill_then_step(fp32_model(), audio_inputs, next_token, torch.float32)
        return decode_step(*fp32_args, model=fp32_model())

    _judge("decode_step_logits", compiled_logits, eager_logits, lambda: fp32_step()[0], dtype, device,
           record_property, "logits")
    assert len(compiled_cache) == len(eager_cache) == len(compile_model.language_model.base_model.layers)
    prompt_len = audio_inputs["input_ids"].size(1)
    for layer, ((k_c, v_c), (k_e, v_e)) in enumerate(zip(compiled_cache, eager_cache)):
        assert k_c.shape[2] == prompt_len + 1  # the step appended one position to the prefill cache
        for slot, (kind, compiled, eager) in enumerate((("keys", k_c, k_e), ("values", v_c, v_e))):
            _judge(f"decode_step_layer{layer}_{kind}", compiled, eager,
                   lambda layer=layer, slot=slot: fp32_step()[1][layer][slot], dtype, device, record_property)


@torch.no_grad()
def test_the_shallow_cut_runs_the_first_layers_and_is_undone(fms_model, monkeypatch):
    """The cut model runs exactly its first blocks and layers (one fewer of each than the tiny model has), and the
    session model is whole again afterwards."""
    encoder, decoder = fms_model.encoder, fms_model.language_model.base_model
    before = (list(encoder.layers), encoder.self_conditioning_layer, list(decoder.layers))
    monkeypatch.setattr(sys.modules[__name__], "SHALLOW_ENCODER", len(encoder.layers) - 1)
    monkeypatch.setattr(sys.modules[__name__], "SHALLOW_DECODER", len(decoder.layers) - 1)
    ran = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(decoder.layers)]
    try:
        with _shallow(fms_model):
            assert len(encoder.layers) == len(before[0]) - 1 and len(decoder.layers) == len(before[2]) - 1
            assert encoder.self_conditioning_layer == (len(before[0]) - 1) // 2
            fms_model(torch.tensor([[1, 2, 3]], device=next(fms_model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == list(range(len(before[2]) - 1))
    assert (list(encoder.layers), encoder.self_conditioning_layer, list(decoder.layers)) == before
