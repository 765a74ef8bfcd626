"""torch.compile(fullgraph=True) of the FMS model's pieces equals eager within the tolerance table.

Covered: the Conformer encoder, the Q-Former projector, the whole audio path (encoder + projector), the full forward
with audio merged at the placeholders, and one decoder step ([B, 1] token on the KV cache of an eager prefill).
For each, `torch._dynamo.explain` counts graph breaks (recorded as junit properties and asserted 0), then the
inductor-compiled function is compared with eager by the harness's judge (`parity.diff.compare`).

The eager reference always runs first: it also warms FMS's per-device RoPE cache, whose cold start is a known
data-dependent graph break on CUDA (fms.md §5). Inputs are small so that CPU compiles stay short.
"""

import pytest
import torch

from parity.diff import compare
from parity.tolerances import tolerance_for


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def audio_inputs(fms_model, device, dtype):
    """Two clips of 2 * window + 2 encoder frames (the last projector window and the last attention block are both
    partial), with 1 fewer valid window in the second clip, and prompts holding exactly the valid audio tokens."""
    cfg = fms_model.config
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


def _explain(name, fn, args, record_property):
    explanation = torch._dynamo.explain(fn)(*args)
    record_property(f"{name}_graph_breaks", explanation.graph_break_count)
    record_property(f"{name}_graph_count", explanation.graph_count)
    reasons = [str(reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"{name}: graph breaks {reasons}"
    assert explanation.graph_count == 1, f"{name}: {explanation.graph_count} graphs"
    torch._dynamo.reset()


def _judge(name, compiled, eager, dtype, device, record_property):
    result = compare(eager, compiled, tolerance_for(dtype, device))
    record_property(f"{name}_compiled_vs_eager_max_abs_diff", result.metrics.max_abs)
    assert result.passed, f"{name}: compiled vs eager {result.status}: {result.detail}"
    # the comparison can fail: compiled output is not a constant or all-zero tensor
    assert result.metrics.ref_absmax > 0 and compiled.float().std() > 0


@torch.no_grad()
def test_encoder_compiles_fullgraph(fms_model, audio_inputs, dtype, device, record_property):
    features = audio_inputs["input_features"]
    eager = fms_model.encoder(features)
    _explain("encoder", fms_model.encoder, (features,), record_property)
    compiled = torch.compile(fms_model.encoder, fullgraph=True)(features)
    _judge("encoder", compiled, eager, dtype, device, record_property)


@torch.no_grad()
def test_projector_compiles_fullgraph(fms_model, audio_inputs, dtype, device, record_property):
    encoded = fms_model.encoder(audio_inputs["input_features"])
    eager = fms_model.projector(encoded)
    _explain("projector", fms_model.projector, (encoded,), record_property)
    compiled = torch.compile(fms_model.projector, fullgraph=True)(encoded)
    _judge("projector", compiled, eager, dtype, device, record_property)


@torch.no_grad()
def test_full_forward_with_audio_compiles_fullgraph(fms_model, audio_inputs, dtype, device, record_property):
    def forward(input_ids, input_features, input_features_mask):
        return fms_model(input_ids, input_features=input_features, input_features_mask=input_features_mask)

    args = (audio_inputs["input_ids"], audio_inputs["input_features"], audio_inputs["input_features_mask"])
    eager = forward(*args)
    _explain("full_forward", forward, args, record_property)
    compiled = torch.compile(forward, fullgraph=True)(*args)
    _judge("full_forward_logits", compiled, eager, dtype, device, record_property)


@torch.no_grad()
def test_decoder_step_on_kv_cache_compiles_fullgraph(fms_model, audio_inputs, dtype, device, record_property):
    ids = audio_inputs["input_ids"]
    prefill_logits, cache = fms_model(
        ids,
        input_features=audio_inputs["input_features"],
        input_features_mask=audio_inputs["input_features_mask"],
        use_cache=True,
    )
    next_token = prefill_logits[:, -1].argmax(-1, keepdim=True)
    position_ids = torch.full_like(next_token, ids.size(1))

    def decode_step(token, past_key_value_states, position_ids):
        return fms_model(token, past_key_value_states=past_key_value_states, use_cache=True,
                         position_ids=position_ids)

    args = (next_token, cache, position_ids)
    eager_logits, eager_cache = decode_step(*args)
    _explain("decode_step", decode_step, args, record_property)
    compiled_logits, compiled_cache = torch.compile(decode_step, fullgraph=True)(*args)
    _judge("decode_step_logits", compiled_logits, eager_logits, dtype, device, record_property)
    assert len(compiled_cache) == len(eager_cache) == fms_model.config.text_config.nlayers
    for layer, ((k_c, v_c), (k_e, v_e)) in enumerate(zip(compiled_cache, eager_cache)):
        assert k_c.shape[2] == ids.size(1) + 1  # the step appended one position to the prefill cache
        _judge(f"decode_step_layer{layer}_keys", k_c, k_e, dtype, device, record_property)
        _judge(f"decode_step_layer{layer}_values", v_c, v_e, dtype, device, record_property)
