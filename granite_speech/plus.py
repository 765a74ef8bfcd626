"""Granite Speech Plus (granite-speech-4.1-2b-plus; HF `granite_speech_plus`) in FMS.

The 3.3 model with one change: the projector reads the final encoder output concatenated, on the feature axis, with
the hidden states after selected encoder blocks (`cat_hidden_layers`; index 0 = the `input_linear` output, index i =
after block i). HF appends the exported states in block order, and the state of the self-conditioning block (L // 2)
is exported WITH the mid-layer CTC term, because HF adds that term in place (`hidden_states += ...`) to the very
tensor it appended. The projector's cross-attention is then `encoder_dim = emb_dim * (len(cat_hidden_layers) + 1)`
wide. Everything else (encoder blocks, Q-Former, decoder, LoRA, checkpoint layout) is the 3.3 code, reused.

Layout follows `fms/models/granite.py`: config, module, model, variants, factory registration, adapter steps (the
3.3 steps, registered for this architecture), HF architecture registration.
"""

import copy
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Mapping, Optional, Tuple

import torch
from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.utils import serialization

from granite_speech import family
from granite_speech.checkpoint import adapter as _speech_adapter
from granite_speech.checkpoint.hf_registry import build_granite_speech_params, register_hf_architecture
from granite_speech.config import ConformerConfig, GraniteSpeechConfig, QFormerProjectorConfig
from granite_speech.conformer import ConformerEncoder
from granite_speech.model import GraniteSpeech


@dataclass
class PlusConformerConfig(ConformerConfig):
    # blocks whose output is concatenated with the final output (0 = input_linear output, i = after block i)
    cat_hidden_layers: Tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        layers = tuple(self.cat_hidden_layers)
        bad = [i for i in layers if not 0 <= i < self.nlayers]
        if bad:
            raise ValueError(f"cat_hidden_layers {bad} out of range [0, nlayers={self.nlayers})")
        if len(set(layers)) != len(layers):
            # HF exports each block once (a set) but sizes the projector by len(list): duplicates cannot load
            raise ValueError(f"cat_hidden_layers {list(layers)} repeats a layer")

    @property
    def output_width(self) -> int:
        return self.emb_dim * (len(self.cat_hidden_layers) + 1)

    @classmethod
    def _load_from_dict(cls, json_dict: dict):
        config = super()._load_from_dict(json_dict)
        config.cat_hidden_layers = tuple(config.cat_hidden_layers)
        return config


@dataclass
class GraniteSpeechPlusConfig(GraniteSpeechConfig):
    encoder_config: PlusConformerConfig = field(default_factory=PlusConformerConfig)

    def __post_init__(self):
        expected = self.encoder_config.output_width
        if self.projector_config.encoder_dim != expected:
            raise ValueError(
                f"projector encoder_dim {self.projector_config.encoder_dim} != conformer emb_dim "
                f"{self.encoder_config.emb_dim} x (len(cat_hidden_layers)={len(self.encoder_config.cat_hidden_layers)}"
                f" + 1) = {expected}"
            )
        # every 3.3 check (LoRA settings, projector output vs text width), at the width a 3.3 projector would have
        base = {f.name: getattr(self, f.name) for f in fields(GraniteSpeechConfig)}
        base["projector_config"] = replace(self.projector_config, encoder_dim=self.encoder_config.emb_dim)
        GraniteSpeechConfig(**base)

    @property
    def cat_hidden_layers(self) -> Tuple[int, ...]:
        return tuple(self.encoder_config.cat_hidden_layers)


class PlusConformerEncoder(ConformerEncoder):
    """forward(x: [B, T, input_dim]) -> [B, T, emb_dim * (len(cat_hidden_layers) + 1)]: the exported hidden states
    in block order, then the final output (HF `GraniteSpeechPlusCTCEncoder`)."""

    def __init__(
        self,
        config: Optional[PlusConformerConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__(config if config is not None else PlusConformerConfig(), distributed_strategy, **kwargs)
        self.cat_hidden_layers = frozenset(self.config.cat_hidden_layers)

    def hidden_states(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(final output [B, T, D], the exported states in block order)."""
        if x.dim() != 3 or x.shape[-1] != self.config.input_dim or x.shape[1] == 0:
            raise ValueError(
                f"expected encoder input features [batch, frames > 0, {self.config.input_dim}], got {tuple(x.shape)}"
            )
        h = self.input_linear(x)
        exported = [h] if 0 in self.cat_hidden_layers else []
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h)
            if index == self.self_conditioning_layer:
                h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=-1))
            if index in self.cat_hidden_layers:
                exported.append(h)  # after the mid CTC term: HF's in-place `+=` lands in the tensor it exported
        return h, exported

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, exported = self.hidden_states(x)
        return torch.cat([*exported, h], dim=-1) if exported else h


class GraniteSpeechPlus(GraniteSpeech):
    """GraniteSpeech whose encoder returns the `cat_hidden_layers` concatenation (HF
    `GraniteSpeechPlusForConditionalGeneration`). Forward, audio merge, generation hook and LoRA are inherited."""

    def __init__(
        self,
        config: Optional[GraniteSpeechPlusConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        config = config if config is not None else GraniteSpeechPlusConfig()
        if not isinstance(config, GraniteSpeechPlusConfig):
            raise TypeError(f"GraniteSpeechPlus needs a GraniteSpeechPlusConfig, got {type(config).__name__}")
        super().__init__(config, distributed_strategy, **kwargs)
        # the 3.3 constructor built a plain ConformerEncoder (on the meta device under get_model); same parameters
        self.encoder = PlusConformerEncoder(self.config.encoder_config)

    @classmethod
    def from_config(cls, config: GraniteSpeechPlusConfig) -> "GraniteSpeechPlus":
        return cls(config)


# ---------------------------------------------------------------------------------------------- variants
# granite-speech-4.1-2b-plus: granite-speech-4.1-2b with the block-3 output concatenated (cat_hidden_layers [3],
# projector encoder_hidden_size 2048: public third-party copies of its config.json); the rest as 4.1-2b.
_4_1_2b_plus_config = GraniteSpeechPlusConfig(
    encoder_config=PlusConformerConfig(**family._4_1_2b_config.encoder_config.as_dict(), cat_hidden_layers=(3,)),
    projector_config=replace(family._4_1_2b_config.projector_config, encoder_dim=2 * 1024),
    text_config=copy.deepcopy(family._4_1_2b_config.text_config),
    audio_token_index=family._4_1_2b_config.audio_token_index,
    lora_rank=0,
    lora_alpha=0.0,
)

# CI size (parity/granite/fixtures/configs/tiny-plus.json): the 3.3 tiny model with the input_linear output (0) and
# the self-conditioning block's output (2 of 4, exported with the mid CTC term) concatenated; no adapter.
_tiny_plus_config = GraniteSpeechPlusConfig(
    encoder_config=PlusConformerConfig(
        emb_dim=64, nlayers=4, nheads=4, head_dim=24, output_dim=42, context_size=40, max_pos_emb=64,
        cat_hidden_layers=(0, 2),
    ),
    projector_config=QFormerProjectorConfig(
        emb_dim=32, nlayers=2, nheads=4, hidden_dim=64, encoder_dim=3 * 64, cross_attention_frequency=2, output_dim=64
    ),
    text_config=family.text_config(
        src_vocab_size=600,
        emb_dim=64,
        nheads=4,
        head_dim=16,
        kvheads=2,
        nlayers=2,
        hidden_grow_factor=2.0,
        max_expected_seq_len=4096,
        rope_theta=10_000.0,
        pad_id=0,
        tie_heads=True,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0625,
    ),
    audio_token_index=599,
    lora_rank=0,
    lora_alpha=0.0,
)

# the first variant is the base `get_model("hf_pretrained")` updates from the checkpoint's config.json
VARIANTS = {"4.1-2b-plus": _4_1_2b_plus_config, "tiny": _tiny_plus_config}

_architecture_name = "granite_speech_plus"
HF_ARCHITECTURE = "GraniteSpeechPlusForConditionalGeneration"


def _granite_speech_plus_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeechPlus(config, **kwargs)

    return factory


for _variant, _config in VARIANTS.items():
    models.register_model(_architecture_name, _variant, _granite_speech_plus_factory_factory(_config))

# ---------------------------------------------------------------------------------------------- checkpoint adapter
# The checkpoint layout is the 3.3 one (transformers' conversion mapping aliases granite_speech_plus to
# granite_speech), so the 3.3 steps apply unchanged: names (both layouts, PEFT keys), RoPE, fusion, coverage ledger.
_DOUBLED_DECODER_PREFIX = re.compile(r"^((?:base_model\.model\.)?language_model\.model\.)model\.")


def _collapse_doubled_decoder_prefix(input_sd: Mapping[str, Any], **kwargs) -> Mapping[str, Any]:
    """transformers 5.17's save_pretrained writes this model's decoder as `language_model.model.model.*` (5.23 writes
    `language_model.model.*`); HF loads both, so this adapter does too."""
    return {_DOUBLED_DECODER_PREFIX.sub(r"\1", key): value for key, value in input_sd.items()}


_STEPS = {
    "collapse_doubled_decoder_prefix": _collapse_doubled_decoder_prefix,
    "hf_to_fms_names": _speech_adapter._hf_to_fms_names,
    "hf_to_fms_rope": _speech_adapter._hf_to_fms_rope,
    "weight_fusion": _speech_adapter._weight_fusion,
    "coverage_ledger": _speech_adapter._coverage_ledger,
}
for _name, _step in _STEPS.items():
    serialization.register_adapter_step(_architecture_name, _name, _step)
serialization.register_adapter(_architecture_name, "hf", list(_STEPS))


# ---------------------------------------------------------------------------------------------- HF architecture
_NO_FOLDER = "<in-memory config: no checkpoint folder>"


def as_granite_speech_config(config):
    """The HF GraniteSpeechConfig of the 3.3 model inside an HF GraniteSpeechPlusConfig (no cat_hidden_layers, a
    3.3-wide projector), and its cat_hidden_layers. Same `_name_or_path`, so folder-based settings still apply."""
    from transformers import GraniteSpeechConfig as HFGraniteSpeechConfig

    data = config.to_dict()
    encoder = data["encoder_config"]
    cat = tuple(encoder.pop("cat_hidden_layers", None) or ())
    encoder["model_type"] = "granite_speech_encoder"
    data["model_type"] = "granite_speech"
    data["architectures"] = ["GraniteSpeechForConditionalGeneration"]
    data["projector_config"]["encoder_hidden_size"] = encoder["hidden_dim"]
    as_33 = HFGraniteSpeechConfig.from_dict(data)
    # NOTE: hf_registry reads the folder "." when _name_or_path is empty; a config built in memory has no folder
    as_33._name_or_path = getattr(config, "_name_or_path", "") or _NO_FOLDER
    return as_33, cat


def build_granite_speech_plus_params(config) -> dict:
    """FMS kwargs for an HF GraniteSpeechPlusConfig: the 3.3 builder (config audit, decoder, Q-Former, tying, LoRA
    from the folder's adapter_config.json) on the 3.3 config inside it, then the plus encoder and projector width."""
    as_33, cat = as_granite_speech_config(config)
    params = build_granite_speech_params(as_33)
    params["encoder_config"] = PlusConformerConfig(**params["encoder_config"].as_dict(), cat_hidden_layers=cat)
    params["projector_config"] = replace(
        params["projector_config"], encoder_dim=config.projector_config.encoder_hidden_size
    )
    return params


register_hf_architecture(HF_ARCHITECTURE, _architecture_name, build_granite_speech_plus_params)
family.guard_architectures([_architecture_name])
