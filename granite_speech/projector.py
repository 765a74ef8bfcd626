"""Granite Speech windowed Q-Former projector in FMS style (HF `GraniteSpeechEncoderProjector` + `Blip2QFormerModel`).

Math: reference notes §1.3. The encoder output is cut into windows of `window_size` frames (the last one
zero-padded); `window_size // downsample_rate` learned queries cross-attend to each window through a BERT-style
(post-LN) Q-Former, and `out_proj` maps them to the text embedding size.

There is no attention mask, exactly as HF (which passes `encoder_attention_mask=None`): the zero-padded frames of
the last window are attended to. Their keys are the key bias and their values the value bias, so they do change
the output of the last window; matching HF requires keeping them.
"""

import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.utils.activation import str_to_activation

from granite_speech import lengths
from granite_speech.config import QFormerProjectorConfig

_LINEAR_INIT_STD = 0.02  # HF Blip2QFormerConfig.initializer_range


def _init_linear(module: nn.Linear) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=_LINEAR_INIT_STD)
    nn.init.zeros_(module.bias)


class QFormerAttention(nn.Module):
    """Multi-head attention + BERT "self output": ln(dropout(dense(attn)) + x).

    Self-attention when `context` is None, otherwise cross-attention with keys/values from `context`, whose
    length (and batch, by broadcasting) may differ from the queries'. FMS MultiHeadAttention cannot do this.
    """

    def __init__(self, config: QFormerProjectorConfig, kv_dim: int):
        super().__init__()
        self.nheads = config.nheads
        self.head_dim = config.emb_dim // config.nheads
        self.p_dropout = config.p_dropout
        self.query = nn.Linear(config.emb_dim, config.emb_dim)
        self.key = nn.Linear(kv_dim, config.emb_dim)
        self.value = nn.Linear(kv_dim, config.emb_dim)
        self.dense = nn.Linear(config.emb_dim, config.emb_dim)
        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.p_dropout)

    def reset_parameters(self):
        for linear in (self.query, self.key, self.value, self.dense):
            _init_linear(linear)
        self.ln.reset_parameters()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.nheads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        kv_source = x if context is None else context
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(kv_source))
        v = self._split_heads(self.value(kv_source))
        # batch-1 queries broadcast against B*nb windows, as in HF
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.p_dropout if self.training else 0.0, scale=self.head_dim**-0.5
        )
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.nheads * self.head_dim)
        return self.ln(self.dropout(self.dense(out)) + x)


class QFormerFeedForward(nn.Module):
    """BERT intermediate/output pair for the query tokens: ln(dropout(w2(act(w1(x)))) + x); act is HF's hidden_act
    (exact erf GELU in every published checkpoint), through FMS's activation table."""

    def __init__(self, config: QFormerProjectorConfig):
        super().__init__()
        self.w1 = nn.Linear(config.emb_dim, config.hidden_dim)
        self.act = str_to_activation(config.activation_fn)
        self.w2 = nn.Linear(config.hidden_dim, config.emb_dim)
        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.p_dropout)

    def reset_parameters(self):
        _init_linear(self.w1)
        _init_linear(self.w2)
        self.ln.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.dropout(self.w2(self.act(self.w1(x)))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerProjectorConfig, layer_index: int):
        super().__init__()
        self.self_attn = QFormerAttention(config, kv_dim=config.emb_dim)
        self.has_cross_attention = layer_index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.cross_attn = QFormerAttention(config, kv_dim=config.encoder_dim)
        self.ff = QFormerFeedForward(config)

    def reset_parameters(self):
        self.self_attn.reset_parameters()
        if self.has_cross_attention:
            self.cross_attn.reset_parameters()
        self.ff.reset_parameters()

    def forward(self, x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x)
        if self.has_cross_attention:
            x = self.cross_attn(x, windows)
        return self.ff(x)


class QFormerProjector(nn.Module):
    """forward(encoder_out: [B, T, encoder_dim]) -> [B, ceil(T / window_size) * Q, output_dim]."""

    def __init__(
        self,
        config: Optional[QFormerProjectorConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        self.config = (config if config is not None else QFormerProjectorConfig()).updated(**kwargs)
        self.distributed_strategy = distributed_strategy
        cfg = self.config
        if cfg.nlayers < 1 or cfg.cross_attention_frequency < 1:
            # layer 0 must cross-attend, otherwise the queries never see the audio
            raise ValueError(
                f"the Q-Former needs nlayers >= 1 and cross_attention_frequency >= 1, got nlayers={cfg.nlayers}, "
                f"cross_attention_frequency={cfg.cross_attention_frequency}"
            )
        self.window_size = cfg.window_size
        self.queries_per_window = cfg.queries_per_window
        self.query = nn.Parameter(torch.zeros(1, self.queries_per_window, cfg.emb_dim))
        self.ln = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.p_dropout)
        self.layers = nn.ModuleList([QFormerLayer(cfg, index) for index in range(cfg.nlayers)])
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.output_dim)

    @classmethod
    def from_config(cls, config: QFormerProjectorConfig) -> "QFormerProjector":
        return cls(config)

    def get_config(self) -> QFormerProjectorConfig:
        return self.config

    def reset_parameters(self):
        nn.init.normal_(self.query, mean=0.0, std=1.0)  # as HF
        self.ln.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        _init_linear(self.out_proj)

    def post_init(self):
        """Nothing to rebuild: the projector has no buffers."""

    def forward(self, encoder_out: torch.Tensor) -> torch.Tensor:
        if encoder_out.dim() != 3 or encoder_out.shape[-1] != self.config.encoder_dim or encoder_out.shape[1] == 0:
            raise ValueError(
                f"expected encoder output [batch, frames > 0, {self.config.encoder_dim}], got {tuple(encoder_out.shape)}"
            )
        batch, seq_len, dim = encoder_out.shape
        nwindows = lengths.projector_windows(seq_len, self.window_size)
        padded = F.pad(encoder_out, (0, 0, 0, nwindows * self.window_size - seq_len))
        # HF runs the Q-Former in the dtype of its LayerNorm
        windows = padded.view(batch * nwindows, self.window_size, dim).to(self.ln.weight.dtype)

        x = self.dropout(self.ln(self.query))  # [1, Q, Hq]; becomes [B*nb, Q, Hq] at layer 0's cross-attention
        for layer in self.layers:
            x = layer(x, windows)
        return self.out_proj(x.reshape(batch, nwindows * self.queries_per_window, -1))


# HF GraniteSpeechEncoderProjector parameter names -> QFormerProjector names, relative to the projector root
# (e.g. `qformer.encoder.layer.0.attention.attention.query.weight`). Applied in order; the patterns only match at a
# name boundary, so they also work on keys that still carry a prefix such as `projector.`. `query` keeps its name.
HF_TO_FMS_NAMES: List[Tuple[str, str]] = [
    (r"(^|\.)qformer\.layernorm\.", r"\1ln."),
    (r"(^|\.)qformer\.encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"\.attention\.attention\.", r".self_attn."),
    (r"\.attention\.output\.dense\.", r".self_attn.dense."),
    (r"\.attention\.output\.LayerNorm\.", r".self_attn.ln."),
    (r"\.crossattention\.attention\.", r".cross_attn."),
    (r"\.crossattention\.output\.dense\.", r".cross_attn.dense."),
    (r"\.crossattention\.output\.LayerNorm\.", r".cross_attn.ln."),
    (r"\.intermediate_query\.dense\.", r".ff.w1."),
    (r"\.output_query\.dense\.", r".ff.w2."),
    (r"\.output_query\.LayerNorm\.", r".ff.ln."),
    (r"(^|\.)linear\.", r"\1out_proj."),
]


def hf_to_fms_name(key: str) -> str:
    """Rename one HF projector parameter name to its QFormerProjector name."""
    for pattern, replacement in HF_TO_FMS_NAMES:
        key = re.sub(pattern, replacement, key)
    return key
