"""Configuration of Granite Speech in FMS terms, and the named variants.

Field names follow FMS conventions (`emb_dim`, `nheads`, `nlayers`, `hidden_grow_factor`, `p_dropout`); the
HF -> FMS mapping of every field lives in `from_hf_config` so it is written once, and every HF field it does not map
is accounted for by the config-coverage audit (`granite_speech.checkpoint.config_audit`), which runs first.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from fms.models.granite import GraniteConfig
from fms.utils.config import ModelConfig

from granite_speech import lengths
from granite_speech.checkpoint import layout
from granite_speech.checkpoint.config_audit import (
    ADAPTER_RULES,
    ADAPTER_SECTION,
    LORA_TARGETS,
    ROPE_PARAMETERS,
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_ROPE_TYPES,
    UnsupportedConfigError,
    audit_adapter_config,
    audit_hf_config,
)

LORA_MODES = ("merged", "audio_only")
TINY_VOCAB_SIZE = 600  # must equal fixtures/configs/tiny.json text_config.vocab_size (a test checks it)


def _check_activation(where: str, name: str) -> None:
    if name not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{where} activation_fn {name!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")


@dataclass
class ConformerConfig(ModelConfig):
    input_dim: int = 160  # 2 stacked 80-bin log-mel frames
    emb_dim: int = 1024
    nlayers: int = 16
    nheads: int = 8
    head_dim: int = 128
    hidden_grow_factor: int = 4  # HF feedforward_mult
    output_dim: int = 256  # CTC vocabulary of the mid-layer head
    context_size: int = 200  # block-attention width in encoder frames
    max_pos_emb: int = 512
    p_dropout: float = 0.1
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2
    layer_norm_eps: float = 1e-5  # nn.LayerNorm / nn.BatchNorm1d default, as HF uses

    def __post_init__(self):
        if not 0 < self.context_size <= self.max_pos_emb:
            raise ValueError(
                f"context_size must be in (0, max_pos_emb={self.max_pos_emb}], got {self.context_size}"
            )
        if self.nlayers < 1:
            raise ValueError(f"the encoder needs at least one layer, got nlayers={self.nlayers}")


@dataclass
class QFormerProjectorConfig(ModelConfig):
    emb_dim: int = 1024  # Q-Former hidden size
    nlayers: int = 2
    nheads: int = 16
    hidden_dim: int = 4096  # HF intermediate_size
    encoder_dim: int = 1024  # HF encoder_hidden_size (must equal the conformer emb_dim)
    cross_attention_frequency: int = 1
    layer_norm_eps: float = 1e-12
    p_dropout: float = 0.1
    activation_fn: str = "gelu"  # HF hidden_act of the Q-Former feed-forward (exact erf GELU by default)
    window_size: int = 15  # encoder frames per window
    downsample_rate: int = 5  # window_size // downsample_rate queries per window
    output_dim: int = 2048  # text emb_dim

    def __post_init__(self):
        lengths.tokens_per_window(self.window_size, self.downsample_rate)  # raises unless W % R == 0
        if self.emb_dim % self.nheads != 0:
            raise ValueError(f"Q-Former emb_dim {self.emb_dim} is not divisible by nheads {self.nheads}")
        _check_activation("Q-Former", self.activation_fn)

    @property
    def queries_per_window(self) -> int:
        return lengths.tokens_per_window(self.window_size, self.downsample_rate)


@dataclass
class GraniteSpeechTextConfig(GraniteConfig):
    """FMS's GraniteConfig plus the RoPE scaling of HF's `rope_parameters` (as FMS's LLaMAConfig.rope_scaling):
    {} for plain RoPE, else {"rope_type": "linear" | "llama3", <the parameters ROPE_PARAMETERS names>}."""

    rope_scaling: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"text rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        missing = [k for k in ROPE_PARAMETERS[rope_type] if k not in self.rope_scaling]
        if missing:
            raise ValueError(f"text rope_scaling of type {rope_type!r} lacks {missing}")
        _check_activation("text", self.activation_fn)
        kvheads = self.kvheads or self.nheads
        if self.nheads % kvheads != 0:
            raise ValueError(f"text nheads {self.nheads} is not a multiple of kvheads {kvheads}")


def _granite_3_3_2b_text() -> GraniteSpeechTextConfig:
    return GraniteSpeechTextConfig(
        src_vocab_size=49160,
        emb_dim=2048,
        norm_eps=1e-5,
        nheads=32,
        head_dim=64,
        kvheads=8,
        nlayers=40,
        hidden_grow_factor=8192 / 2048,
        multiple_of=1,
        max_expected_seq_len=131072,
        rope_theta=10_000_000.0,
        pad_id=0,
        p_dropout=0.0,
        tie_heads=True,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.015625,
        activation_fn="silu",
    )


@dataclass
class GraniteSpeechConfig(ModelConfig):
    # The defaults are granite-speech-3.3-2b without its adapter: GraniteSpeech() builds a consistent model.
    encoder_config: ConformerConfig = field(default_factory=ConformerConfig)
    projector_config: QFormerProjectorConfig = field(default_factory=QFormerProjectorConfig)
    text_config: GraniteSpeechTextConfig = field(default_factory=_granite_3_3_2b_text)
    audio_token_index: int = 49159
    # Modality LoRA on the decoder's attention (PEFT adapter_config.json). rank 0 = no adapter.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_target_modules: Tuple[str, ...] = ("q_proj", "v_proj")
    lora_use_rslora: bool = False  # PEFT use_rslora: scaling alpha / sqrt(r) instead of alpha / r
    # "merged": folded into the decoder weights at load (audio inference, HF with the adapter enabled);
    # "audio_only": kept separate and applied only when audio is given (HF's generate() behaviour).
    lora_mode: str = "merged"
    fused_weights: bool = True

    def __post_init__(self):
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        unsupported = set(self.lora_target_modules) - set(LORA_TARGETS)
        if unsupported:
            raise ValueError(
                f"LoRA target modules {sorted(unsupported)} are not supported; Granite Speech adapts {LORA_TARGETS}"
            )
        if self.lora_rank < 0 or (self.lora_rank > 0 and self.lora_alpha <= 0):
            raise ValueError(
                f"invalid LoRA settings rank={self.lora_rank} alpha={self.lora_alpha}: rank 0 means no adapter, "
                "otherwise both must be positive"
            )
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ValueError("a LoRA adapter (rank > 0) needs at least one target module")
        for sub in (self.encoder_config, self.projector_config, self.text_config):
            post_init = getattr(sub, "__post_init__", None)
            if post_init is not None:
                post_init()  # ModelConfig.updated() bypasses the dataclass checks
        if self.projector_config.encoder_dim != self.encoder_config.emb_dim:
            raise ValueError(
                f"projector encoder_dim {self.projector_config.encoder_dim} != conformer emb_dim "
                f"{self.encoder_config.emb_dim}"
            )
        if self.projector_config.output_dim != self.text_config.emb_dim:
            raise ValueError(
                f"projector output_dim {self.projector_config.output_dim} != text emb_dim {self.text_config.emb_dim}"
            )

    @property
    def lora_scaling(self) -> float:
        if not self.lora_rank:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_use_rslora else self.lora_rank)

    @classmethod
    def _load_from_dict(cls, json_dict: dict):
        config = super()._load_from_dict(json_dict)
        config.lora_target_modules = tuple(config.lora_target_modules)
        return config


# ---------------------------------------------------------------------------------------------- HF -> FMS
_EXPECTED_MODEL_TYPES = {
    "": "granite_speech",
    "encoder_config": "granite_speech_encoder",
    "projector_config": "blip_2_qformer",
    "text_config": "granite",
}


def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"HF {where} has no `{key}`; cannot build the FMS config without it")
    return value


def _as_hf_config(hf_config: Any):
    """An HF GraniteSpeechConfig object; a config.json dict is parsed by the installed transformers, so every
    default is filled in exactly as `from_pretrained` fills it."""
    if not isinstance(hf_config, Mapping):
        return hf_config
    for section, expected in _EXPECTED_MODEL_TYPES.items():
        values = hf_config if not section else _require(hf_config, section, "config")
        model_type = values.get("model_type", expected)
        if model_type != expected:  # parsing would re-label it (the encoder class ignores the key)
            path = f"{section}.model_type" if section else "model_type"
            raise UnsupportedConfigError(path, model_type, repr(expected), f"the port implements {expected} here")
    from transformers import GraniteSpeechConfig as HFGraniteSpeechConfig

    return HFGraniteSpeechConfig.from_dict(dict(hf_config))


def _ties_on_top_level_flag() -> bool:
    """transformers 5.10.1+ ties lm_head on the top-level tie_word_embeddings; 4.x on text_config's."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.10")


def resolve_tie(top_flag: bool, text_flag: bool, checkpoint_has_lm_head: Optional[bool]) -> bool:
    """Whether lm_head is the embedding, as HF resolves it.

    transformers 5.10.1+ ties on the top-level flag, 4.x on text_config's, and each writes no lm_head when it ties
    (a 5.x load of a checkpoint that does hold a distinct lm_head keeps it). With the checkpoint known, the lm_head
    tensor decides: tied exactly when it is absent and a flag asks for tying (absent with neither flag set, HF would
    initialise it randomly, and the weight-coverage audit names it missing). Without a checkpoint: the installed
    transformers line's rule.
    """
    if checkpoint_has_lm_head is None:
        return bool(top_flag) if _ties_on_top_level_flag() else bool(text_flag)
    return not checkpoint_has_lm_head and bool(top_flag or text_flag)


def _rope_from_hf(text: Any) -> Tuple[float, Dict[str, Any]]:
    """(rope_theta, FMS rope_scaling) of an HF Granite text config, from 5.x `rope_parameters` or 4.57
    `rope_theta` + `rope_scaling` (the audit has refused the types FMS cannot compute)."""
    params = getattr(text, "rope_parameters", None)
    if params is not None:
        params = dict(params)
        theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    else:
        theta = getattr(text, "rope_theta", None)
        params = dict(getattr(text, "rope_scaling", None) or {})
    if theta is None:
        raise ValueError("HF text_config has no rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), {}
    scaling: Dict[str, Any] = {"rope_type": rope_type}
    for key in ROPE_PARAMETERS[rope_type]:
        value = params[key]
        scaling[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    return float(theta), scaling


def _grow_factor(intermediate: int, hidden: int) -> float:
    """hidden_grow_factor with int(factor * hidden) == intermediate (FMS's GatedLinearUnit truncates)."""
    factor = intermediate / hidden
    while int(factor * hidden) < intermediate:
        factor = math.nextafter(factor, math.inf)
    return factor


def _text_config_from_hf(text: Any, tie_heads: bool) -> GraniteSpeechTextConfig:
    heads = text.num_attention_heads
    kvheads = getattr(text, "num_key_value_heads", None) or heads
    if heads % kvheads != 0:
        raise UnsupportedConfigError("text_config.num_key_value_heads", kvheads,
                                     f"a divisor of num_attention_heads ({heads})")
    theta, rope_scaling = _rope_from_hf(text)
    pad = getattr(text, "pad_token_id", None)
    return GraniteSpeechTextConfig(
        src_vocab_size=text.vocab_size,
        emb_dim=text.hidden_size,
        norm_eps=text.rms_norm_eps,
        nheads=heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,  # as HF's attention reads it
        kvheads=kvheads,
        nlayers=text.num_hidden_layers,
        hidden_grow_factor=_grow_factor(text.intermediate_size, text.hidden_size),
        multiple_of=1,
        activation_fn=text.hidden_act,
        max_expected_seq_len=text.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        pad_id=pad if pad is not None else -1,
        p_dropout=0.0,
        attn_bias=bool(getattr(text, "attention_bias", False)),
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        tie_heads=tie_heads,
        embedding_multiplier=text.embedding_multiplier,
        logits_scaling=text.logits_scaling,
        residual_multiplier=text.residual_multiplier,
        attention_multiplier=text.attention_multiplier,
    )


def conformer_config_from_hf(enc: Any) -> ConformerConfig:
    hidden, heads = enc.hidden_dim, enc.num_heads
    return ConformerConfig(
        input_dim=enc.input_dim,
        emb_dim=hidden,
        nlayers=enc.num_layers,
        nheads=heads,
        # 4.57-5.8 default 128, 5.9+ hidden // heads: the installed transformers has resolved it, as HF's model does
        head_dim=enc.dim_head or hidden // heads,
        hidden_grow_factor=enc.feedforward_mult,
        output_dim=enc.output_dim,
        context_size=enc.context_size,
        max_pos_emb=enc.max_pos_emb,
        p_dropout=enc.dropout,
        conv_kernel_size=enc.conv_kernel_size,
        conv_expansion_factor=enc.conv_expansion_factor,
    )


def projector_config_from_hf(proj: Any, *, window_size: int, downsample_rate: int, text_dim: int):
    return QFormerProjectorConfig(
        emb_dim=proj.hidden_size,
        nlayers=proj.num_hidden_layers,
        nheads=proj.num_attention_heads,
        hidden_dim=proj.intermediate_size,
        encoder_dim=proj.encoder_hidden_size,
        cross_attention_frequency=proj.cross_attention_frequency,
        layer_norm_eps=proj.layer_norm_eps,
        p_dropout=proj.hidden_dropout_prob,
        activation_fn=proj.hidden_act,
        window_size=window_size,
        downsample_rate=downsample_rate,
        output_dim=text_dim,
    )


def read_lora_config(folder: Union[str, os.PathLike]) -> dict:
    """LoRA settings from a PEFT `adapter_config.json` in `folder` (audited field by field); {} when there is
    none."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return {}
    adapter = json.loads(path.read_text())
    audit_adapter_config(adapter, where=str(path))
    if "target_modules" not in adapter:  # peft would guess them from the model type
        try:
            ADAPTER_RULES["target_modules"].validate(f"{ADAPTER_SECTION}.target_modules", None)
        except UnsupportedConfigError as err:
            raise UnsupportedConfigError(err.path, None, err.supported, where=str(path), detail=str(err)) from None
    return {
        "lora_rank": int(adapter.get("r", 8)),  # peft's defaults
        "lora_alpha": float(adapter.get("lora_alpha", 8)),
        "lora_target_modules": tuple(sorted(adapter["target_modules"])),
        "lora_use_rslora": bool(adapter.get("use_rslora", False)),
    }


def checkpoint_has_lm_head(folder: Union[str, os.PathLike]) -> Optional[bool]:
    """Whether the folder's weights hold an lm_head tensor (either layout); None when it holds no safetensors."""
    from safetensors import safe_open

    shards = [p for p in sorted(Path(folder).glob("*.safetensors")) if p.name != "adapter_model.safetensors"]
    if not shards:
        return None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            if any(layout.to_hub(key) == "language_model.lm_head.weight" for key in handle.keys()):
                return True
    return False


def from_hf_config(
    hf_config: Any, lora: Optional[Mapping[str, Any]] = None, *, checkpoint_has_lm_head: Optional[bool] = None
) -> GraniteSpeechConfig:
    """Build the FMS config from an HF `GraniteSpeechConfig` (object or config.json dict) and the adapter settings.

    The config-coverage audit runs first: a field set to a value the port does not implement raises
    UnsupportedConfigError naming it, before any weight is read. `checkpoint_has_lm_head` (see `resolve_tie`)
    decides tying when the checkpoint is known.
    """
    hf_config = _as_hf_config(hf_config)
    audit_hf_config(hf_config)
    text_hf = hf_config.text_config
    tie = resolve_tie(
        getattr(hf_config, "tie_word_embeddings", True),
        getattr(text_hf, "tie_word_embeddings", False),
        checkpoint_has_lm_head,
    )
    text = _text_config_from_hf(text_hf, tie)
    audio_token = getattr(hf_config, "audio_token_index", None)
    if audio_token is None:
        raise ValueError("HF config has no audio_token_index (audio_token_id)")
    config = GraniteSpeechConfig(
        encoder_config=conformer_config_from_hf(hf_config.encoder_config),
        projector_config=projector_config_from_hf(
            hf_config.projector_config,
            window_size=hf_config.window_size,
            downsample_rate=hf_config.downsample_rate,
            text_dim=text.emb_dim,
        ),
        text_config=text,
        audio_token_index=int(audio_token),
        **dict(lora or {}),
    )
    return config


def from_pretrained_folder(folder: Union[str, os.PathLike], **overrides) -> GraniteSpeechConfig:
    """FMS config of a local HF checkpoint folder (config.json + optional adapter_config.json)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    config = from_hf_config(
        json.loads(config_path.read_text()),
        read_lora_config(folder),
        checkpoint_has_lm_head=checkpoint_has_lm_head(folder),
    )
    return config.updated(**overrides) if overrides else config


# Published dimensions of granite-speech-3.3-2b / -8b (revision 3.3.2; reference notes §5.3). The adapter values
# (r=64, alpha=32 on q_proj/v_proj) are those of the published modality LoRA.
# The dataclass defaults are the 2b dimensions (see `_granite_3_3_2b_text`); the variant adds the adapter.
_2b_config = GraniteSpeechConfig(lora_rank=64, lora_alpha=32.0)

_8b_config = _2b_config.updated(
    projector_config={"output_dim": 4096},
    text_config={
        "emb_dim": 4096,
        "head_dim": 128,
        "hidden_grow_factor": 12800 / 4096,
        "logits_scaling": 16.0,
        "attention_multiplier": 0.0078125,
    },
)

# The CPU test configuration (fixtures/configs/tiny.json): small, but every path of the real model is taken.
_tiny_config = GraniteSpeechConfig(
    encoder_config=ConformerConfig(
        emb_dim=64, nlayers=4, nheads=4, head_dim=24, output_dim=42, context_size=40, max_pos_emb=64
    ),
    projector_config=QFormerProjectorConfig(
        emb_dim=32, nlayers=2, nheads=4, hidden_dim=64, encoder_dim=64, cross_attention_frequency=2, output_dim=64
    ),
    text_config=GraniteSpeechTextConfig(
        src_vocab_size=TINY_VOCAB_SIZE,
        emb_dim=64,
        norm_eps=1e-5,
        nheads=4,
        head_dim=16,
        kvheads=2,
        nlayers=2,
        hidden_grow_factor=2.0,
        multiple_of=1,
        max_expected_seq_len=4096,
        rope_theta=50_000.0,  # not FMS's default 10000, so a dropped rope_theta shows
        pad_id=0,
        p_dropout=0.0,
        tie_heads=True,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0625,
        activation_fn="silu",
    ),
    audio_token_index=TINY_VOCAB_SIZE - 1,
    lora_rank=8,
    lora_alpha=20.0,  # scaling 2.5: alpha // r (2) would show
)

# Every named variant, defined once: FMS registrations, the harness's --model choices and the fixture configs
# (suites/test_fixtures.py checks each against fixtures/configs/<name>.json) all read this.
VARIANTS = {"tiny": _tiny_config, "2b": _2b_config, "8b": _8b_config}
