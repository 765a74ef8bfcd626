"""Greedy generation for `GraniteSpeech` over a preallocated KV cache, one decode step per token, replayed from a
CUDA graph.

FMS's `fms.utils.generation.generate` grows the KV cache by concatenation, so every token has new shapes and runs
~1000 small kernels from Python. Here:

- the audio is encoded once (per clip shape captured as a CUDA graph on GPU);
- the prompt is prefilled by the model's own `forward` (use_cache=True), and its K/V copied into a static cache
  `[layers] x [B, kvheads, max_len (+ always-masked columns), head_dim]`; or, with static_prefill=True, by the decode
  step's own layer math over the whole prompt, writing straight into that cache (left-padded to a multiple of
  PREFILL_BUCKET, so on GPU one captured CUDA graph serves a bucket of prompt lengths);
- a decode step over FMS Granite's weights (`ln`, `attn.in_proj`, `attn.dense`, `ff_ln`, `ff_sub_layer`, `rot_emb`,
  `dec_norm`, `head`) reads the token at cache column `slot`, writes its K/V at `slot`, attends over the valid
  columns (left padding masked), writes the greedy token at `slot + 1` and advances `slot`, all in place on static
  tensors, so it is captured once per batch size as a `torch.cuda.CUDAGraph` and replayed per token. On CPU (or
  with use_cuda_graph=False) the same step runs eagerly.

The decode math is FMS Granite's: RMSNorm as `LayerNormParameterized` (fp32 statistics, rounded before the weight),
embedding_multiplier on the token embedding, attention_multiplier as the attention scale, GQA, FMS's interleaved-pair
RoPE table, residual_multiplier, logits / logits_scaling; the modality LoRA (lora_mode "audio_only") is added to the
q/k/v projections exactly as `ModalityLoRA`'s in_proj hook does, and is on exactly when the prompt had audio (as
`GraniteSpeech.forward` sets it). `compile_step=True` additionally fuses the step's small ops with `torch.compile`
(inductor, static shapes; one compiled function shared by every layer, plus the step's prologue and epilogue);
`compile_mode="max-autotune-no-cudagraphs"` lets inductor pick each decode GEMM's kernel by timing them.

    generator = StaticGenerator(model, max_len=512)
    tokens = generator.generate(input_ids, input_features, input_features_mask, attention_mask, max_new_tokens=128)
    # or in one call:
    tokens = generate_static(model, input_ids, input_features, ..., max_new_tokens=128)
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fms.distributed.strategy import TensorParallelStrategy
from fms.modules.layernorm import LayerNormParameterized

from granite_speech.lora import TARGET_SLOT, add_lora_deltas
from granite_speech.model import GraniteSpeech, padding_attn_kwargs

# The cache length is rounded up to this so the attention bias rows are 16-byte aligned (CUDA's fused SDPA kernels
# otherwise pad the bias on every call).
_CACHE_LEN_MULTIPLE = 16
# With an eos token, "have all rows finished?" costs a device sync: asked once per this many tokens.
_EOS_CHECK_EVERY = 16
_WARMUP_STEPS = 2
# The static prefill rounds the prompt up to a multiple of this many columns (left padding, masked), so one captured
# prefill graph serves every prompt length of its bucket.
PREFILL_BUCKET = 64
# how the generator runs encoder + projector (`StaticGenerator(encoder=)`)
ENCODERS = ("eager", "compiled", "flex")
# torch.compile modes the compiled parts may use: the modes that capture CUDA graphs of their own ("reduce-overhead",
# "max-autotune") are left out, since the generator captures the compiled code in its own graphs.
# "max-autotune-no-cudagraphs" benchmarks Triton GEMM templates against cuBLAS per decode GEMM shape (slow to compile).
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
# the decode step's weight products (`StaticGenerator(gemv=)`): cuBLAS through F.linear, or the split-K GEMV kernel
GEMVS = ("cublas", "splitk")


def splitk_refusal(device: torch.device) -> Optional[str]:
    """Why gemv="splitk" cannot run on `device` (None where it can): a Triton kernel, CUDA's, or the CPU's only through
    Triton's interpreter (TRITON_INTERPRET=1, read when Triton is first imported: how the tests run it)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the split-K GEMV is a Triton kernel for CUDA, and the model is on {device} (the CPU runs it only "
            "through Triton's interpreter, TRITON_INTERPRET=1)")


@dataclass(frozen=True)
class _DecoderSpec:
    """The Python constants of one decode step (baked into the compiled function and the CUDA graph)."""

    nheads: int
    kvheads: int
    head_dim: int
    hidden_dim: int  # GLU width
    norm_eps: float
    residual_multiplier: float
    attention_multiplier: float
    embedding_multiplier: float
    logits_scaling: float
    lora_slots: Tuple[int, ...]  # q/k/v index of each LoRA pair, in ModalityLoRA's order
    lora_scaling: float
    splitk_rows: int = 0  # products of at most this many rows run `granite_speech.gemv.splitk_linear` (0: none)


def _linear(spec: _DecoderSpec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """F.linear, or the split-K GEMV for a decode step's few rows when the generator was built with gemv="splitk"
    (a prefill's B x T rows stay cuBLAS GEMMs). Shapes are static per graph, so the choice is too."""
    if x.numel() <= spec.splitk_rows * x.size(-1):
        from granite_speech.gemv import splitk_linear  # Triton: imported only when asked for

        return splitk_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class StaticKVCache:
    """Per layer a key and a value tensor [batch, kvheads, max_len, head_dim], allocated once."""

    def __init__(self, nlayers: int, batch: int, kvheads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kvheads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]

    def load_prefix(self, cache: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy FMS's prefill cache (per layer (k, v), each [B, kvheads, L, head_dim]) into columns [0, L)."""
        for key, value, (k, v) in zip(self.keys, self.values, cache):
            length = k.size(2)
            key[:, :, :length].copy_(k)
            value[:, :, :length].copy_(v)

    def columns(self, length: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) views of columns [0, length), as FMS's cache lays them out."""
        return [(k[:, :, :length], v[:, :, :length]) for k, v in zip(self.keys, self.values)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class _DecodeState:
    """The static tensors one decode step reads and updates in place (so a captured graph can replay it)."""

    def __init__(self, batch: int, max_len: int, vocab: int, device):
        self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # prompt + generated tokens
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # cache column of the token being decoded
        self.rope_pos = torch.zeros(batch, dtype=torch.long, device=device)  # its RoPE position per row
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # columns a query may attend
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.full((1,), -1, dtype=torch.long, device=device)  # -1: never matches
        self.pad = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)

    def _tensors(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def snapshot(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._tensors().items()}

    def restore(self, saved: Dict[str, torch.Tensor]) -> None:
        for name, tensor in self._tensors().items():
            tensor.copy_(saved[name])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LayerNormParameterized(use_mean=False, elementwise_shift=False, use_high_precision_pow=True)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.type_as(x)


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """FMS RotaryEmbedding on [..., heads, head_dim] with rotation matrices rot [..., head_dim/2, 2, 2] (one per row,
    or per row and position)."""
    pairs = x.float().view(*x.shape[:-1], -1, 2)  # ... H D/2 2
    return (rot.unsqueeze(-4) * pairs.unsqueeze(-2)).sum(-1).flatten(-2).type_as(x)


def _step_prologue(
    spec: _DecoderSpec,
    seq: torch.Tensor,
    slot: torch.Tensor,
    rope_pos: torch.Tensor,
    valid: torch.Tensor,
    rope_table: torch.Tensor,
    embedding_w: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings (x embedding_multiplier) at column `slot`, the additive attention bias over the valid cache
    columns ([B, 1, 1, max_len]; marks `slot` valid) and the RoPE rotations of each row's position."""
    batch = seq.size(0)
    token = seq.gather(1, slot.expand(batch).unsqueeze(1)).squeeze(1)
    valid.index_fill_(1, slot, True)
    attn_bias = torch.zeros(valid.shape, dtype=embedding_w.dtype, device=valid.device)
    attn_bias = attn_bias.masked_fill(~valid, float("-inf")).view(batch, 1, 1, valid.size(1))
    x = F.embedding(token, embedding_w) * spec.embedding_multiplier
    return x, attn_bias, rope_table.index_select(0, rope_pos)


def _attention_inputs(
    spec: _DecoderSpec,
    x: torch.Tensor,
    mlp_out: torch.Tensor,
    ln_w: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: Optional[torch.Tensor],
    lora: Tuple[torch.Tensor, ...],
    rot: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous layer's MLP residual added, then ln, q/k/v (+ LoRA), RoPE on q and k. x: [..., D]; returns x and
    q [..., nheads, head_dim], k and v [..., kvheads, head_dim]."""
    lead = x.shape[:-1]
    q_dim, kv_dim = spec.nheads * spec.head_dim, spec.kvheads * spec.head_dim
    x = mlp_out * spec.residual_multiplier + x
    h = _rms_norm(x, ln_w, spec.norm_eps)
    qkv = _linear(spec, h, qkv_w, qkv_b)
    q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
    if lora:
        pairs = [(s, lora[2 * i], lora[2 * i + 1]) for i, s in enumerate(spec.lora_slots)]
        q, k, v = add_lora_deltas((q, k, v), h, pairs, spec.lora_scaling)  # the same math as ModalityLoRA's hook
        qk = torch.cat([q, k], dim=-1)
    else:
        qk = qkv[..., : q_dim + kv_dim]
    # queries and keys rotated together: [..., nheads + kvheads, head_dim]
    qk = _rope(qk.reshape(*lead, spec.nheads + spec.kvheads, spec.head_dim), rot)
    return x, qk[..., : spec.nheads, :], qk[..., spec.nheads :, :], v.reshape(*lead, spec.kvheads, spec.head_dim)


def _attention_output_and_mlp(
    spec: _DecoderSpec,
    x: torch.Tensor,
    attn: torch.Tensor,  # [..., nheads * head_dim]
    dense_w: torch.Tensor,
    dense_b: Optional[torch.Tensor],
    ff_ln_w: torch.Tensor,
    wg1_w: torch.Tensor,
    wg1_b: Optional[torch.Tensor],
    w2_w: torch.Tensor,
    w2_b: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """x + r * dense(attn), and the MLP's output (its residual is left to the next layer's `_attention_inputs`)."""
    x = _linear(spec, attn, dense_w, dense_b) * spec.residual_multiplier + x
    h = _rms_norm(x, ff_ln_w, spec.norm_eps)
    gate, up = _linear(spec, h, wg1_w, wg1_b).split([spec.hidden_dim, spec.hidden_dim], dim=-1)
    return x, _linear(spec, F.silu(gate) * up, w2_w, w2_b)


def _decode_layer(
    spec: _DecoderSpec,
    x: torch.Tensor,  # [B, D] residual stream before the previous layer's MLP output is added
    mlp_out: torch.Tensor,  # [B, D] previous layer's MLP output (zeros before the first layer)
    ln_w: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: Optional[torch.Tensor],
    dense_w: torch.Tensor,
    dense_b: Optional[torch.Tensor],
    ff_ln_w: torch.Tensor,
    wg1_w: torch.Tensor,
    wg1_b: Optional[torch.Tensor],
    w2_w: torch.Tensor,
    w2_b: Optional[torch.Tensor],
    lora: Tuple[torch.Tensor, ...],  # (A, B) per adapted projection when the adapter is on, else ()
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    rot: torch.Tensor,
    slot: torch.Tensor,
    attn_bias: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GraniteBlock for one new token per row, reading/writing the static cache at column `slot`.

    The MLP residual is left to the next call (returned as (x, mlp_out)) so that, compiled, it fuses with the next
    layer's RMSNorm; the math is GraniteBlock's: x = x + r * dense(attn(ln(x))); x = x + r * w2(silu(wg) * w1).
    """
    batch = x.size(0)
    x, q, k, v = _attention_inputs(spec, x, mlp_out, ln_w, qkv_w, qkv_b, lora, rot)
    key_cache.index_copy_(2, slot, k.unsqueeze(2))
    value_cache.index_copy_(2, slot, v.unsqueeze(2))
    # GQA without expanding the cache: the nheads // kvheads query heads of one kv head become its query rows
    q = q.reshape(batch, spec.kvheads, spec.nheads // spec.kvheads, spec.head_dim)
    attn = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=attn_bias, scale=spec.attention_multiplier)
    return _attention_output_and_mlp(
        spec, x, attn.reshape(batch, spec.nheads * spec.head_dim), dense_w, dense_b, ff_ln_w, wg1_w, wg1_b, w2_w, w2_b
    )


def _prefill_prologue(
    spec: _DecoderSpec, embeds: torch.Tensor, real: torch.Tensor, rope_table: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings x embedding_multiplier, FMS's padding mask [B, 1, T, T] (causal, real tokens never see pads,
    pads see only pads so they stay finite: `padding_attn_kwargs`) and the RoPE rotations of each position."""
    allowed = (real.unsqueeze(-1) == real.unsqueeze(-2)).tril()
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(~allowed, float("-inf"))
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return embeds * spec.embedding_multiplier, mask.unsqueeze(1), rope_table[positions]


def _prefill_layer(
    spec: _DecoderSpec,
    x: torch.Tensor,  # [B, T, D]
    mlp_out: torch.Tensor,
    ln_w: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: Optional[torch.Tensor],
    dense_w: torch.Tensor,
    dense_b: Optional[torch.Tensor],
    ff_ln_w: torch.Tensor,
    wg1_w: torch.Tensor,
    wg1_b: Optional[torch.Tensor],
    w2_w: torch.Tensor,
    w2_b: Optional[torch.Tensor],
    lora: Tuple[torch.Tensor, ...],
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    rot: torch.Tensor,  # [B, T, head_dim/2, 2, 2]
    mask: torch.Tensor,  # [B, 1, T, T]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GraniteBlock over the whole prompt, its K/V written straight into cache columns [0, T) (no dynamic cache
    to copy); attention as FMS's prefill computes it (kv heads expanded, the padding mask, attention_multiplier)."""
    batch, length = x.shape[:2]
    x, q, k, v = _attention_inputs(spec, x, mlp_out, ln_w, qkv_w, qkv_b, lora, rot)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kvheads, T, head_dim]
    key_cache[:, :, :length].copy_(k)
    value_cache[:, :, :length].copy_(v)
    groups = spec.nheads // spec.kvheads
    attn = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(groups, dim=1),
        v.repeat_interleave(groups, dim=1),
        attn_mask=mask,
        scale=spec.attention_multiplier,
    )
    return _attention_output_and_mlp(
        spec, x, attn.transpose(1, 2).reshape(batch, length, -1), dense_w, dense_b, ff_ln_w, wg1_w, wg1_b, w2_w, w2_b
    )


def _step_epilogue(
    spec: _DecoderSpec,
    x: torch.Tensor,
    mlp_out: torch.Tensor,
    dec_norm_w: torch.Tensor,
    head_w: torch.Tensor,
    state_seq: torch.Tensor,
    slot: torch.Tensor,
    rope_pos: torch.Tensor,
    finished: torch.Tensor,
    eos: torch.Tensor,
    pad: torch.Tensor,
    logits_out: torch.Tensor,
) -> None:
    """Last residual, dec_norm, head / logits_scaling; the greedy token into seq[:, slot + 1]; advance slot."""
    x = _rms_norm(mlp_out * spec.residual_multiplier + x, dec_norm_w, spec.norm_eps)
    logits = (_linear(spec, x, head_w) / spec.logits_scaling).float()
    logits_out.copy_(logits)
    _pick_next(logits, state_seq, slot + 1, finished, eos, pad)
    slot.add_(1)
    rope_pos.add_(1)


def _pick_next(
    logits: torch.Tensor,
    seq: torch.Tensor,
    column: torch.Tensor,
    finished: torch.Tensor,
    eos: torch.Tensor,
    pad: torch.Tensor,
) -> None:
    """Greedy token into seq[:, column]; rows that already emitted eos get pad (as HF generate does)."""
    next_token = torch.where(finished, pad, logits.argmax(-1))
    finished.logical_or_(next_token == eos)
    seq.index_copy_(1, column, next_token.unsqueeze(1))


_STEP_FUNCTIONS = (_step_prologue, _decode_layer, _step_epilogue)
# (backend, mode) -> compiled (prologue, layer, epilogue). The functions themselves are compiled (not per-spec
# wrappers): Dynamo keeps its compiled variants per code object, so each function holds one entry per (spec, batch
# size).
_COMPILED: Dict[Tuple[str, Optional[str]], Tuple] = {}
# equal specs share one object, so a new generator of the same model dimensions reuses the compiled code
_SPECS: Dict[_DecoderSpec, _DecoderSpec] = {}


def _compiled_step_functions(backend: str, mode: Optional[str]) -> Tuple:
    if (backend, mode) not in _COMPILED:
        # static shapes (one variant per batch size), no graph breaks; the weights are arguments, so the layer
        # function compiles once for all layers
        _COMPILED[backend, mode] = tuple(
            torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode) for fn in _STEP_FUNCTIONS
        )
    return _COMPILED[backend, mode]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"fast generation does not support this model: {message}")


def _check_rms_norm(module: nn.Module, where: str) -> None:
    _require(
        isinstance(module, LayerNormParameterized)
        and not module.use_mean
        and module.elementwise_scale
        and not module.elementwise_shift
        and module.use_high_precision_pow,
        f"{where} must be FMS Granite's RMSNorm (LayerNormParameterized, use_mean=False, scale only, fp32 pow)",
    )


def _check_linear(module: nn.Module, where: str) -> None:
    _require(type(module) is nn.Linear, f"{where} must be a plain nn.Linear (got {type(module).__name__})")


class _Session:
    """Cache, state and captured graphs for one batch size."""

    def __init__(self, batch: int, cache: StaticKVCache, state: _DecodeState):
        self.batch = batch
        self.cache = cache
        self.state = state
        self.length = 0  # host copy of state.slot (read without a device sync)
        self.offset = 0  # cache column of the prompt's first token (the static prefill's bucket padding before it)
        self.graphs: Dict[bool, torch.cuda.CUDAGraph] = {}  # keyed by "LoRA adapter on"
        self.prefill_embeds: Dict[int, torch.Tensor] = {}  # bucket length -> [B, bucket, D] input of its prefill
        self.prefill_graphs: Dict[Tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket length, LoRA on)


class StaticGenerator:
    """Greedy generation for one `GraniteSpeech` with a static KV cache of `max_len` columns (prompt + new tokens).

    Caches and captured graphs are kept per batch size and reused across `generate` calls. By default the prompt runs
    through `model.forward` and FMS's cache is copied in. `static_prefill=True` runs it through the step's own layer
    math over the whole prompt instead, writing K/V straight into the static cache (no second copy of the prompt's
    KV), and on GPU replays it from a CUDA graph per (batch size, prompt length rounded up to PREFILL_BUCKET).
    `encoder="compiled"` or `"flex"` compiles encoder + projector (math or flex_attention block attention) once per
    feature shape, inside the audio CUDA graph; past Dynamo's recompile limit (8 shapes) Dynamo warns and runs the
    further shapes eagerly. `gemv="splitk"` runs the decode step's weight products (up to `gemv.MAX_ROWS` rows)
    through the Triton split-K GEMV instead of cuBLAS (CUDA only).
    """

    def __init__(
        self,
        model: GraniteSpeech,
        max_len: int,
        use_cuda_graph: bool = True,
        compile_step: bool = False,
        compile_backend: str = "inductor",
        static_prefill: bool = False,
        encoder: str = "eager",
        compile_mode: Optional[str] = None,
        gemv: str = "cublas",
    ):
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if compile_mode is not None and not compile_step and encoder == "eager":
            raise ValueError(f"compile_mode={compile_mode!r} needs something compiled: compile_step=True or "
                             f"encoder='compiled' / 'flex'")
        if compile_mode is not None and compile_backend != "inductor":
            raise ValueError(f"compile_mode is an inductor setting; compile_backend is {compile_backend!r}")
        if gemv not in GEMVS:
            raise ValueError(f"gemv must be one of {GEMVS}, got {gemv!r}")
        if not isinstance(model, GraniteSpeech):
            raise TypeError(f"model must be a granite_speech GraniteSpeech, got {type(model).__name__}")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (one prompt token, one new token), got {max_len}")
        if model.training:
            raise ValueError("call model.eval() first: the fast path has no dropout")
        if isinstance(model.distributed_strategy, TensorParallelStrategy):
            # its decode step reads the weights directly and has no all-reduce: on shards it would be silently wrong
            raise ValueError("the fast path is single-device; a tensor-parallel model generates with FMS `generate` "
                             "(or granite_speech.generation.generate_greedy)")
        self.model = model
        self.lm = model.language_model
        self.device = self.lm.head.weight.device
        self.dtype = self.lm.head.weight.dtype
        self.max_len = max_len
        self.static_prefill = static_prefill
        self.encoder = encoder
        # compiled once per feature shape (static shapes, as the audio CUDA graphs)
        self._compiled_audio = (torch.compile(model.get_audio_features, dynamic=False, backend=compile_backend,
                                              mode=compile_mode)
                                if encoder != "eager" else None)
        # cache columns: max_len plus the static prefill's bucket padding and room for the capture's warm-up steps
        # (they write up to 2 columns past the current one), rounded up for alignment; the extra columns are masked
        padding = PREFILL_BUCKET - 1 if static_prefill else 0
        self.capacity = -(-(max_len + padding + _WARMUP_STEPS + 1) // _CACHE_LEN_MULTIPLE) * _CACHE_LEN_MULTIPLE
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self.gemv = gemv
        self.spec = self._build_spec()
        self._layers = self._collect_layer_weights()
        self._rope_table = self._build_rope_table()
        if compile_step:
            self._prologue, self._layer, self._epilogue = _compiled_step_functions(compile_backend, compile_mode)
        else:
            self._prologue, self._layer, self._epilogue = _STEP_FUNCTIONS
        self._sessions: Dict[int, _Session] = {}
        self._audio_graphs: Dict[Tuple[int, ...], Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # the prefill graphs of every bucket and batch size share one memory pool: they never run concurrently and
        # write everything they keep into the session's static tensors
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self._active: Optional[_Session] = None

    # ------------------------------------------------------------------ setup
    def _build_spec(self) -> _DecoderSpec:
        cfg = self.lm.config
        _require(cfg.p_dropout == 0.0, f"text p_dropout must be 0 at inference, got {cfg.p_dropout}")
        kvheads = cfg.kvheads or cfg.nheads
        _require(cfg.nheads % kvheads == 0, f"nheads {cfg.nheads} is not a multiple of kvheads {kvheads}")
        block = self.lm.base_model.layers[0]
        lora = self.model.lora
        slots: Tuple[int, ...] = ()
        if lora is not None:
            slots = tuple(TARGET_SLOT[t] for t in lora.targets)
        spec = _DecoderSpec(
            nheads=cfg.nheads,
            kvheads=kvheads,
            head_dim=cfg.head_dim,
            hidden_dim=block.ff_sub_layer.hidden_dim,
            norm_eps=block.ln.eps,
            residual_multiplier=float(cfg.residual_multiplier),
            attention_multiplier=float(cfg.attention_multiplier),
            embedding_multiplier=float(cfg.embedding_multiplier),
            logits_scaling=float(cfg.logits_scaling),
            lora_slots=slots,
            lora_scaling=float(lora.scaling) if lora is not None else 0.0,
            splitk_rows=self._splitk_rows(),
        )
        return _SPECS.setdefault(spec, spec)

    def _splitk_rows(self) -> int:
        if self.gemv != "splitk":
            return 0
        refusal = splitk_refusal(self.device)
        if refusal:
            raise ValueError(f"gemv='splitk': {refusal}")
        from granite_speech.gemv import MAX_ROWS

        return MAX_ROWS

    def _collect_layer_weights(self) -> List[dict]:
        layers = []
        base = self.lm.base_model
        _check_rms_norm(base.dec_norm, "dec_norm")
        _require(base.dec_norm.eps == self.spec.norm_eps, "dec_norm and the layer norms must share norm_eps")
        _check_linear(self.lm.head, "head")
        for i, block in enumerate(base.layers):
            where = f"language_model.base_model.layers[{i}]"
            _check_rms_norm(block.ln, f"{where}.ln")
            _check_rms_norm(block.ff_ln, f"{where}.ff_ln")
            _require(hasattr(block.attn.in_proj, "qkv_fused"), f"{where}.attn.in_proj must be fused (fused_weights=True)")
            _require(block.ff_sub_layer.fused, f"{where}.ff_sub_layer must be fused (fused_weights=True)")
            _require(isinstance(block.ff_sub_layer.a, nn.SiLU), f"{where}.ff_sub_layer activation must be silu/swish")
            _require(block.attn.scale_factor is not None, f"{where}.attn has no scale_factor (attention_multiplier)")
            for name, linear in (
                ("attn.in_proj.qkv_fused", block.attn.in_proj.qkv_fused),
                ("attn.dense", block.attn.dense),
                ("ff_sub_layer.wg1_fused", block.ff_sub_layer.wg1_fused),
                ("ff_sub_layer.w2", block.ff_sub_layer.w2),
            ):
                _check_linear(linear, f"{where}.{name}")
            lora: Tuple[torch.Tensor, ...] = ()
            if self.model.lora is not None:
                pairs = self.model.lora.layers[i]
                lora = tuple(w for t in self.model.lora.targets for w in (pairs[t].lora_A.weight, pairs[t].lora_B.weight))
            layers.append(
                dict(
                    ln_w=block.ln.weight,
                    qkv_w=block.attn.in_proj.qkv_fused.weight,
                    qkv_b=block.attn.in_proj.qkv_fused.bias,
                    dense_w=block.attn.dense.weight,
                    dense_b=block.attn.dense.bias,
                    ff_ln_w=block.ff_ln.weight,
                    wg1_w=block.ff_sub_layer.wg1_fused.weight,
                    wg1_b=block.ff_sub_layer.wg1_fused.bias,
                    w2_w=block.ff_sub_layer.w2.weight,
                    w2_b=block.ff_sub_layer.w2.bias,
                    lora=lora,
                )
            )
        return layers

    def _build_rope_table(self) -> torch.Tensor:
        rot_emb = self.lm.base_model.rot_emb
        _require(rot_emb.rope_type == "regular" and rot_emb.partial_rope == 1.0, "only regular, full RoPE")
        alpha = rot_emb.compute_freqs_cis(self.device, self.capacity)
        table = rot_emb.cached_freqs[self.device.index][alpha]  # [positions, head_dim/2, 2, 2] fp32
        if table.size(0) < self.capacity:
            raise ValueError(f"the RoPE table holds {table.size(0)} positions, fewer than needed ({self.capacity})")
        return table

    def _session(self, batch: int) -> _Session:
        if batch not in self._sessions:
            cfg = self.lm.config
            cache = StaticKVCache(
                cfg.nlayers, batch, self.spec.kvheads, self.capacity, self.spec.head_dim, self.dtype, self.device
            )
            state = _DecodeState(batch, self.capacity, self.lm.head.weight.size(0), self.device)
            self._sessions[batch] = _Session(batch, cache, state)
        return self._sessions[batch]

    # ------------------------------------------------------------------ audio
    @torch.no_grad()
    def encode_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """`model.get_audio_features`, replayed from a CUDA graph captured once per feature shape on GPU."""
        if not self.use_cuda_graph:
            return self._audio_features(input_features)
        key = tuple(input_features.shape)
        if key not in self._audio_graphs:
            static_in = input_features.to(self.device, self.dtype).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_STEPS):
                    self._audio_features(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._audio_features(static_in)
            self._audio_graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._audio_graphs[key]
        static_in.copy_(input_features)
        graph.replay()
        return static_out.clone()

    def _audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Encoder + projector: eager as the model runs them, or compiled (inductor), the Conformer's block attention
        through SDPA's math kernel ("compiled") or `flex_attention` ("flex", no [C, C] Shaw bias tensor)."""
        if self._compiled_audio is None:
            return self.model.get_audio_features(input_features)
        with self.model.encoder.attention_kernel("flex" if self.encoder == "flex" else "math"):
            return self._compiled_audio(input_features)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        audio_embeds: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Run the prompt through the decoder into the static cache and pick the first new token: by `model.forward`
        (use_cache) or, with static_prefill=True, by the static prefill (bucketed, graphed on GPU).

        Returns the last-position logits [B, vocab] (fp32, FMS scale: head / logits_scaling).
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a LongTensor [batch, seq_len], got {input_ids.dtype} {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if length + 1 > self.max_len:
            raise ValueError(f"prompt of {length} tokens leaves no room in a cache of max_len {self.max_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        real = attention_mask.to(self.device).bool()
        if not bool(real[:, -1].all()):
            raise ValueError("attention_mask must be left-padded: the last column must be a real token in every row")
        eos = -1 if eos_token_id is None else int(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (self.lm.config.pad_id if self.lm.config.pad_id >= 0 else 0)

        session = self._session(batch)
        state = session.state
        if self.static_prefill:
            bucket = -(-length // PREFILL_BUCKET) * PREFILL_BUCKET
            offset = bucket - length
        else:
            bucket, offset = length, 0
        state.seq.zero_()
        state.seq[:, offset:bucket].copy_(input_ids)
        state.valid.zero_()
        state.valid[:, offset:bucket].copy_(real)
        state.eos.fill_(eos)
        state.pad.fill_(int(pad))
        state.finished.zero_()
        if self.static_prefill:
            # the epilogue picks the token after column bucket - 1 and advances slot and position past it
            state.slot.fill_(bucket - 1)
            state.rope_pos.copy_(real.sum(-1) - 1)
            self._run_static_prefill(session, input_ids, audio_embeds, input_features_mask, offset)
        else:
            attn = padding_attn_kwargs(real.long(), dtype=self.dtype)
            logits, cache = self.model(
                input_ids,
                input_features_mask=input_features_mask,
                audio_embeds=audio_embeds,
                use_cache=True,
                last_n_tokens=1,
                **attn,
            )
            session.cache.load_prefix(cache)
            state.rope_pos.copy_(real.sum(-1))  # real tokens so far = position of the next one
            state.slot.fill_(length)
            logits = logits[:, -1].float()
            state.logits.copy_(logits)
            _pick_next(logits, state.seq, state.slot, state.finished, state.eos, state.pad)
        session.length = bucket
        session.offset = offset
        self._active = session
        return state.logits

    def _run_static_prefill(
        self,
        session: _Session,
        input_ids: torch.Tensor,
        audio_embeds: Optional[torch.Tensor],
        input_features_mask: Optional[torch.Tensor],
        offset: int,
    ) -> None:
        # the merge (and its checks, which read the device) stays eager; the layers run on a static input buffer
        embeds = self.model.embed_inputs(input_ids, input_features_mask=input_features_mask, audio_embeds=audio_embeds)
        if self.model.lora is not None:
            self.model.lora.enabled = audio_embeds is not None  # as GraniteSpeech.forward sets it
        lora_on = self._lora_on()
        bucket = offset + input_ids.size(1)
        if bucket not in session.prefill_embeds:
            session.prefill_embeds[bucket] = torch.zeros(
                session.batch, bucket, embeds.size(-1), dtype=self.dtype, device=self.device
            )
        buffer = session.prefill_embeds[bucket]
        buffer[:, :offset].zero_()  # the bucket's padding (masked; zero, not a longer earlier prompt's tokens)
        buffer[:, offset:].copy_(embeds)
        if not self.use_cuda_graph:
            self._prefill_step(session, bucket, lora_on)
            return
        key = (bucket, lora_on)
        if key not in session.prefill_graphs:
            session.prefill_graphs[key] = self._capture(
                session, lambda: self._prefill_step(session, bucket, lora_on), pool=self._prefill_pool
            )
        session.prefill_graphs[key].replay()

    def _prefill_step(self, session: _Session, bucket: int, lora_on: bool) -> None:
        """The prompt's `bucket` columns through every layer into the static cache, then the first new token; every
        tensor op is in place on `session` (capturable)."""
        state, cache, base, spec = session.state, session.cache, self.lm.base_model, self.spec
        x, mask, rot = _prefill_prologue(spec, session.prefill_embeds[bucket], state.valid[:, :bucket], self._rope_table)
        mlp_out = torch.zeros_like(x)
        for weights, key_cache, value_cache in zip(self._layers, cache.keys, cache.values):
            x, mlp_out = _prefill_layer(
                spec, x, mlp_out, *self._layer_weights(weights, lora_on), key_cache, value_cache, rot, mask
            )
        _step_epilogue(
            spec, x[:, -1], mlp_out[:, -1], base.dec_norm.weight, self.lm.head.weight, state.seq, state.slot,
            state.rope_pos, state.finished, state.eos, state.pad, state.logits,
        )

    # ------------------------------------------------------------------ decode
    def _step(self, session: _Session, lora_on: bool) -> None:
        """One token for the whole batch; every tensor op is in place on `session` (capturable)."""
        state, cache, base = session.state, session.cache, self.lm.base_model
        spec = self.spec
        x, attn_bias, rot = self._prologue(
            spec,
            state.seq, state.slot, state.rope_pos, state.valid, self._rope_table, base.embedding.weight
        )
        mlp_out = torch.zeros_like(x)
        for weights, key_cache, value_cache in zip(self._layers, cache.keys, cache.values):
            x, mlp_out = self._layer(
                spec, x, mlp_out, *self._layer_weights(weights, lora_on), key_cache, value_cache, rot, state.slot,
                attn_bias,
            )
        self._epilogue(
            spec, x, mlp_out, base.dec_norm.weight, self.lm.head.weight, state.seq, state.slot, state.rope_pos,
            state.finished, state.eos, state.pad, state.logits,
        )

    @staticmethod
    def _layer_weights(weights: dict, lora_on: bool) -> tuple:
        """One layer's weights in the order `_decode_layer` and `_prefill_layer` take them."""
        return (
            weights["ln_w"], weights["qkv_w"], weights["qkv_b"], weights["dense_w"], weights["dense_b"],
            weights["ff_ln_w"], weights["wg1_w"], weights["wg1_b"], weights["w2_w"], weights["w2_b"],
            weights["lora"] if lora_on else (),
        )

    @staticmethod
    def _capture(session: _Session, step, pool=None) -> torch.cuda.CUDAGraph:
        # Warm-up steps run for real (cuBLAS handles, compile); the state is restored afterwards. The K/V they write
        # land in columns >= slot, which are masked until a real step overwrites them (a prefill's are rewritten by
        # the replay that follows its capture).
        saved = session.state.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        session.state.restore(saved)
        return graph

    @torch.no_grad()
    def decode_step(self) -> torch.Tensor:
        """Decode one token for every row of the last prefilled batch; returns the step's logits [B, vocab]
        (a static buffer, overwritten by the next step)."""
        session = self._active
        if session is None:
            raise RuntimeError("call prefill() before decode_step()")
        if session.length - session.offset + 1 >= self.max_len:
            raise ValueError(f"the static cache of max_len {self.max_len} is full")
        self._run_step(session)
        return session.state.logits

    def _lora_on(self) -> bool:
        return self.model.lora is not None and bool(self.model.lora.enabled)

    def _run_step(self, session: _Session) -> None:
        lora_on = self._lora_on()
        if not self.use_cuda_graph:
            self._step(session, lora_on)
        else:
            if lora_on not in session.graphs:
                session.graphs[lora_on] = self._capture(session, lambda: self._step(session, lora_on))
            session.graphs[lora_on].replay()
        session.length += 1

    def static_bytes(self, batch: int) -> int:
        """Device bytes held for `batch`: the KV cache and the decode state (0 before its first use)."""
        session = self._sessions.get(batch)
        if session is None:
            return 0
        state = sum(t.numel() * t.element_size() for t in session.state._tensors().values())
        return session.cache.nbytes() + state

    def tokens(self, length: int) -> torch.Tensor:
        """The first `length` columns of the active batch's token buffer (prompt + generated)."""
        if self._active is None:
            raise RuntimeError("nothing generated yet")
        offset = self._active.offset
        return self._active.state.seq[:, offset : offset + length]

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 128,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy tokens [B, L + new] (prompt included, as HF/FMS generate return). With `eos_token_id`, rows that
        finished get `pad_token_id` and generation stops once every row has finished (HF semantics)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        length = input_ids.size(-1)
        if length + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds the cache's max_len {self.max_len}"
            )
        audio_embeds = self.encode_audio(input_features) if input_features is not None else None
        self.prefill(input_ids, audio_embeds, input_features_mask, attention_mask, eos_token_id, pad_token_id)
        session = self._active
        for step in range(1, max_new_tokens):
            if eos_token_id is not None and step % _EOS_CHECK_EVERY == 0 and bool(session.state.finished.all()):
                break
            self._run_step(session)
        out = self.tokens(length + max_new_tokens).clone()
        if eos_token_id is not None:
            out = out[:, : length + _new_tokens_until_all_finished(out[:, length:], eos_token_id)]
        return out


def _new_tokens_until_all_finished(new_tokens: torch.Tensor, eos_token_id: int) -> int:
    """HF stops after the step at which the last row emitted eos; all steps when some row never did."""
    is_eos = new_tokens == eos_token_id
    if not bool(is_eos.any(-1).all()):
        return new_tokens.size(1)
    return int(is_eos.int().argmax(-1).max()) + 1


def generate_static(
    model: GraniteSpeech,
    input_ids: torch.Tensor,
    input_features: Optional[torch.Tensor] = None,
    input_features_mask: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 128,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    use_cuda_graph: bool = True,
    compile_step: bool = False,
    compile_backend: str = "inductor",
    static_prefill: bool = False,
    encoder: str = "eager",
    compile_mode: Optional[str] = None,
    gemv: str = "cublas",
) -> torch.Tensor:
    """One-shot greedy generation (a `StaticGenerator` sized to this prompt). Returns LongTensor [B, L + new].

    To amortise the graph capture over several calls, keep a `StaticGenerator` instead.
    """
    generator = StaticGenerator(
        model,
        input_ids.size(-1) + max_new_tokens,
        use_cuda_graph=use_cuda_graph,
        compile_step=compile_step,
        compile_backend=compile_backend,
        static_prefill=static_prefill,
        encoder=encoder,
        compile_mode=compile_mode,
        gemv=gemv,
    )
    return generator.generate(
        input_ids,
        input_features=input_features,
        input_features_mask=input_features_mask,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
