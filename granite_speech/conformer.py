"""Granite Speech CTC Conformer encoder in FMS style (HF `GraniteSpeechCTCEncoder`).

Math: reference notes §1.2. Every block is macaron style (0.5*FF, block-local Shaw attention, conv module,
0.5*FF, post-LN). After block `nlayers // 2` (counting from 1) the CTC head self-conditions the hidden states.
The forward has no data-dependent control flow: the sequence length only enters through static shapes, so
`torch.compile(fullgraph=True)` traces it without graph breaks.
"""

import contextlib
import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fms.distributed.strategy import DistributedStrategy, NoOpStrategy

from granite_speech.config import ConformerConfig

_LINEAR_INIT_STD = 0.02  # HF initializer_range


def _init_linear(module: nn.Module) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=_LINEAR_INIT_STD)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConformerFeedForward(nn.Module):
    """ln -> w1 -> silu -> dropout -> w2 -> dropout. The block applies the 0.5 macaron scale."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        hidden = config.emb_dim * config.hidden_grow_factor
        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.w1 = nn.Linear(config.emb_dim, hidden)
        self.w2 = nn.Linear(hidden, config.emb_dim)
        self.dropout = nn.Dropout(config.p_dropout)

    def reset_parameters(self):
        self.ln.reset_parameters()
        _init_linear(self.w1)
        _init_linear(self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.silu(self.w1(self.ln(x))))
        return self.dropout(self.w2(x))


class ConformerAttention(nn.Module):
    """Self-attention inside non-overlapping blocks of `context_size` frames, with Shaw relative positions.

    The Shaw term is query-side only: bias[i, j] = Dh**-0.5 * <q_i, rel_pos_emb[clamp(i - j, -C, C) + P]>.
    It is passed to SDPA as an additive float mask; the right-padding of the last block (added AFTER `ln`, as HF
    does) is masked with the finite `-finfo(dtype).max`, so fully padded query rows stay finite and are sliced off.
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.nheads = config.nheads
        self.head_dim = config.head_dim
        self.context_size = config.context_size
        self.max_pos_emb = config.max_pos_emb
        self.scale = config.head_dim**-0.5
        inner = config.nheads * config.head_dim
        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.query = nn.Linear(config.emb_dim, inner, bias=False)
        self.kv = nn.Linear(config.emb_dim, 2 * inner, bias=False)  # rows [0, inner) are K, [inner, 2*inner) V
        self.dense = nn.Linear(inner, config.emb_dim)
        self.rel_pos_emb = nn.Embedding(2 * config.max_pos_emb + 1, config.head_dim)
        self.dropout = nn.Dropout(config.p_dropout)
        self.kernel = "math"  # `ConformerEncoder.set_attention_kernel`

    def reset_parameters(self):
        self.ln.reset_parameters()
        for linear in (self.query, self.kv, self.dense):
            _init_linear(linear)
        nn.init.normal_(self.rel_pos_emb.weight, mean=0.0, std=_LINEAR_INIT_STD)

    def relative_distances(self, device: torch.device) -> torch.Tensor:
        """[C, C] row indices into `rel_pos_emb`: clamp(i - j, -C, C) + P (HF's `attention_dists`).

        Built from `arange` on every call instead of a buffer: it is tiny, constant-folded under compile, and
        cannot come out as garbage when the module is built on the meta device.
        """
        pos = torch.arange(self.context_size, device=device)
        dist = pos.view(-1, 1) - pos.view(1, -1)
        return dist.clamp(-self.context_size, self.context_size) + self.max_pos_emb

    def _last_block_padding_mask(self, nblocks: int, valid: int, device: torch.device) -> torch.Tensor:
        """[nblocks, 1, C, C] bool, True where a query or key is right-padding of the last block."""
        pos = torch.arange(self.context_size, device=device)
        is_real = pos < valid
        padded_pair = ~(is_real.view(-1, 1) & is_real.view(1, -1))
        is_last_block = torch.arange(nblocks, device=device) == nblocks - 1
        return is_last_block.view(-1, 1, 1, 1) & padded_pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        ctx = self.context_size
        nblocks = -(-seq_len // ctx)
        remainder = seq_len % ctx  # static: seq_len is a shape

        y = self.ln(x)
        if remainder > 0:
            y = F.pad(y, (0, 0, 0, ctx - remainder))
        q = self.query(y)
        k, v = self.kv(y).chunk(2, dim=-1)
        # [B, nb*C, H*Dh] -> [B*nb, H, C, Dh]; batch-major, so block b*nb + n is block n of sequence b
        q, k, v = (t.reshape(batch * nblocks, ctx, self.nheads, self.head_dim).transpose(1, 2) for t in (q, k, v))

        if self.kernel == "flex":
            out = self._flex_attention(q, k, v, nblocks, remainder)
            out = out.transpose(1, 2).reshape(batch, nblocks * ctx, self.nheads * self.head_dim)
            return self.dropout(self.dense(out[:, :seq_len]))
        rel = self.rel_pos_emb(self.relative_distances(q.device))  # [C, C, Dh]
        # same einsum as HF, so the bias rounds identically
        bias = torch.einsum("b h c d, c r d -> b h c r", q, rel) * self.scale
        if remainder > 0:
            mask = self._last_block_padding_mask(nblocks, remainder, q.device)
            bias = bias.view(batch, nblocks, self.nheads, ctx, ctx)
            bias = bias.masked_fill(mask, -torch.finfo(bias.dtype).max)
            bias = bias.view(batch * nblocks, self.nheads, ctx, ctx)

        # MATH backend on every device, as HF pins it: the float bias is already a full [B*nb, H, C, C] tensor, so a
        # fused kernel would save no memory, while a different kernel (CPU flash, CUDA mem-efficient; bf16 math
        # upcasts internally) would round differently from HF.
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, nblocks * ctx, self.nheads * self.head_dim)
        return self.dropout(self.dense(out[:, :seq_len]))

    def _flex_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nblocks: int,
                        remainder: int) -> torch.Tensor:
        """The block attention through `flex_attention`, with no [C, C] bias tensor: the score_mod gathers a (query,
        key) pair's Shaw term from q's products with the 2C - 1 distances a block holds, and gives the last block's
        right-padding the lowest score of q's dtype (finite, as the math path's mask: padded query rows stay finite and
        are sliced off; float32's lowest would overflow bf16 scores, which inductor folds to q's dtype). Fused into one
        kernel under torch.compile; eager, it runs flex's unfused reference."""
        from torch.nn.attention.flex_attention import flex_attention

        ctx = self.context_size
        distances = torch.arange(1 - ctx, ctx, device=q.device)  # i - j for every pair of one block
        rows = self.rel_pos_emb(distances.clamp(-ctx, ctx) + self.max_pos_emb)  # [2C - 1, Dh]
        shaw = torch.einsum("b h c d, r d -> b h c r", q, rows) * self.scale  # [B*nb, H, C, 2C - 1]
        masked = torch.finfo(q.dtype).min

        def add_shaw(score, b, h, q_idx, kv_idx):
            score = score + shaw[b, h, q_idx, q_idx - kv_idx + ctx - 1]
            if remainder == 0:
                return score
            real = (b % nblocks != nblocks - 1) | ((q_idx < remainder) & (kv_idx < remainder))
            return torch.where(real, score, masked)

        return flex_attention(q, k, v, score_mod=add_shaw, scale=self.scale)


class ConformerConvModule(nn.Module):
    """ln -> 1x1 up_conv -> GLU (value = first half, gate = second) -> depthwise conv -> BatchNorm -> silu
    -> 1x1 down_conv -> dropout."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        inner = config.emb_dim * config.conv_expansion_factor
        kernel = config.conv_kernel_size
        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.up_conv = nn.Conv1d(config.emb_dim, 2 * inner, 1)
        # "same" length output; even kernels pad one frame less on the right, as HF does
        self.depth_padding = (kernel // 2, kernel // 2 - (kernel + 1) % 2)
        self.depth_conv = nn.Conv1d(inner, inner, kernel, groups=inner, bias=False)
        self.batch_norm = nn.BatchNorm1d(inner, eps=config.layer_norm_eps)
        self.down_conv = nn.Conv1d(inner, config.emb_dim, 1)
        self.dropout = nn.Dropout(config.p_dropout)

    def reset_parameters(self):
        self.ln.reset_parameters()
        for conv in (self.up_conv, self.depth_conv, self.down_conv):
            _init_linear(conv)
        self.batch_norm.reset_parameters()

    def post_init(self):
        # The checkpoint adapter drops `num_batches_tracked`; give the (unused in eval) counter a defined value
        # instead of the garbage a meta-device build leaves.
        if self.batch_norm.num_batches_tracked is not None and not self.batch_norm.num_batches_tracked.is_meta:
            self.batch_norm.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.up_conv(self.ln(x).transpose(1, 2))  # [B, 2*E*D, T]
        z = F.glu(z, dim=1)
        z = self.depth_conv(F.pad(z, self.depth_padding))
        z = self.down_conv(F.silu(self.batch_norm(z)))
        return self.dropout(z.transpose(1, 2))


class ConformerBlock(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.ff1 = ConformerFeedForward(config)
        self.attn = ConformerAttention(config)
        self.conv = ConformerConvModule(config)
        self.ff2 = ConformerFeedForward(config)
        self.post_norm = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)

    def reset_parameters(self):
        for module in (self.ff1, self.attn, self.conv, self.ff2, self.post_norm):
            module.reset_parameters()

    def post_init(self):
        self.conv.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 0.5 * self.ff1(x) + x
        x = self.attn(x) + x
        x = self.conv(x) + x
        x = 0.5 * self.ff2(x) + x
        return self.post_norm(x)


class ConformerEncoder(nn.Module):
    """forward(x: [B, T, input_dim]) -> [B, T, emb_dim]. No padding mask: batch padding is attended to, as in HF."""

    def __init__(
        self,
        config: Optional[ConformerConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        self.config = (config if config is not None else ConformerConfig()).updated(**kwargs)
        self.distributed_strategy = distributed_strategy
        cfg = self.config
        self.input_linear = nn.Linear(cfg.input_dim, cfg.emb_dim)
        self.layers = nn.ModuleList([ConformerBlock(cfg) for _ in range(cfg.nlayers)])
        self.ctc_out = nn.Linear(cfg.emb_dim, cfg.output_dim)
        self.ctc_out_mid = nn.Linear(cfg.output_dim, cfg.emb_dim)
        # 1-based index of the block followed by CTC self-conditioning; 0 (nlayers == 1) means never, as in HF
        self.self_conditioning_layer = cfg.nlayers // 2

    @classmethod
    def from_config(cls, config: ConformerConfig) -> "ConformerEncoder":
        return cls(config)

    def get_config(self) -> ConformerConfig:
        return self.config

    def reset_parameters(self):
        for linear in (self.input_linear, self.ctc_out, self.ctc_out_mid):
            _init_linear(linear)
        for layer in self.layers:
            layer.reset_parameters()

    def post_init(self):
        for layer in self.layers:
            layer.post_init()

    ATTENTION_KERNELS = ("math", "flex")

    def set_attention_kernel(self, kernel: str) -> None:
        """How every block computes its attention: "math" (default; SDPA's math backend over the full Shaw bias,
        rounding as HF does) or "flex" (`flex_attention`, fused under torch.compile; rounds differently, within the
        tolerance table: `suites/test_audio_modules.py`)."""
        if kernel not in self.ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {self.ATTENTION_KERNELS}, got {kernel!r}")
        for layer in self.layers:
            layer.attn.kernel = kernel

    @contextlib.contextmanager
    def attention_kernel(self, kernel: str):
        """`set_attention_kernel` for the duration of a block, then back to the kernel before it."""
        before = self.layers[0].attn.kernel if len(self.layers) else "math"
        self.set_attention_kernel(kernel)
        try:
            yield
        finally:
            self.set_attention_kernel(before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.input_dim or x.shape[1] == 0:
            raise ValueError(
                f"expected encoder input features [batch, frames > 0, {self.config.input_dim}], got {tuple(x.shape)}"
            )
        h = self.input_linear(x)
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h)
            if index == self.self_conditioning_layer:
                h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=-1))
        return h


# HF GraniteSpeechCTCEncoder parameter names -> ConformerEncoder names, relative to the encoder root
# (e.g. `layers.0.ff1.pre_norm.weight`). The patterns only match at a name boundary, so they also work on keys
# that still carry a prefix such as `encoder.`.
HF_TO_FMS_NAMES: List[Tuple[str, str]] = [
    (r"\.ff(1|2)\.pre_norm\.", r".ff\1.ln."),
    (r"\.ff(1|2)\.up_proj\.", r".ff\1.w1."),
    (r"\.ff(1|2)\.down_proj\.", r".ff\1.w2."),
    (r"\.attn\.pre_norm\.", r".attn.ln."),
    (r"\.attn\.to_q\.", r".attn.query."),
    (r"\.attn\.to_kv\.", r".attn.kv."),
    (r"\.attn\.to_out\.", r".attn.dense."),
    (r"\.conv\.norm\.", r".conv.ln."),
    (r"\.conv\.depth_conv\.conv\.", r".conv.depth_conv."),
    (r"(^|\.)out\.", r"\1ctc_out."),
    (r"(^|\.)out_mid\.", r"\1ctc_out_mid."),
]


def hf_to_fms_name(key: str) -> str:
    """Rename one HF encoder parameter/buffer name to its ConformerEncoder name."""
    for pattern, replacement in HF_TO_FMS_NAMES:
        key = re.sub(pattern, replacement, key)
    return key
