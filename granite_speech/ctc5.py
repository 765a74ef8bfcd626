"""Granite Speech 5.0 (granite-speech-5.0-470m-turboctc; HF `granite_speech5`) in FMS: a CTC-only conformer.

No LLM: log-mel + delta features (`granite_speech.features5`) -> `input_linear` -> conformer blocks -> tied CTC head
-> greedy CTC decoding. What differs from the 3.3 encoder (`granite_speech.conformer`):

- Parakeet-style blocks: the LayerNorms sit outside the sub-modules (`ff1_ln`, `attn_ln`, `conv_ln`, `ff2_ln`,
  `post_norm`), the feed-forwards have biases (HF `attention_bias`), the conv module's pointwise layers are Linear;
- subsampling blocks (`subsample_layers`, default [0, 1]): the depthwise conv runs with stride 2, the residual is
  mean-pooled over frame pairs (a trailing odd frame dropped) and the conv output trimmed to the pooled length;
  ff2 and `post_norm` then run at the halved rate. Total time reduction 2 ** len(subsample_layers);
- padding is MASKED: the frame mask zeroes the `input_linear` output, padded keys get `finfo.min` in the attention
  bias (queries are not masked), the GLU output of padded frames is zeroed before the depthwise conv, and the mask is
  halved (AND of each pair) after each subsampling block. So a valid frame never depends on padding, and only valid
  positions are defined;
- block attention over `context_size` frames with Shaw relative positions as in 3.3, but q/k/v are separate
  projections (fused here into FMS's `FusedQKV`) and the last block's right-padding is masked on keys only;
- self-conditioning after block `nlayers // 2` (1-based), as 3.3; the CTC head `head` is tied to that `ctc_out`;
- HF keeps the BatchNorms in fp32 in 16-bit models (`_keep_in_fp32_modules_strict = ["conv.norm"]`); so does
  this model: their checkpoint values are kept in fp32 through FMS's dtype cast and the BN runs in fp32 (in float64
  in a float64 model, as every other op).
"""

import re
import weakref
from dataclasses import dataclass, fields
from itertools import groupby
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.modules.attention import FusedQKV, UnfusedQKV
from fms.modules.feedforward import FeedForwardBlock
from fms.utils import serialization
from fms.utils.activation import str_to_activation
from fms.utils.config import ModelConfig

from granite_speech import family
from granite_speech.checkpoint import coverage, preflight
from granite_speech.checkpoint.hf_registry import register_hf_architecture

_LINEAR_INIT_STD = 0.02  # HF initializer_range
FEATURES_PER_MEL_BIN = 4  # each mel bin and its delta, two frames stacked (see features5)


@dataclass
class GraniteSpeech5Config(ModelConfig):
    src_vocab_size: int = 16384  # CTC vocabulary, blank included (HF vocab_size)
    n_mels: int = 80  # HF num_mel_bins; the encoder input is 4 * n_mels wide
    emb_dim: int = 1024
    nlayers: int = 16
    nheads: int = 8
    head_dim: int = 128
    hidden_grow_factor: float = 4.0  # HF intermediate_size / hidden_size
    activation_fn: str = "silu"
    ff_bias: bool = True  # HF attention_bias: biases of the feed-forwards (q/k/v never have one, o always)
    context_size: int = 128  # block-attention width in frames at the block's rate
    max_pos_emb: int = 512  # HF max_position_embeddings: Shaw table of 2 * max_pos_emb + 1 rows
    conv_kernel_size: int = 7
    conv_expansion_factor: int = 2
    subsample_layers: Tuple[int, ...] = (0, 1)
    layer_norm_eps: float = 1e-5  # nn.LayerNorm / nn.BatchNorm1d default, as HF uses
    p_dropout: float = 0.0  # HF attention_dropout / activation_dropout (inactive in eval)
    blank_id: int = 0  # HF pad_token_id: the CTC blank
    tie_heads: bool = True  # HF tie_word_embeddings: `head` is `encoder.ctc_out`
    fused_weights: bool = True

    def __post_init__(self):
        self.subsample_layers = tuple(sorted(set(self.subsample_layers)))
        if not 0 < self.context_size <= self.max_pos_emb:
            raise ValueError(f"context_size must be in (0, max_pos_emb={self.max_pos_emb}], got {self.context_size}")
        if self.conv_kernel_size % 2 != 1:
            raise ValueError(f"conv_kernel_size must be odd ('same' padding), got {self.conv_kernel_size}")
        if self.nlayers < 1:
            raise ValueError(f"the encoder needs at least one layer, got nlayers={self.nlayers}")
        bad = [i for i in self.subsample_layers if not 0 <= i < self.nlayers]
        if bad:
            raise ValueError(f"subsample_layers {bad} out of range [0, nlayers={self.nlayers})")
        if not 0 <= self.blank_id < self.src_vocab_size:
            raise ValueError(f"blank_id {self.blank_id} outside the vocabulary [0, {self.src_vocab_size})")
        if int(self.hidden_grow_factor * self.emb_dim) != round(self.hidden_grow_factor * self.emb_dim):
            raise ValueError(
                f"hidden_grow_factor {self.hidden_grow_factor} x emb_dim {self.emb_dim} is not a whole width"
            )

    @property
    def input_dim(self) -> int:
        return FEATURES_PER_MEL_BIN * self.n_mels

    @property
    def hidden_dim(self) -> int:
        return int(self.hidden_grow_factor * self.emb_dim)

    @property
    def time_reduction(self) -> int:
        return 2 ** len(self.subsample_layers)

    @classmethod
    def _load_from_dict(cls, json_dict: dict):
        config = super()._load_from_dict(json_dict)
        config.subsample_layers = tuple(config.subsample_layers)
        return config


# ---------------------------------------------------------------------------------------------- lengths and masks
def downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, T // 2]: a half-rate frame is valid iff both its frames are (odd last frame dropped)."""
    half = mask.shape[1] // 2
    return mask[:, : 2 * half].reshape(mask.shape[0], half, 2).all(dim=2)


def output_lengths(lengths: torch.Tensor, config: GraniteSpeech5Config) -> torch.Tensor:
    """Valid output frames of each input length (floor-halved once per subsampling block, as HF)."""
    for _ in config.subsample_layers:
        lengths = lengths // 2
    return lengths


def output_mask(attention_mask: torch.Tensor, config: GraniteSpeech5Config, length: Optional[int] = None):
    """[B, T] input frame mask -> [B, T'] output frame mask (HF `_get_output_attention_mask`)."""
    lengths = output_lengths(attention_mask.long().sum(-1), config)
    length = int(lengths.max()) if length is None else length
    return torch.arange(length, device=attention_mask.device)[None, :] < lengths[:, None]


def greedy_frame_ids(logits: torch.Tensor, mask: Optional[torch.Tensor], blank_id: int) -> torch.Tensor:
    """Per-frame argmax with padded frames set to the blank: what HF `GraniteSpeech5ForCTC.generate` returns."""
    ids = logits.argmax(dim=-1)
    return ids if mask is None else ids.masked_fill(~mask.bool(), blank_id)


def ctc_greedy_decode(logits: torch.Tensor, lengths: Optional[torch.Tensor], blank_id: int) -> List[List[int]]:
    """CTC greedy decoding: argmax per frame over the first `lengths[b]` frames, merge repeats, drop blanks."""
    ids = logits.argmax(dim=-1).tolist()
    limits = [len(row) for row in ids] if lengths is None else [int(n) for n in lengths.tolist()]
    return [ctc_collapse(row[:n], blank_id) for row, n in zip(ids, limits, strict=True)]


def ctc_collapse(frame_ids: Sequence[int], blank_id: int) -> List[int]:
    """Merge consecutive repeats, then drop blanks ([a, a, blank, a] -> [a, a])."""
    return [int(token) for token, _ in groupby(frame_ids) if token != blank_id]


# ---------------------------------------------------------------------------------------------- modules
def _init_linear(module: nn.Module) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=_LINEAR_INIT_STD)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class Conformer5Attention(nn.Module):
    """Block-local self-attention with Shaw relative positions; padded keys masked (HF
    `GraniteSpeech5EncoderAttention`). Input is the block's `attn_ln` output."""

    def __init__(self, config: GraniteSpeech5Config):
        super().__init__()
        self.nheads = config.nheads
        self.head_dim = config.head_dim
        self.context_size = config.context_size
        self.max_pos_emb = config.max_pos_emb
        self.scale = config.head_dim**-0.5
        inner = config.nheads * config.head_dim
        qkv = FusedQKV if config.fused_weights else UnfusedQKV
        self.in_proj = qkv(config.emb_dim, config.nheads, config.nheads, config.head_dim, config.head_dim, False)
        self.dense = nn.Linear(inner, config.emb_dim, bias=True)
        self.rel_pos_emb = nn.Embedding(2 * config.max_pos_emb + 1, config.head_dim)
        self.p_dropout = config.p_dropout

    def reset_parameters(self):
        self.in_proj.reset_parameters()
        _init_linear(self.dense)
        nn.init.normal_(self.rel_pos_emb.weight, mean=0.0, std=_LINEAR_INIT_STD)

    def relative_distances(self, device: torch.device) -> torch.Tensor:
        """[C, C] rows of `rel_pos_emb`: clamp(i - j, -C, C) + max_pos_emb (HF `attention_dists`), built per call."""
        pos = torch.arange(self.context_size, device=device)
        dist = pos.view(-1, 1) - pos.view(1, -1)
        return dist.clamp(-self.context_size, self.context_size) + self.max_pos_emb

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        ctx = self.context_size
        pad = -seq_len % ctx
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            if mask is None:
                mask = torch.ones(batch, seq_len, dtype=torch.bool, device=x.device)
            mask = F.pad(mask, (0, pad), value=False)
        blocks = batch * (x.shape[1] // ctx)
        # [B, nb*C, H*Dh] -> [B*nb, H, C, Dh]: every block attends on its own
        q, k, v = (t.reshape(blocks, ctx, self.nheads, self.head_dim).transpose(1, 2) for t in self.in_proj(x, x, x))

        # Shaw term, same op order as HF: queries [C, B*nb*H, Dh] @ (rel * scale)^T [C, Dh, C]
        rel = self.rel_pos_emb(self.relative_distances(x.device)) * self.scale
        queries = q.permute(2, 0, 1, 3).reshape(ctx, -1, self.head_dim)
        bias = (queries @ rel.transpose(1, 2)).view(ctx, blocks, self.nheads, ctx).permute(1, 2, 0, 3).contiguous()
        if mask is not None:
            key_mask = mask.reshape(blocks, 1, 1, ctx)
            bias = bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.p_dropout if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(batch, -1, self.nheads * self.head_dim)
        return self.dense(out[:, :seq_len])


class Conformer5ConvModule(nn.Module):
    """up_proj -> GLU (value = first half) -> zero padded frames -> depthwise conv (stride 1 or 2) -> BatchNorm (fp32)
    -> silu -> down_proj (HF `GraniteSpeech5EncoderConvolutionModule`). Input is the block's `conv_ln` output."""

    def __init__(self, config: GraniteSpeech5Config, stride: int = 1):
        super().__init__()
        inner = config.emb_dim * config.conv_expansion_factor
        kernel = config.conv_kernel_size
        self.up_proj = nn.Linear(config.emb_dim, 2 * inner)
        self.depth_conv = nn.Conv1d(
            inner, inner, kernel, stride=stride, padding=(kernel - 1) // 2, groups=inner, bias=False
        )
        self.batch_norm = nn.BatchNorm1d(inner, eps=config.layer_norm_eps)
        self.down_proj = nn.Linear(inner, config.emb_dim)

    def reset_parameters(self):
        for module in (self.up_proj, self.depth_conv, self.down_proj):
            _init_linear(module)
        self.batch_norm.reset_parameters()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = F.glu(self.up_proj(x), dim=-1)
        if mask is not None:
            z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
        z = self.depth_conv(z.transpose(1, 2))
        z = self.batch_norm(z.to(self.batch_norm.running_mean.dtype)).to(z.dtype)  # fp32 BatchNorm, as HF
        return self.down_proj(F.silu(z).transpose(1, 2))


class Conformer5Block(nn.Module):
    """Macaron conformer block (HF `GraniteSpeech5EncoderBlock`, or `...SubsamplingBlock` when `subsample`)."""

    def __init__(self, config: GraniteSpeech5Config, subsample: bool = False):
        super().__init__()
        self.subsample = subsample
        eps = config.layer_norm_eps

        def feed_forward():
            return FeedForwardBlock(
                config.emb_dim,
                hidden_grow_factor=config.hidden_grow_factor,
                multiple_of=None,
                activation_fn=str_to_activation(config.activation_fn),
                p_dropout=config.p_dropout,
                use_bias=config.ff_bias,
            )

        self.ff1_ln = nn.LayerNorm(config.emb_dim, eps=eps)
        self.ff1 = feed_forward()
        self.attn_ln = nn.LayerNorm(config.emb_dim, eps=eps)
        self.attn = Conformer5Attention(config)
        self.conv_ln = nn.LayerNorm(config.emb_dim, eps=eps)
        self.conv = Conformer5ConvModule(config, stride=2 if subsample else 1)
        self.ff2_ln = nn.LayerNorm(config.emb_dim, eps=eps)
        self.ff2 = feed_forward()
        self.post_norm = nn.LayerNorm(config.emb_dim, eps=eps)

    def reset_parameters(self):
        for module in (self.ff1_ln, self.ff1, self.attn_ln, self.attn, self.conv_ln, self.conv, self.ff2_ln,
                       self.ff2, self.post_norm):
            module.reset_parameters()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + 0.5 * self.ff1(self.ff1_ln(x))
        x = x + self.attn(self.attn_ln(x), mask)
        conv = self.conv(self.conv_ln(x), mask)
        if self.subsample:
            pooled = x.unfold(1, 2, 2).mean(-1)  # pairs of frames, a trailing odd one dropped
            x = pooled + conv[:, : pooled.shape[1]]
        else:
            x = x + conv
        x = x + 0.5 * self.ff2(self.ff2_ln(x))
        return self.post_norm(x)


class GraniteSpeech5Encoder(nn.Module):
    """forward(input_features [B, T, 4*n_mels], attention_mask [B, T] or None) -> (hidden [B, T', D], mask [B, T'] or
    None), T' = T reduced by 2 per subsampling block (HF `GraniteSpeech5Encoder`)."""

    def __init__(self, config: GraniteSpeech5Config):
        super().__init__()
        self.config = config
        self.input_linear = nn.Linear(config.input_dim, config.emb_dim)
        self.layers = nn.ModuleList(
            [Conformer5Block(config, subsample=i in config.subsample_layers) for i in range(config.nlayers)]
        )
        self.ctc_out = nn.Linear(config.emb_dim, config.src_vocab_size)
        self.ctc_out_mid = nn.Linear(config.src_vocab_size, config.emb_dim)
        # 1-based index of the block followed by CTC self-conditioning; 0 (nlayers == 1) means never, as in HF
        self.self_conditioning_layer = config.nlayers // 2

    def reset_parameters(self):
        for linear in (self.input_linear, self.ctc_out, self.ctc_out_mid):
            _init_linear(linear)
        for layer in self.layers:
            layer.reset_parameters()

    def forward(
        self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if input_features.dim() != 3 or input_features.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"input_features must be [batch, frames, {self.config.input_dim}], got {tuple(input_features.shape)}"
            )
        if input_features.shape[1] < self.config.time_reduction:
            raise ValueError(
                f"{input_features.shape[1]} frames are too few for {len(self.config.subsample_layers)} subsampling "
                f"blocks (need >= {self.config.time_reduction})"
            )
        h = self.input_linear(input_features.to(self.input_linear.weight.dtype))
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_features.shape[:2]:
                raise ValueError(
                    f"attention_mask must be [batch, frames] = {tuple(input_features.shape[:2])}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.bool()
            h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h, mask)
            if layer.subsample and mask is not None:
                mask = downsample_mask(mask)
            if index == self.self_conditioning_layer:
                h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=-1))
        return h, mask


# BatchNorm tensors as read from the checkpoint (before FMS's dtype cast), for post_init: id(model config) ->
# (weak reference to that config, {FMS name: fp32 tensor}); configs are unhashable dataclasses
_FP32_BATCH_NORM: Dict[int, Tuple["weakref.ref", Dict[str, torch.Tensor]]] = {}
_BATCH_NORM_KEY = re.compile(r"\.conv\.batch_norm\.(weight|bias|running_mean|running_var)$")


class GraniteSpeech5ForCTC(nn.Module):
    """forward(input_features, attention_mask=None) -> CTC logits [B, T', vocab] (HF `GraniteSpeech5ForCTC`).

    Only positions inside `output_mask(attention_mask)` are defined: padded positions see padded keys masked out and
    carry values HF does not define either."""

    def __init__(
        self,
        config: Optional[GraniteSpeech5Config] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        config = config if config is not None else GraniteSpeech5Config()
        self.config = config.updated(**kwargs)
        self.config.__post_init__()  # updated() bypasses the dataclass checks
        self.distributed_strategy = distributed_strategy
        self.encoder = GraniteSpeech5Encoder(self.config)
        self.head = nn.Linear(self.config.emb_dim, self.config.src_vocab_size, bias=True)
        self._keep_batch_norm_fp32()
        coverage.open_ledger(self)

    @classmethod
    def from_config(cls, config: GraniteSpeech5Config) -> "GraniteSpeech5ForCTC":
        return cls(config)

    def get_config(self) -> GraniteSpeech5Config:
        return self.config

    def _keep_batch_norm_fp32(self):
        for module in self.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.float()

    def reset_parameters(self):
        self.encoder.reset_parameters()
        _init_linear(self.head)

    def post_init(self):
        # Called by get_model after the weights are loaded (or randomly initialised).
        _audit_loaded_checkpoint(self)
        ref, stash = _FP32_BATCH_NORM.pop(id(self.config), (None, {}))
        if ref is None or ref() is not self.config:
            stash = {}
        # at least fp32, as HF keeps them; a float64 model runs them in float64 like every other op (the float64
        # formula check compares it with HF in float64 throughout)
        norm_dtype = torch.promote_types(torch.float32, self.head.weight.dtype)
        for name, module in self.named_modules():
            if isinstance(module, nn.BatchNorm1d):
                for tensor_name in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(module, tensor_name)
                    exact = stash.get(f"{name}.{tensor_name}")
                    value = (exact if exact is not None else tensor).to(device=tensor.device, dtype=norm_dtype)
                    if isinstance(tensor, nn.Parameter):
                        setattr(module, tensor_name, nn.Parameter(value, requires_grad=tensor.requires_grad))
                    else:
                        setattr(module, tensor_name, value)
                if module.num_batches_tracked is not None and not module.num_batches_tracked.is_meta:
                    module.num_batches_tracked.zero_()  # not in the adapted checkpoint; unused in eval
        if self.config.tie_heads:
            self.head.weight = self.encoder.ctc_out.weight
            self.head.bias = self.encoder.ctc_out.bias
        # ready for inference as get_model returns it: eval mode (BatchNorm on its running statistics)
        self.eval()

    def encode(
        self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.encoder(input_features, attention_mask)

    def forward(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden, _ = self.encoder(input_features, attention_mask)
        return self.head(hidden)

    def output_mask(self, attention_mask: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        return output_mask(attention_mask, self.config, length)

    @torch.no_grad()
    def generate(self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame greedy ids [B, T'], padded frames = blank (HF `GraniteSpeech5ForCTC.generate`)."""
        logits = self(input_features, attention_mask)
        mask = None if attention_mask is None else self.output_mask(attention_mask, logits.shape[1])
        return greedy_frame_ids(logits, mask, self.config.blank_id)

    @torch.no_grad()
    def ctc_decode(
        self, input_features: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> List[List[int]]:
        """Token ids per clip after CTC collapse (repeats merged, blanks dropped), valid frames only."""
        logits = self(input_features, attention_mask)
        lengths = None if attention_mask is None else output_lengths(attention_mask.long().sum(-1), self.config)
        return ctc_greedy_decode(logits, lengths, self.config.blank_id)


def transcribe(model: GraniteSpeech5ForCTC, processor, audio, device: Union[str, torch.device] = "cpu") -> List[str]:
    """Raw 16 kHz audio (a clip or a list of clips) -> transcripts, with a `features5.GraniteSpeech5Processor`."""
    inputs = processor(audio, device=device)
    dtype = next(model.parameters()).dtype
    ids = model.ctc_decode(inputs["input_features"].to(device, dtype), inputs["attention_mask"].to(device))
    return processor.decode_collapsed(ids)


# ---------------------------------------------------------------------------------------------- HF config -> FMS
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def from_hf_config(hf_config: Any) -> GraniteSpeech5Config:
    """FMS config of an HF GraniteSpeech5CTCConfig (object or config.json dict)."""
    enc = _get(hf_config, "encoder_config")
    if enc is None:
        raise ValueError("HF config has no encoder_config; expected a granite_speech5_ctc config")
    hidden = _get(enc, "hidden_size", 1024)
    heads = _get(enc, "num_attention_heads", 8)
    kv_heads = _get(enc, "num_key_value_heads") or heads
    if kv_heads != heads:
        # HF sizes k/v by num_attention_heads and would fail on its own repeat_kv: no such checkpoint can exist
        raise ValueError(f"num_key_value_heads {kv_heads} != num_attention_heads {heads} is not supported")
    vocab = _get(hf_config, "vocab_size", 16384)
    if _get(enc, "vocab_size", vocab) != vocab:
        raise ValueError(f"encoder vocab_size {_get(enc, 'vocab_size')} != CTC vocab_size {vocab}")
    intermediate = _get(enc, "intermediate_size", 4096)
    subsample = _get(enc, "subsample_layers")
    blank = _get(hf_config, "pad_token_id", 0)
    dropout = max(_get(enc, "attention_dropout", 0.0) or 0.0, _get(enc, "activation_dropout", 0.0) or 0.0)
    return GraniteSpeech5Config(
        src_vocab_size=vocab,
        n_mels=_get(enc, "num_mel_bins", 80),
        emb_dim=hidden,
        nlayers=_get(enc, "num_hidden_layers", 16),
        nheads=heads,
        head_dim=_get(enc, "head_dim") or hidden // heads,
        hidden_grow_factor=intermediate / hidden,
        activation_fn=_get(enc, "hidden_act", "silu"),
        ff_bias=bool(_get(enc, "attention_bias", True)),
        context_size=_get(enc, "context_size", 128),
        max_pos_emb=_get(enc, "max_position_embeddings", 512),
        conv_kernel_size=_get(enc, "conv_kernel_size", 7),
        conv_expansion_factor=_get(enc, "conv_expansion_factor", 2),
        subsample_layers=tuple(subsample) if subsample is not None else (0, 1),
        p_dropout=float(dropout),
        blank_id=0 if blank is None else int(blank),
        tie_heads=bool(_get(hf_config, "tie_word_embeddings", True)),
    )


# chosen by the caller of get_model, not by the checkpoint
_USER_OPTIONS = ("fused_weights",)


def build_granite_speech5_params(config) -> dict:
    """FMS kwargs for an HF GraniteSpeech5CTCConfig (the registry's param builder); checks the folder first."""
    from pathlib import Path

    from granite_speech.checkpoint.files import check_checkpoint_folder

    name = getattr(config, "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        check_checkpoint_folder(name)
    fms_config = from_hf_config(config)
    return {f.name: getattr(fms_config, f.name) for f in fields(fms_config) if f.name not in _USER_OPTIONS}


# ---------------------------------------------------------------------------------------------- variants
# granite-speech-5.0-470m-turboctc (its public config.json: 16 x 1024 conformer, 8 heads of 128, FF 4096, mel 80,
# Shaw table 512, context 128, kernel 7, subsample blocks [0, 1], vocabulary 16384 with blank 0, tied head):
# 472,928,256 parameters.
_470m_config = GraniteSpeech5Config()

# CI size (parity/granite/fixtures/configs/tiny-5.json): every path of the real model, at small widths; head_dim 24 !=
# emb_dim / nheads, FF width not a power of two, a context of 16 frames so that blocks and padding occur at every rate.
_tiny_config = GraniteSpeech5Config(
    src_vocab_size=48,
    emb_dim=64,
    nlayers=4,
    nheads=4,
    head_dim=24,
    hidden_grow_factor=2.5,
    context_size=16,
    max_pos_emb=32,
)

# the first variant is the base `get_model("hf_pretrained")` updates from the checkpoint's config.json
VARIANTS = {"5.0-470m": _470m_config, "tiny": _tiny_config}

_architecture_name = "granite_speech5"
HF_ARCHITECTURE = "GraniteSpeech5ForCTC"


def _granite_speech5_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeech5ForCTC(config, **kwargs)

    return factory


for _variant, _config in VARIANTS.items():
    models.register_model(_architecture_name, _variant, _granite_speech5_factory_factory(_config))


# ---------------------------------------------------------------------------------------------- checkpoint adapter
# HF GraniteSpeech5ForCTC keys -> FMS names. The block-local patterns match at a name boundary.
HF_TO_FMS_NAMES: List[Tuple[str, str]] = [
    (r"^ctc_head\.", "head."),
    (r"^encoder\.out\.", "encoder.ctc_out."),
    (r"^encoder\.out_mid\.", "encoder.ctc_out_mid."),
    (r"\.norm_feed_forward(1|2)\.", r".ff\1_ln."),
    (r"\.feed_forward(1|2)\.linear1\.", r".ff\1.w1."),
    (r"\.feed_forward(1|2)\.linear2\.", r".ff\1.w2."),
    (r"\.norm_self_att\.", ".attn_ln."),
    (r"\.self_attn\.q_proj\.", ".attn.in_proj.query."),
    (r"\.self_attn\.k_proj\.", ".attn.in_proj.key."),
    (r"\.self_attn\.v_proj\.", ".attn.in_proj.value."),
    (r"\.self_attn\.o_proj\.", ".attn.dense."),
    (r"\.self_attn\.rel_pos_emb\.", ".attn.rel_pos_emb."),
    (r"\.norm_conv\.", ".conv_ln."),
    (r"\.conv\.pointwise_lin1\.", ".conv.up_proj."),
    (r"\.conv\.depthwise_conv\.", ".conv.depth_conv."),
    (r"\.conv\.norm\.", ".conv.batch_norm."),
    (r"\.conv\.pointwise_lin2\.", ".conv.down_proj."),
    (r"\.norm_out\.", ".post_norm."),
]
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def hf_to_fms_name(key: str) -> Optional[str]:
    """FMS name of one HF checkpoint key; None for keys deliberately skipped (BatchNorm's counter)."""
    if coverage.SKIPPED.search(key):
        return None
    for pattern, replacement in HF_TO_FMS_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _hf_to_fms_names(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeech5Config] = None, **kwargs
) -> Mapping[str, Any]:
    new_sd: Dict[str, Any] = {}
    for key, value in input_sd.items():
        name = hf_to_fms_name(key)
        if name is None:
            continue
        layer = _LAYER.match(name)
        if model_config is not None and layer and int(layer.group(1)) >= model_config.nlayers:
            coverage.record(model_config, [name])  # FMS's loader would IndexError; the audit names it instead
            continue
        new_sd[name] = value
    return new_sd


def _keep_fp32_batch_norm(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeech5Config] = None, **kwargs
) -> Mapping[str, Any]:
    """Remember the BatchNorm tensors at checkpoint precision: FMS casts every loaded tensor to the model dtype, HF
    keeps these in fp32 (`_keep_in_fp32_modules_strict`); post_init restores them."""
    if model_config is not None:
        for key, value in input_sd.items():
            if _BATCH_NORM_KEY.search(key):
                ref, stash = _FP32_BATCH_NORM.get(id(model_config), (None, None))
                if ref is None or ref() is not model_config:
                    ref, stash = weakref.ref(model_config), {}
                    _FP32_BATCH_NORM[id(model_config)] = (ref, stash)
                stash[key] = value.detach().to(torch.float32, copy=True)
    return input_sd


def _weight_fusion(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeech5Config] = None, **kwargs
) -> Mapping[str, Any]:
    if model_config is not None and not model_config.fused_weights:
        return input_sd
    return serialization._attn_unfused_to_fused_step(input_sd)


def _coverage_ledger(
    input_sd: Mapping[str, Any], model_config: Optional[GraniteSpeech5Config] = None, **kwargs
) -> Mapping[str, Any]:
    coverage.check_shapes(model_config, input_sd)
    coverage.record(model_config, input_sd.keys())
    return input_sd


def _audit_loaded_checkpoint(model: GraniteSpeech5ForCTC) -> None:
    """Every model tensor loaded exactly once, nothing left over (the 3.3 audit's rules, for this model)."""
    seen = coverage.close_ledger(model)
    if seen is None:
        return
    tied = {"head.weight", "head.bias"} if model.config.tie_heads else set()  # HF writes no ctc_head when tied
    coverage.raise_problems(coverage.coverage_problems(seen, model, tied))


# the header audit (`preflight`) audits a meta model of this member with this audit, then drops its BatchNorm stash
preflight.MEMBER_AUDITS["granite_speech5"] = (_audit_loaded_checkpoint,
                                              lambda model: _FP32_BATCH_NORM.pop(id(model.config), None))


_STEPS = {
    "hf_to_fms_names": _hf_to_fms_names,
    "keep_fp32_batch_norm": _keep_fp32_batch_norm,
    "weight_fusion": _weight_fusion,
    "coverage_ledger": _coverage_ledger,
}
for _name, _step in _STEPS.items():
    serialization.register_adapter_step(_architecture_name, _name, _step)
serialization.register_adapter(_architecture_name, "hf", list(_STEPS))

register_hf_architecture(HF_ARCHITECTURE, _architecture_name, build_granite_speech5_params)
family.guard_architectures([_architecture_name])
