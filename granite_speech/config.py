"""Configuration of Granite Speech in FMS terms, and the named variants.

Field names follow FMS conventions (`emb_dim`, `nheads`, `nlayers`, `hidden_grow_factor`, `p_dropout`); the
HF -> FMS mapping of every field lives in `from_hf_config` so it is written once.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

from fms.models.granite import GraniteConfig
from fms.models.hf.config_utils.param_builders import build_granite_params
from fms.utils.config import ModelConfig

from granite_speech import lengths

LORA_MODES = ("merged", "audio_only")
TINY_VOCAB_SIZE = 600  # must equal fixtures/configs/tiny.json text_config.vocab_size (a test checks it)


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
    window_size: int = 15  # encoder frames per window
    downsample_rate: int = 5  # window_size // downsample_rate queries per window
    output_dim: int = 2048  # text emb_dim

    def __post_init__(self):
        lengths.tokens_per_window(self.window_size, self.downsample_rate)  # raises unless W % R == 0
        if self.emb_dim % self.nheads != 0:
            raise ValueError(f"Q-Former emb_dim {self.emb_dim} is not divisible by nheads {self.nheads}")

    @property
    def queries_per_window(self) -> int:
        return lengths.tokens_per_window(self.window_size, self.downsample_rate)


@dataclass
class GraniteSpeechConfig(ModelConfig):
    encoder_config: ConformerConfig = field(default_factory=ConformerConfig)
    projector_config: QFormerProjectorConfig = field(default_factory=QFormerProjectorConfig)
    text_config: GraniteConfig = field(default_factory=GraniteConfig)
    audio_token_index: int = 49159
    # Modality LoRA on the decoder's attention (PEFT adapter_config.json). rank 0 = no adapter.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_target_modules: Tuple[str, ...] = ("q_proj", "v_proj")
    # "merged": folded into the decoder weights at load (audio inference, HF with the adapter enabled);
    # "audio_only": kept separate and applied only when audio is given (HF's generate() behaviour).
    lora_mode: str = "merged"
    fused_weights: bool = True

    def __post_init__(self):
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        unsupported = set(self.lora_target_modules) - {"q_proj", "v_proj", "k_proj"}
        if unsupported:
            raise ValueError(
                f"LoRA target modules {sorted(unsupported)} are not supported; Granite Speech adapts q_proj/v_proj"
            )
        if self.lora_rank < 0 or (self.lora_rank > 0 and self.lora_alpha <= 0):
            raise ValueError(
                f"invalid LoRA settings rank={self.lora_rank} alpha={self.lora_alpha}: rank 0 means no adapter, "
                "otherwise both must be positive"
            )
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
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @classmethod
    def _load_from_dict(cls, json_dict: dict):
        config = super()._load_from_dict(json_dict)
        config.lora_target_modules = tuple(config.lora_target_modules)
        return config


def _hf_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _require(cfg: Any, key: str, where: str) -> Any:
    value = _hf_get(cfg, key)
    if value is None:
        raise ValueError(f"HF {where} has no `{key}`; cannot build the FMS config without it")
    return value


def conformer_config_from_hf(enc: Any) -> ConformerConfig:
    hidden = _require(enc, "hidden_dim", "encoder_config")
    heads = _require(enc, "num_heads", "encoder_config")
    # dim_head defaulted to 128 before transformers 5.9 and to hidden // heads after; configs should set it.
    dim_head = _hf_get(enc, "dim_head") or hidden // heads
    return ConformerConfig(
        input_dim=_require(enc, "input_dim", "encoder_config"),
        emb_dim=hidden,
        nlayers=_require(enc, "num_layers", "encoder_config"),
        nheads=heads,
        head_dim=dim_head,
        hidden_grow_factor=_hf_get(enc, "feedforward_mult", 4),
        output_dim=_require(enc, "output_dim", "encoder_config"),
        context_size=_hf_get(enc, "context_size", 200),
        max_pos_emb=_hf_get(enc, "max_pos_emb", 512),
        p_dropout=_hf_get(enc, "dropout", 0.1),
        conv_kernel_size=_hf_get(enc, "conv_kernel_size", 15),
        conv_expansion_factor=_hf_get(enc, "conv_expansion_factor", 2),
    )


def projector_config_from_hf(proj: Any, *, window_size: int, downsample_rate: int, text_dim: int):
    if _hf_get(proj, "model_type", "blip_2_qformer") != "blip_2_qformer":
        raise ValueError(f"projector_config.model_type must be blip_2_qformer, got {_hf_get(proj, 'model_type')!r}")
    if _hf_get(proj, "use_qformer_text_input", False):
        raise ValueError("use_qformer_text_input=True is not supported: Granite Speech uses query-only Q-Formers")
    return QFormerProjectorConfig(
        emb_dim=_hf_get(proj, "hidden_size", 768),
        nlayers=_hf_get(proj, "num_hidden_layers", 12),
        nheads=_hf_get(proj, "num_attention_heads", 12),
        hidden_dim=_hf_get(proj, "intermediate_size", 3072),
        encoder_dim=_hf_get(proj, "encoder_hidden_size", 1408),
        cross_attention_frequency=_hf_get(proj, "cross_attention_frequency", 2),
        layer_norm_eps=_hf_get(proj, "layer_norm_eps", 1e-12),
        p_dropout=_hf_get(proj, "hidden_dropout_prob", 0.1),
        window_size=window_size,
        downsample_rate=downsample_rate,
        output_dim=text_dim,
    )


def _text_config_from_hf(text: Any) -> GraniteConfig:
    from transformers import GraniteConfig as HFGraniteConfig

    if not isinstance(text, HFGraniteConfig):
        text = HFGraniteConfig(**dict(text))
    if text.model_type != "granite":
        raise ValueError(f"text_config.model_type must be granite, got {text.model_type!r}")
    params = build_granite_params(text)
    params["pad_id"] = text.pad_token_id if text.pad_token_id is not None else -1
    return GraniteConfig(**params)


def read_lora_config(folder: Union[str, os.PathLike]) -> dict:
    """rank/alpha/targets from a PEFT `adapter_config.json` in `folder`; {} when there is none."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return {}
    from peft import LoraConfig

    lora = LoraConfig.from_pretrained(str(folder))
    if lora.peft_type.value != "LORA":
        raise ValueError(f"{path}: only LoRA adapters are supported, got peft_type {lora.peft_type}")
    targets = lora.target_modules
    if isinstance(targets, str):
        raise ValueError(f"{path}: a regex target_modules ({targets!r}) is not supported; list the modules")
    return {
        "lora_rank": int(lora.r),
        "lora_alpha": float(lora.lora_alpha),
        "lora_target_modules": tuple(sorted(targets)),
    }


def from_hf_config(hf_config: Any, lora: Optional[Mapping[str, Any]] = None) -> GraniteSpeechConfig:
    """Build the FMS config from an HF `GraniteSpeechConfig` (object or config.json dict) and the adapter settings."""
    text = _text_config_from_hf(_require(hf_config, "text_config", "config"))
    window = _hf_get(hf_config, "window_size", 15)
    downsample = _hf_get(hf_config, "downsample_rate", 5)
    audio_token = _hf_get(hf_config, "audio_token_index", _hf_get(hf_config, "audio_token_id"))
    if audio_token is None:
        raise ValueError("HF config has neither audio_token_index nor audio_token_id")
    # 4.57 ties on text_config.tie_word_embeddings, 5.10.1+ on the top-level flag (default True): a checkpoint is
    # tied only when both agree, which is what both lines load.
    text.tie_heads = bool(text.tie_heads and _hf_get(hf_config, "tie_word_embeddings", True))
    return GraniteSpeechConfig(
        encoder_config=conformer_config_from_hf(_require(hf_config, "encoder_config", "config")),
        projector_config=projector_config_from_hf(
            _require(hf_config, "projector_config", "config"),
            window_size=window,
            downsample_rate=downsample,
            text_dim=text.emb_dim,
        ),
        text_config=text,
        audio_token_index=int(audio_token),
        **dict(lora or {}),
    )


def from_pretrained_folder(folder: Union[str, os.PathLike], **overrides) -> GraniteSpeechConfig:
    """FMS config of a local HF checkpoint folder (config.json + optional adapter_config.json)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    config = from_hf_config(json.loads(config_path.read_text()), read_lora_config(folder))
    return config.updated(**overrides) if overrides else config


# Published dimensions of granite-speech-3.3-2b / -8b (revision 3.3.2; reference notes §5.3). The adapter values
# (r=64, alpha=32 on q_proj/v_proj) are those of the published modality LoRA.
_2b_config = GraniteSpeechConfig(
    encoder_config=ConformerConfig(),
    projector_config=QFormerProjectorConfig(output_dim=2048),
    text_config=GraniteConfig(
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
    ),
    audio_token_index=49159,
    lora_rank=64,
    lora_alpha=32.0,
)

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
    text_config=GraniteConfig(
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
        rope_theta=10_000.0,
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
    lora_alpha=16.0,
)

# Every named variant, defined once: FMS registrations, the harness's --model choices and the fixture configs
# (suites/test_fixtures.py checks each against fixtures/configs/<name>.json) all read this.
VARIANTS = {"tiny": _tiny_config, "2b": _2b_config, "8b": _8b_config}
