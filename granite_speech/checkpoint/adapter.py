"""HF -> FMS checkpoint adapter steps for Granite Speech (the audit they feed is `coverage`).

Steps registered for source "hf", in order:
  hf_to_fms_names  both HF layouts (hub/4.57 `encoder.*`, `language_model.model.*`; transformers-5 in-memory
                   `model.encoder.*`, `lm_head.*`) and PEFT keys (`base_model.model.` prefix) -> FMS names;
                   `num_batches_tracked` is dropped (eval BatchNorm never reads it)
  hf_to_fms_rope   HF rotates halves, FMS interleaved pairs: permute q/k rows (and the LoRA B rows feeding them)
  weight_fusion    q/k/v and gate/up fusion of the decoder (FMS's own steps)
  coverage_ledger  checks shapes and records every key handed to the model, for `coverage.audit_loaded_checkpoint`

FMS hands each step a *partial* state dict (one layer's keys, grouped by substring), so every step here maps keys
independently except fusion, whose inputs always share a layer prefix. The LoRA pairs are therefore loaded as
parameters of `ModalityLoRA` and merged in `post_init`, never inside a step.
"""

import re
from typing import Any, Dict, Mapping, Optional

import torch

from fms.models.granite import _hf_to_fms_names as _granite_hf_to_fms_names
from fms.utils import serialization

from granite_speech import conformer, projector
from granite_speech.checkpoint import coverage, layout
from granite_speech.checkpoint.coverage import CheckpointCoverageError
from granite_speech.config import GraniteSpeechConfig

_architecture_name = "granite_speech"

_LORA_KEY = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(lora_A|lora_B)(?:\.default)?\.weight$"
)


def hf_to_fms_name(key: str) -> Optional[str]:
    """FMS name of one HF checkpoint key; None for keys deliberately skipped. Unknown keys are kept verbatim so
    the coverage audit names them."""
    key = layout.to_hub(key)
    if coverage.SKIPPED.search(key):
        return None
    lora = _LORA_KEY.match(key)
    if lora:
        layer, target, which = lora.groups()
        return f"lora.layers.{layer}.{target}.{which}.weight"
    if key.startswith("encoder."):
        return "encoder." + conformer.hf_to_fms_name(key[len("encoder.") :])
    if key.startswith("projector."):
        return "projector." + projector.hf_to_fms_name(key[len("projector.") :])
    if key.startswith("language_model."):
        inner = key[len("language_model.") :]
        inner = "lm_head." + inner[len("lm_head.") :] if inner.startswith("lm_head.") else inner
        renamed = _granite_hf_to_fms_names({inner: None})
        return "language_model." + next(iter(renamed))
    return key


# FMS name prefix of each stack of numbered layers -> the config count bounding its index
_LAYER_STACKS = (
    (re.compile(r"^encoder\.layers\.(\d+)\."), lambda c: c.encoder_config.nlayers),
    (re.compile(r"^projector\.layers\.(\d+)\."), lambda c: c.projector_config.nlayers),
    (re.compile(r"^language_model\.base_model\.layers\.(\d+)\."), lambda c: c.text_config.nlayers),
    (re.compile(r"^lora\.layers\.(\d+)\."), lambda c: c.text_config.nlayers),
)


def _beyond_config(name: str, model_config: Optional[GraniteSpeechConfig]) -> bool:
    """A layer the config does not have: FMS's loader would crash on it (IndexError), so it is set aside for the
    coverage audit to name instead."""
    if model_config is None:
        return False
    for pattern, count in _LAYER_STACKS:
        match = pattern.match(name)
        if match:
            return int(match.group(1)) >= count(model_config)
    return False


def _hf_to_fms_names(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeechConfig] = None, **kwargs
) -> Mapping[str, Any]:
    new_sd: Dict[str, Any] = {}
    for key, value in input_sd.items():
        name = hf_to_fms_name(key)
        if name is None:
            continue
        if _beyond_config(name, model_config):
            coverage.record(model_config, [name])
            continue
        if name in new_sd:
            raise ValueError(f"checkpoint keys collide on {name!r} (one of them is {key!r}); is a layout mixed?")
        new_sd[name] = value
    return new_sd


def rope_permute(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF half-rotation row order -> FMS interleaved row order, per head (rows = output features)."""
    heads = weight.size(0) // head_dim
    return weight.view(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


_ROPE_KEY = re.compile(
    r"^(language_model\.base_model\.layers\.\d+\.attn\.in_proj\.(query|key)\.(weight|bias)"
    r"|lora\.layers\.\d+\.(q_proj|k_proj)\.lora_B\.weight)$"
)


def _hf_to_fms_rope(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeechConfig] = None, **kwargs
) -> Mapping[str, Any]:
    if model_config is None:
        raise ValueError("the granite_speech rope step needs model_config (the text head_dim differs per variant)")
    head_dim = model_config.text_config.head_dim
    return {k: rope_permute(v, head_dim) if _ROPE_KEY.match(k) else v for k, v in input_sd.items()}


_FUSED_GROUPS = (
    re.compile(r"^(?P<layer>.*\.attn\.in_proj)\.(query|key|value)\.(?P<kind>weight|bias)$"),
    re.compile(r"^(?P<layer>.*\.ff_sub_layer)\.(wg|w1)\.(?P<kind>weight|bias)$"),
)
_GROUP_MEMBERS = (("query", "key", "value"), ("wg", "w1"))


def _check_fusion_groups(input_sd: Mapping[str, Any]) -> None:
    """FMS's fusion steps fail with a bare KeyError when one projection of a layer is absent; name it instead."""
    for pattern, members in zip(_FUSED_GROUPS, _GROUP_MEMBERS):
        for key in input_sd:
            match = pattern.match(key)
            if match:
                wanted = [f"{match['layer']}.{m}.{match['kind']}" for m in members]
                absent = [w for w in wanted if w not in input_sd]
                if absent:
                    raise CheckpointCoverageError(
                        f"checkpoint does not match the model: {absent} missing, so {match['layer']} cannot be fused"
                    )


def _weight_fusion(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeechConfig] = None, **kwargs
) -> Mapping[str, Any]:
    if model_config is not None and not model_config.fused_weights:
        return input_sd
    _check_fusion_groups(input_sd)
    return serialization._mlp_glu_unfused_to_fused_adapter_step(serialization._attn_unfused_to_fused_step(input_sd))


def _coverage_ledger(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeechConfig] = None, **kwargs
) -> Mapping[str, Any]:
    coverage.check_shapes(model_config, input_sd)
    coverage.record(model_config, input_sd.keys())
    return input_sd


serialization.register_adapter_step(_architecture_name, "hf_to_fms_names", _hf_to_fms_names)
serialization.register_adapter_step(_architecture_name, "hf_to_fms_rope", _hf_to_fms_rope)
serialization.register_adapter_step(_architecture_name, "weight_fusion", _weight_fusion)
serialization.register_adapter_step(_architecture_name, "coverage_ledger", _coverage_ledger)
serialization.register_adapter(
    _architecture_name,
    "hf",
    ["hf_to_fms_names", "hf_to_fms_rope", "weight_fusion", "coverage_ledger"],
)
