"""Config fuzzing: random valid HF Granite Speech configs either match HF or are refused loudly, never a silent
mismatch.

Each example draws an HF `GraniteSpeechConfig` (encoder layers/dims/heads/context/kernel/max_pos_emb; projector
window/downsample/queries/layers/cross-attention frequency/activation; text dims/GQA/head_dim/multipliers/biases/
tie flags/RoPE type and table size; adapter rank/alpha/targets/rslora) and, now and then, one setting the port does
not implement. transformers builds the model from it (its own classes), every weight is re-drawn at a scale where
attention, activations and the adapter matter, `save_pretrained` writes it and peft's
`get_peft_model(...).save_pretrained` writes the adapter into a fresh folder. Then
`get_model("hf_pretrained", model_path=folder)` either

- loads, and its logits on a batch with audio (one row left-padded through `attention_mask`, the sequence often
  longer than `max_position_embeddings`) match HF's `from_pretrained` of the same folder at 1e-4 relative in fp32,
  or
- raises `UnsupportedConfigError` naming exactly the unsupported setting the example drew.

Profiles (env GRANITE_SPEECH_FUZZ): `ci` (default) runs a fixed-seed set of 40 configs; `release` runs 300 random
ones. The explicit tests below pin the cases of the issue that started the audit.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import transformers
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

import granite_speech  # noqa: F401  (registers the architecture with FMS)
from fms.models import get_model
from granite_speech.checkpoint.config_audit import UnsupportedConfigError
from parity.granite.hf import TRANSFORMERS_VERSION, hf_logits_to_fms, load_hf_model, set_hf_adapter

TF5 = TRANSFORMERS_VERSION.major >= 5
pytestmark = pytest.mark.runs_at("toy", device="cpu", dtype="float32")  # its own small drawn configs
RTOL = 1e-4  # max |FMS - HF| over valid positions <= RTOL * max |HF|

_PROFILES = {
    "ci": dict(max_examples=40, derandomize=True, print_blob=True),
    "release": dict(max_examples=300, derandomize=False, print_blob=True),
}
FUZZ_PROFILE = os.environ.get("GRANITE_SPEECH_FUZZ", "ci")
if FUZZ_PROFILE not in _PROFILES:
    raise ValueError(f"GRANITE_SPEECH_FUZZ must be one of {sorted(_PROFILES)}, got {FUZZ_PROFILE!r}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread_quiet():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    yield
    if progress:
        transformers.utils.logging.enable_progress_bar()
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- the spec
@dataclass
class Spec:
    """One drawn configuration: HF config kwargs, adapter kwargs (None: no adapter), inputs, and the settings the
    port must refuse (field path -> value) -- empty when it must match HF."""

    config: Dict[str, Any]
    adapter: Optional[Dict[str, Any]]
    frames: int
    text_before: int
    text_after: int
    left_pad: int
    seed: int
    unsupported: Dict[str, Any] = field(default_factory=dict)


SUPPORTED_ACTS = ("gelu", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh", "sigmoid", "mish")
UNSUPPORTED_ACTS = ("gelu_new", "quick_gelu", "relu6")


def _rope_kwargs(rope_type: str, theta: float, params: Dict[str, Any]) -> Dict[str, Any]:
    """The text_config keys of a RoPE setting in the installed transformers line's own format."""
    if TF5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    return {"rope_theta": theta, "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type, **params}}


@st.composite
def specs(draw) -> Spec:
    unsupported: Dict[str, Any] = {}
    # how many unsupported settings this example gets (at most one, about one example in five)
    exotic = draw(st.sampled_from(["none"] * 8 + ["projector_act", "text_act", "rope", "adapter"]))

    # encoder
    enc_heads = draw(st.integers(1, 3))
    context = draw(st.integers(2, 12))
    encoder = dict(
        input_dim=draw(st.sampled_from([6, 10, 16])),
        num_layers=draw(st.integers(1, 3)),
        hidden_dim=draw(st.sampled_from([8, 12, 16, 24])),
        feedforward_mult=draw(st.integers(1, 3)),
        num_heads=enc_heads,
        dim_head=draw(st.sampled_from([4, 6, 8])),
        output_dim=draw(st.integers(2, 9)),
        context_size=context,
        max_pos_emb=context + draw(st.integers(0, 6)),
        conv_kernel_size=draw(st.integers(1, 6)),
        conv_expansion_factor=draw(st.integers(1, 2)),
        dropout=0.1,
    )

    # projector
    proj_heads = draw(st.integers(1, 3))
    proj_act = draw(st.sampled_from(SUPPORTED_ACTS))
    if exotic == "projector_act":
        proj_act = draw(st.sampled_from(UNSUPPORTED_ACTS))
        unsupported["projector_config.hidden_act"] = proj_act
    projector = dict(
        hidden_size=proj_heads * draw(st.sampled_from([4, 6, 8])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=proj_heads,
        intermediate_size=draw(st.integers(4, 24)),
        encoder_hidden_size=encoder["hidden_dim"],
        cross_attention_frequency=draw(st.integers(1, 3)),
        hidden_act=proj_act,
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 1e-2])),
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    downsample = draw(st.integers(1, 3))
    window = downsample * draw(st.integers(1, 3))

    # text
    kvheads = draw(st.integers(1, 3))
    heads = kvheads * draw(st.integers(1, 3))
    hidden = draw(st.sampled_from([12, 16, 24, 32]))
    natural_head_dim = hidden // heads
    # RoPE needs an even head_dim; HF's dynamic RoPE divides by head_dim - 2, so 2 is no valid HF config
    natural_ok = natural_head_dim % 2 == 0 and natural_head_dim >= 4
    head_dim = draw(st.sampled_from(sorted({4, 8} | ({natural_head_dim} if natural_ok else set()))))
    vocab = draw(st.integers(40, 90))
    text_act = draw(st.sampled_from(SUPPORTED_ACTS))
    if exotic == "text_act":
        text_act = draw(st.sampled_from(UNSUPPORTED_ACTS))
        unsupported["text_config.hidden_act"] = text_act
    theta = draw(st.sampled_from([100.0, 10_000.0, 1_000_000.0]))
    max_pos = draw(st.sampled_from([8, 16, 32, 64, 256]))
    rope_type = draw(st.sampled_from(["default", "default", "linear", "llama3"]))
    if exotic == "rope":
        rope_type = draw(st.sampled_from(["dynamic", "yarn"]))
    rope_params: Dict[str, Any] = {}
    if rope_type in ("linear", "dynamic", "yarn"):
        rope_params["factor"] = draw(st.sampled_from([2.0, 4.0, 8.0]))
    if rope_type == "llama3":
        rope_params.update(factor=draw(st.sampled_from([2.0, 8.0])), low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=draw(st.sampled_from([4, 8, 16])))
    if rope_type in ("dynamic", "yarn"):
        unsupported[f"text_config.{'rope_parameters' if TF5 else 'rope_scaling'}.rope_type"] = rope_type
    text = dict(
        model_type="granite",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=draw(st.integers(4, 40)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kvheads,
        hidden_act=text_act,
        max_position_embeddings=max_pos,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        embedding_multiplier=draw(st.sampled_from([1.0, 3.0, 12.0])),
        residual_multiplier=draw(st.sampled_from([0.22, 0.5, 1.0])),
        attention_multiplier=draw(st.sampled_from([1.0 / head_dim, head_dim**-0.5, 0.3])),
        logits_scaling=draw(st.sampled_from([1.0, 2.5, 8.0])),
        pad_token_id=draw(st.sampled_from([None, 0, 1])),
        **_rope_kwargs(rope_type, theta, rope_params),
    )
    if head_dim != natural_head_dim:
        text["head_dim"] = head_dim  # HF's attention reads it when present
    text_tie = draw(st.sampled_from([True, False, None]))
    if text_tie is not None:
        text["tie_word_embeddings"] = text_tie

    config = dict(
        encoder_config=encoder,
        projector_config=projector,
        text_config=text,
        audio_token_index=vocab - 1,
        window_size=window,
        downsample_rate=downsample,
    )
    top_tie = draw(st.sampled_from([True, False, None]))
    if top_tie is not None:
        config["tie_word_embeddings"] = top_tie

    adapter = None
    if exotic == "adapter" or draw(st.integers(0, 5)) > 0:
        targets = draw(st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj"]), min_size=1, max_size=3, unique=True))
        adapter = dict(r=draw(st.integers(1, 6)), lora_alpha=draw(st.integers(1, 24)), target_modules=sorted(targets),
                       use_rslora=draw(st.booleans()))
        if exotic == "adapter":
            name, value = draw(st.sampled_from([("use_dora", True), ("layers_to_transform", [0]),
                                                ("rank_pattern", {targets[0]: 2})]))
            adapter[name] = value
            unsupported[f"adapter_config.{name}"] = value

    return Spec(
        config=config,
        adapter=adapter,
        frames=draw(st.integers(1, 4 * window + 3)),
        text_before=draw(st.integers(0, 4)),
        text_after=draw(st.integers(1, 5)),
        left_pad=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
        unsupported=unsupported,
    )


# ---------------------------------------------------------------------------------------------- building
@torch.no_grad()
def _redraw_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every weight at a scale where it matters: matrices ~ N(0, 1/fan_in), norm weights 1 +- 0.2, biases +- 0.1,
    BatchNorm statistics far from (0, 1). HF's own init (std 0.02 at these widths) leaves attention uniform and the
    activations linear, where most bugs are invisible."""

    def randn(shape):
        return torch.randn(shape, generator=generator)

    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.copy_(1.0 + 0.2 * randn(param.shape) if name.endswith("weight") else 0.1 * randn(param.shape))
        elif name.endswith("query"):  # the Q-Former queries [1, Q, H]
            param.copy_(randn(param.shape))
        else:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(randn(param.shape) / math.sqrt(fan_in))
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.5 * randn(buffer.shape))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + 1.5 * torch.rand(buffer.shape, generator=generator))


def write_checkpoint(folder, config: Dict[str, Any], adapter: Optional[Dict[str, Any]], seed: int) -> None:
    """HF builds the model from `config`, weights are re-drawn, `save_pretrained` writes it; peft writes the
    adapter with `get_peft_model(...).save_pretrained`."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    generator = torch.Generator().manual_seed(seed)
    hf_config = GraniteSpeechConfig(**json.loads(json.dumps(config)))
    model = GraniteSpeechForConditionalGeneration(hf_config).eval()
    _redraw_weights(model, generator)
    model.save_pretrained(str(folder))
    if adapter is None:
        return
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**adapter, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name and param.ndim == 2:  # A [r, in], B [out, r]: visible, not dominant
                param.copy_(0.5 * torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    # transformers 4.57 loads the base named here (peft leaves it unset for an in-memory model)
    peft_model.peft_config["default"].base_model_name_or_path = str(folder)
    peft_model.save_pretrained(str(folder))


def make_inputs(config: Dict[str, Any], frames: int, text_before: int, text_after: int, left_pad: int, seed: int):
    """A batch of 2 with audio: row 1 is `left_pad` tokens shorter on the left (pads, attention_mask 0)."""
    generator = torch.Generator().manual_seed(seed + 1)
    enc, text = config["encoder_config"], config["text_config"]
    window, downsample = config["window_size"], config["downsample_rate"]
    n_audio = -(-frames // window) * (window // downsample)
    audio_id = config["audio_token_index"]
    features = torch.randn(2, frames, enc["input_dim"], generator=generator)

    def tokens(n):
        return torch.randint(1, audio_id, (n,), generator=generator)

    rows, masks = [], []
    for row in range(2):
        pad = left_pad if row == 1 else 0
        before = max(text_before - pad, 0)
        pad = text_before - before
        ids = torch.cat([torch.full((pad,), text.get("pad_token_id") or 0), tokens(before),
                         torch.full((n_audio,), audio_id), tokens(text_after)])
        rows.append(ids)
        masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(ids) - pad, dtype=torch.long)]))
    return torch.stack(rows), torch.stack(masks), features


def hf_logits(folder, ids, mask, features, has_adapter: bool, logits_scaling: float) -> torch.Tensor:
    model = load_hf_model(folder)
    if has_adapter:
        set_hf_adapter(model, True)  # HF's forward never toggles it; audio inference runs with it on
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, input_features=features).logits
    return hf_logits_to_fms(out, logits_scaling)


def fms_logits(model, ids, mask, features) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, input_features=features, attention_mask=mask)


def assert_logits_match(fms: torch.Tensor, hf: torch.Tensor, mask: torch.Tensor, what: str = "") -> float:
    valid = mask.bool()
    assert fms.shape == hf.shape, f"{what} logits shape {tuple(fms.shape)} != HF {tuple(hf.shape)}"
    diff = (fms - hf)[valid].abs().max().item()
    scale = hf[valid].abs().max().item()
    assert diff <= RTOL * scale, f"{what} max |FMS - HF| = {diff:.3g} > {RTOL} * max |HF| = {RTOL * scale:.3g}"
    return diff / scale


def run_spec(spec: Spec, folder) -> str:
    """'matched' or 'refused: <path>'; fails on a mismatch, on a refusal of anything supported, or on a load of
    anything unsupported."""
    write_checkpoint(folder, spec.config, spec.adapter, spec.seed)
    try:
        model = get_model("hf_pretrained", model_path=str(folder))
    except UnsupportedConfigError as err:
        assert spec.unsupported, f"a supported config was refused: {err}"
        assert err.path in spec.unsupported, f"refused {err.path!r}, expected one of {sorted(spec.unsupported)}: {err}"
        assert repr(spec.unsupported[err.path]) in str(err) and "supported" in str(err), str(err)
        return f"refused: {err.path}"
    assert not spec.unsupported, f"loaded although {spec.unsupported} is not implemented"
    assert not model.training, "get_model must return the model in eval mode"
    ids, mask, features = make_inputs(spec.config, spec.frames, spec.text_before, spec.text_after, spec.left_pad,
                                      spec.seed)
    logits_scaling = spec.config["text_config"]["logits_scaling"]
    reference = hf_logits(folder, ids, mask, features, spec.adapter is not None, logits_scaling)
    assert_logits_match(fms_logits(model, ids, mask, features), reference, mask)
    return "matched"


# ---------------------------------------------------------------------------------------------- the fuzz
_OUTCOMES: List[Tuple[str, float]] = []
_FEATURES: Dict[str, int] = {}


def _features(spec: Spec) -> List[str]:
    """What an example exercised, for the summary (so a profile that stops covering something shows it)."""
    text = spec.config["text_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    window, downsample = spec.config["window_size"], spec.config["downsample_rate"]
    length = spec.text_before + spec.text_after + -(-spec.frames // window) * (window // downsample)
    kvheads = text["num_key_value_heads"]
    out = [f"rope={rope.get('rope_type', 'default')}", f"act={spec.config['projector_config']['hidden_act']}",
           f"tie=({spec.config.get('tie_word_embeddings')},{text.get('tie_word_embeddings')})"]
    out += ["gqa"] if kvheads != text["num_attention_heads"] else []
    out += ["head_dim!=hidden/heads"] if "head_dim" in text else []
    out += ["biases"] if text["attention_bias"] or text["mlp_bias"] else []
    out += ["beyond max_position_embeddings"] if length > text["max_position_embeddings"] else []
    out += ["length==kvheads"] if length == kvheads else []
    out += ["left-padded"] if min(spec.left_pad, spec.text_before) > 0 else []
    if spec.adapter is None:
        out.append("no adapter")
    else:
        out += ["rslora"] if spec.adapter.get("use_rslora") else []
        out.append("targets=" + "+".join(t[0] for t in spec.adapter["target_modules"]))
    return out


@settings(
    **_PROFILES[FUZZ_PROFILE],
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
@given(spec=specs())
def test_random_configs_match_hf_or_are_refused(spec, tmp_path_factory):
    note(f"spec={spec}")
    start = time.perf_counter()
    outcome = run_spec(spec, tmp_path_factory.mktemp("fuzz"))
    event(outcome)
    _OUTCOMES.append((outcome, time.perf_counter() - start))
    for feature in _features(spec):
        _FEATURES[feature] = _FEATURES.get(feature, 0) + 1


def test_fuzz_summary():
    """The fuzz ran the profile's number of configs and most of them matched (refusals are the minority)."""
    if not _OUTCOMES:
        pytest.skip("run together with test_random_configs_match_hf_or_are_refused")
    matched = sum(1 for outcome, _ in _OUTCOMES if outcome == "matched")
    refused = len(_OUTCOMES) - matched
    print(f"\nconfig fuzz ({FUZZ_PROFILE}): {len(_OUTCOMES)} configs, {matched} matched HF, {refused} refused "
          f"({sorted(o for o, _ in _OUTCOMES if o != 'matched')}), {sum(t for _, t in _OUTCOMES):.1f} s\n"
          f"exercised: {dict(sorted(_FEATURES.items()))}")
    assert len(_OUTCOMES) >= _PROFILES[FUZZ_PROFILE]["max_examples"]
    assert matched >= refused


# ---------------------------------------------------------------------------------------------- the issue's cases
# A small config in an informative regime; each case below changes what the issue reported as silently wrong.
BASE_CONFIG: Dict[str, Any] = dict(
    encoder_config=dict(input_dim=16, num_layers=2, hidden_dim=24, feedforward_mult=2, num_heads=2, dim_head=8,
                        output_dim=7, context_size=10, max_pos_emb=12, conv_kernel_size=4, conv_expansion_factor=2),
    projector_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                          encoder_hidden_size=24, cross_attention_frequency=1, hidden_act="gelu"),
    text_config=dict(model_type="granite", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.125,
                     logits_scaling=8.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None, **_rope_kwargs("default", 10_000.0, {})),
    audio_token_index=63,
    window_size=6,
    downsample_rate=3,
    tie_word_embeddings=True,
)
BASE_ADAPTER: Dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=False)


def _merged(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key.endswith("_config"):
            out[key].update(value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _case(config_changes=None, adapter_changes=None, frames=17, text_before=3, text_after=4, left_pad=2, seed=7,
          drop_text_keys=()) -> Spec:
    config = _merged(BASE_CONFIG, config_changes or {})
    for key in drop_text_keys:
        config["text_config"].pop(key)
    adapter = None if adapter_changes == "none" else {**BASE_ADAPTER, **(adapter_changes or {})}
    return Spec(config, adapter, frames, text_before, text_after, left_pad, seed)


ISSUE_CASES = {
    # projector_config.hidden_act other than gelu was ignored (relu: audio embeddings off by 0.31)
    "projector-relu": _case({"projector_config": {"hidden_act": "relu"}}),
    # text RoPE scaling was dropped (linear, factor 4: logits off by 3.9)
    "rope-linear-x4": _case({"text_config": _rope_kwargs("linear", 10_000.0, {"factor": 4.0})}),
    "rope-llama3": _case({"text_config": _rope_kwargs("llama3", 10_000.0, dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))}),
    # use_rslora was ignored (alpha / r instead of alpha / sqrt(r): logits off by 1.7e-2)
    "rslora": _case(adapter_changes={"use_rslora": True}),
    # attention_mask was accepted and ignored (left-padded batch: logits off by 0.10)
    "left-padded-batch": _case(text_before=4, left_pad=3),
    # top-level tie_word_embeddings true, text_config silent: HF ties and writes no lm_head (we raised)
    "tie-top-level-only": _case(drop_text_keys=("tie_word_embeddings",)),
    "untied": _case({"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": False}}),
    "tie-text-only": _case({"tie_word_embeddings": False}),
    # positions beyond max_position_embeddings (a 10-minute clip crashed inside FMS RoPE)
    "positions-beyond-max": _case({"text_config": {"max_position_embeddings": 8}}, frames=40),
    # FMS SDPA mis-reads keys when the sequence length equals kvheads (no cache)
    "length-equals-kvheads": _case({"text_config": {"num_key_value_heads": 3, "num_attention_heads": 3,
                                                    "head_dim": 8}}, frames=5, text_before=0, text_after=1,
                                   left_pad=0),
    "gqa-4-to-1-biases": _case({"text_config": {"num_key_value_heads": 1, "attention_bias": True,
                                                "mlp_bias": True}}),
    "all-targets-no-adapter-scale-1": _case(adapter_changes={"target_modules": ["k_proj", "q_proj", "v_proj"],
                                                             "lora_alpha": 4}),
    "no-adapter": _case(adapter_changes="none"),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_issue_case_matches_hf(name, tmp_path):
    assert run_spec(ISSUE_CASES[name], tmp_path) == "matched"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    spec = ISSUE_CASES["left-padded-batch"]
    write_checkpoint(folder, spec.config, spec.adapter, spec.seed)
    return folder


def test_attention_mask_of_another_shape_is_refused(base_folder):
    model = get_model("hf_pretrained", model_path=str(base_folder))
    ids, mask, features = make_inputs(BASE_CONFIG, 17, 3, 4, 2, 0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ seq_len\]"):
        model(ids, input_features=features, attention_mask=mask[:, 1:])


def test_attention_mask_that_would_be_ignored_is_refused(base_folder):
    from granite_speech.model import padding_attn_kwargs

    model = get_model("hf_pretrained", model_path=str(base_folder))
    ids, mask, features = make_inputs(BASE_CONFIG, 17, 3, 4, 2, 0)
    with pytest.raises(ValueError, match="attention_mask was given together with mask and position_ids"):
        model(ids, input_features=features, attention_mask=mask, **padding_attn_kwargs(mask))
    # either form alone gives the same logits
    with torch.no_grad():
        by_mask = model(ids, input_features=features, **padding_attn_kwargs(mask))
        by_attention_mask = model(ids, input_features=features, attention_mask=mask)
    torch.testing.assert_close(by_attention_mask, by_mask, rtol=0, atol=0)


def test_generate_past_max_position_embeddings_matches_hf(tmp_path):
    """FMS generate (KV cache, the generation hook turning attention_mask into mask/position_ids) on a left-padded
    batch whose prompt + new tokens run past max_position_embeddings gives HF generate's tokens and logits."""
    from fms.utils.generation import generate

    spec = _case({"text_config": {"max_position_embeddings": 8}}, frames=13, text_before=4, left_pad=3)
    write_checkpoint(tmp_path, spec.config, spec.adapter, spec.seed)
    ids, mask, features = make_inputs(spec.config, spec.frames, spec.text_before, spec.text_after, spec.left_pad,
                                      spec.seed)
    new = 6
    model = get_model("hf_pretrained", model_path=str(tmp_path))
    steps: List[torch.Tensor] = []

    def keep_logits(position, logits, next_val, kwargs):
        steps.append(logits)
        return next_val, kwargs

    with torch.no_grad():
        ours = generate(model, ids, max_seq_len=ids.size(1) + new, max_new_tokens=new, do_sample=False,
                        use_cache=True, prepare_model_inputs_hook=model.prepare_inputs_for_generation,
                        post_iteration_hook=keep_logits,
                        extra_kwargs={"input_features": features, "attention_mask": mask})
        hf = load_hf_model(tmp_path)
        theirs = hf.generate(input_ids=ids, attention_mask=mask, input_features=features, max_new_tokens=new,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert ids.size(1) + new > spec.config["text_config"]["max_position_embeddings"]
    assert torch.equal(ours[:, ids.size(1):], theirs.sequences[:, ids.size(1):])
    scaling = spec.config["text_config"]["logits_scaling"]
    for step, (fms_step, hf_step) in enumerate(zip(steps, theirs.scores)):
        assert_logits_match(fms_step, hf_logits_to_fms(hf_step, scaling), torch.ones(fms_step.shape[:1]),
                            what=f"step {step}")
