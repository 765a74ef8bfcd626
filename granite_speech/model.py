"""Granite Speech in FMS: Conformer encoder -> windowed Q-Former projector -> FMS Granite decoder.

Layout follows `fms/models/llava_next.py`: the composite module, its generation hook, then the variants and the
factory registration. The checkpoint adapter steps live in `granite_speech.checkpoint.adapter` and register themselves on import.
"""

import logging
import math
from typing import Any, MutableMapping, Optional, Tuple

import torch
import torch.nn as nn

from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy, TensorParallelStrategy
from fms.models.granite import Granite
from fms.modules.positions import RopeLlama3ScalingImpl, RopeNoScalingImpl, RotaryEmbedding

from granite_speech.checkpoint import coverage
from granite_speech.config import VARIANTS, GraniteSpeechConfig
from granite_speech.conformer import ConformerEncoder
from granite_speech.lora import ModalityLoRA
from granite_speech.projector import QFormerProjector

logger = logging.getLogger(__name__)


def padding_attn_kwargs(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """FMS `mask`/`position_ids` for a padded batch given HF's [B, L] attention mask (1 = token, 0 = pad).

    Same semantics as `fms.utils.generation.pad_input_ids`: causal, real tokens never see pads, pad rows see only
    pads (so they stay finite), positions count real tokens from 0.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    allowed = (real.unsqueeze(-1) == real.unsqueeze(-2)).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=real.device).masked_fill(~allowed, float("-inf"))
    position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
    return {"mask": mask, "position_ids": position_ids}


class _RopeLinearScalingImpl(RopeNoScalingImpl):
    """HF rope_type "linear": the default inverse frequencies divided by `factor` (positions / factor)."""

    def compute_scaled_freqs(self, device: str, alpha: int):
        return super().compute_scaled_freqs(device, alpha) / self.scaling_info["factor"]


# HF rope_type -> FMS table implementation (RopeLlama3ScalingImpl is HF's llama3 formula, checked against HF)
_ROPE_IMPLS = {"default": RopeNoScalingImpl, "linear": _RopeLinearScalingImpl, "llama3": RopeLlama3ScalingImpl}


class GraniteSpeechRotaryEmbedding(RotaryEmbedding):
    """FMS's RotaryEmbedding with (a) the HF rope types FMS computes as cos/sin tables (`default`, `linear`,
    `llama3`; the config audit refuses the rest) and (b) tables that grow with the positions asked for.

    FMS caches one table per scaling alpha and never regrows it once built (`max_expected_seq_len` rows), so a
    position beyond it is an IndexError; HF computes RoPE for any position. A request for more positions through an
    int (`GraniteSpeech.forward` and `fast_generate` ask with ints, eagerly) rebuilds the table at least twice as
    long. The tensor-valued requests FMS's attention makes are left alone (reading them would sync the device).
    The table path (`rope_type` "regular") is kept for every type, so fast_generate can use it.
    """

    def __init__(self, dim: int, ratio: float, max_seq_len: int, scaling: Optional[dict] = None):
        super().__init__(dim=dim, ratio=ratio, max_seq_len=max_seq_len)
        scaling = dict(scaling or {})
        self.hf_rope_type = scaling.get("rope_type", "default")
        self.rope_scaling = _ROPE_IMPLS[self.hf_rope_type](self.dim, ratio, max_seq_len, scaling)

    def compute_freqs_cis(self, device, max_seq_len=2048):
        if isinstance(max_seq_len, int) and device != torch.device("meta"):
            cached = self.max_seq_len_cached.get(device.index, 0)
            if 0 < cached < max_seq_len:
                self.cached_freqs[device.index] = {}
                self.max_seq_len_cached[device.index] = 0
                max_seq_len = max(max_seq_len, 2 * cached)
        return super().compute_freqs_cis(device, max_seq_len)


def _install_rotary_embedding(language_model: Granite) -> None:
    """Replace the RoPE FMS's Granite builds (regular or ntk only) by GraniteSpeechRotaryEmbedding."""
    text = language_model.config
    base = language_model.base_model
    rot_emb = GraniteSpeechRotaryEmbedding(
        dim=text.head_dim,
        ratio=text.rope_theta,
        max_seq_len=text.max_expected_seq_len,
        scaling=getattr(text, "rope_scaling", None),
    )
    base.rot_emb = rot_emb
    for block in base.layers:
        block.attn.position_encoder = rot_emb
    for device in {p.device for p in base.parameters()}:
        rot_emb.compute_freqs_cis(device, text.max_expected_seq_len)


def merge_audio_embeds(
    text_embeds: torch.Tensor,
    is_audio: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Put the valid audio rows, in row-major order, at the `<|audio|>` positions (HF's masked_scatter semantics).

    Written with static shapes (cumsum + searchsorted + gather) instead of boolean indexing so that the merge
    compiles with fullgraph=True.
    """
    batch, seq_len, dim = text_embeds.shape
    flat_audio = audio_embeds.reshape(-1, dim)
    if audio_mask is None:
        audio_mask = torch.ones(audio_embeds.shape[:2], dtype=torch.bool, device=audio_embeds.device)
    valid_before = audio_mask.reshape(-1).long().cumsum(0)
    token_rank = is_audio.reshape(-1).long().cumsum(0)  # k-th audio token has rank k (1-based)
    source_row = torch.searchsorted(valid_before, token_rank).clamp(max=flat_audio.size(0) - 1)
    gathered = flat_audio.index_select(0, source_row).view(batch, seq_len, dim)
    return torch.where(is_audio.unsqueeze(-1), gathered.to(text_embeds.dtype), text_embeds)


def check_token_ids(input_ids: torch.Tensor, is_audio: torch.Tensor, vocab_size: int) -> int:
    """Raise when a token id lies outside the embedding table (ids of another tokenizer: on CUDA the lookup would
    fail as a device-side assert that poisons the process); returns the number of audio placeholders. One sync."""
    if input_ids.numel() == 0:
        return 0
    low, high, n_placeholders = torch.stack([input_ids.min(), input_ids.max(), is_audio.sum()]).tolist()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids hold token id {bad}, outside this model's vocabulary [0, {vocab_size}); "
                         "were they made by another model's tokenizer?")
    return n_placeholders


def check_audio_token_counts(
    input_ids: torch.Tensor, audio_token_index: int, audio_rows: int, audio_mask: Optional[torch.Tensor], n_audio: int
) -> None:
    """Raise when `<|audio|>` placeholders and audio feature rows disagree (eager only: it reads values)."""
    tokens_per_row = (input_ids == audio_token_index).sum(-1).tolist()
    if audio_mask is None:
        features_per_audio = [audio_rows] * n_audio
    else:
        if audio_mask.dim() != 2 or audio_mask.shape != (n_audio, audio_rows) or audio_mask.dtype != torch.bool:
            raise ValueError(
                f"input_features_mask must be a bool tensor of shape [num_audios={n_audio}, "
                f"audio_tokens={audio_rows}], got {audio_mask.dtype} {tuple(audio_mask.shape)}"
            )
        features_per_audio = audio_mask.sum(-1).tolist()
    if n_audio == len(tokens_per_row):
        if tokens_per_row != features_per_audio:
            raise ValueError(
                f"audio tokens per prompt {tokens_per_row} do not match audio features per clip "
                f"{features_per_audio} (placeholder id {audio_token_index})"
            )
    elif sum(tokens_per_row) != sum(features_per_audio):
        # several clips per prompt: rows are consumed in order, only the totals can be checked
        raise ValueError(
            f"{sum(tokens_per_row)} audio tokens in the prompts (per prompt {tokens_per_row}) but "
            f"{sum(features_per_audio)} audio features across {n_audio} clips ({features_per_audio})"
        )


def check_tensor_parallel(text_config, strategy: DistributedStrategy) -> None:
    """Tensor parallelism shards the decoder only (FMS Granite's TP: attention heads and MLP columns); the encoder
    and projector run once per clip, hold a small share of the weights and are replicated. Refused before any
    weight loads: head counts that do not divide by the ranks (FMS would replicate kv heads, which the per-rank
    LoRA rows do not follow)."""
    if not isinstance(strategy, TensorParallelStrategy):
        return
    world = torch.distributed.get_world_size(strategy.group)
    kvheads = text_config.kvheads or text_config.nheads
    if text_config.nheads % world or kvheads % world:
        raise ValueError(
            f"tensor parallelism over {world} ranks needs the attention heads ({text_config.nheads}) and kv heads "
            f"({kvheads}) to be multiples of {world}; use a world size that divides {math.gcd(text_config.nheads, kvheads)}"
        )


class GraniteSpeech(nn.Module):
    def __init__(
        self,
        config: Optional[GraniteSpeechConfig] = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        config = config if config is not None else GraniteSpeechConfig()
        self.config = config.updated(**kwargs)
        self.config.__post_init__()  # updated() bypasses the dataclass checks (e.g. a lora_mode typo)
        if not self.config.fused_weights:
            self.config.text_config.fused_weights = False
        self.distributed_strategy = distributed_strategy
        check_tensor_parallel(self.config.text_config, distributed_strategy)

        # the encoder and projector are replicated on every rank (see check_tensor_parallel)
        self.encoder = ConformerEncoder(self.config.encoder_config)
        self.projector = QFormerProjector(self.config.projector_config)
        self.language_model = Granite(self.config.text_config, distributed_strategy)
        _install_rotary_embedding(self.language_model)
        self.lora = ModalityLoRA(self.config) if self.config.lora_rank else None
        coverage.open_ledger(self)

    @classmethod
    def from_config(cls, config: GraniteSpeechConfig) -> "GraniteSpeech":
        return cls(config)

    def get_config(self) -> GraniteSpeechConfig:
        return self.config

    def reset_parameters(self):
        self.encoder.reset_parameters()
        self.projector.reset_parameters()
        self.language_model.reset_parameters()
        if self.lora is not None:
            self.lora.reset_parameters()

    def post_init(self):
        # Called by get_model after the weights are loaded (or randomly initialised).
        coverage.audit_loaded_checkpoint(self)
        self.encoder.post_init()
        self.projector.post_init()
        self.language_model.post_init()
        if self.lora is not None:
            self.lora.attach(self.language_model.base_model, merge=self.config.lora_mode == "merged")
            if self.config.lora_mode == "merged":
                self.lora = None
        # What get_model returns is ready for inference as the README shows it: eval mode (dropout off in the
        # encoder and the Q-Former). Call .train() explicitly to train.
        self.eval()

    # ------------------------------------------------------------------ audio path
    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """[B, frames, input_dim] log-mel stacks -> [B, windows * queries, text emb_dim] audio embeddings."""
        if input_features.dim() != 3 or input_features.size(-1) != self.config.encoder_config.input_dim:
            raise ValueError(
                f"input_features must be [batch, frames, {self.config.encoder_config.input_dim}], "
                f"got {tuple(input_features.shape)}"
            )
        dtype = self.projector.out_proj.weight.dtype
        return self.projector(self.encoder(input_features.to(dtype)))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        audio_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with audio rows merged at the placeholders; the embedding multiplier is NOT applied
        here (GraniteHeadless applies it to the merged embeddings, audio rows included, as HF does)."""
        if input_features is not None and audio_embeds is not None:
            raise ValueError("pass either input_features or precomputed audio_embeds, not both")
        is_audio = input_ids == self.config.audio_token_index
        checking = not torch.compiler.is_compiling()
        if checking:
            vocab_size = self.language_model.base_model.embedding.num_embeddings
            n_placeholders = check_token_ids(input_ids, is_audio, vocab_size)
        # HF embeds the placeholders as token 0 before overwriting them
        text_embeds = self.language_model.base_model.embedding(input_ids.masked_fill(is_audio, 0))
        if input_features is not None:
            audio_embeds = self.get_audio_features(input_features)
        if audio_embeds is None:
            if checking and n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} audio tokens (id {self.config.audio_token_index}) "
                    "but no input_features were given"
                )
            return text_embeds
        if not torch.compiler.is_compiling():
            check_audio_token_counts(
                input_ids,
                self.config.audio_token_index,
                audio_embeds.size(1),
                input_features_mask,
                audio_embeds.size(0),
            )
        return merge_audio_embeds(text_embeds, is_audio, audio_embeds, input_features_mask)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        input_features_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_value_states: Optional[Tuple[torch.Tensor, ...]] = None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        audio_embeds: Optional[torch.Tensor] = None,
        use_audio_adapter: Optional[bool] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **attn_kwargs,
    ):
        """Logits (and the KV cache when use_cache) for token ids with optional audio.

        `input_ids` may also be precomputed embeddings [B, L, D] (as FMS decoders accept). `audio_embeds` are
        projector outputs computed earlier (generation encodes audio once). `use_audio_adapter` switches the
        modality LoRA in lora_mode="audio_only"; by default it is on exactly when audio is given.

        `attention_mask` is HF's [B, past + L] padding mask (1 = token, 0 = pad), the key every processor output
        carries, so `model(**processor(...))` works on padded batches: it becomes FMS's `mask` / `position_ids`
        (see `padding_attn_kwargs`). Passing it together with both `mask` and `position_ids` is an error, since it
        would not be used.
        """
        if attention_mask is not None:
            position_ids = self._apply_attention_mask(
                attention_mask, input_ids, position_ids, past_key_value_states, attn_kwargs
            )
        if input_ids.dim() == 3:
            embeds = input_ids
        else:
            embeds = self.embed_inputs(input_ids, input_features, input_features_mask, audio_embeds)
        if self.lora is not None:
            has_audio = input_features is not None or audio_embeds is not None
            self.lora.enabled = has_audio if use_audio_adapter is None else use_audio_adapter
        past_len = _cache_length(past_key_value_states)
        if not torch.compiler.is_compiling() and not _cuda_graph_capturing():
            self.reserve_positions(past_len + embeds.size(1), position_ids, embeds.device)
        # FMS's SDPA op tells [B, L, kvheads, D] keys from [B, kvheads, L, D] ones by their shape and gets it wrong
        # when L == kvheads without a cache (wrong attention, no error); through the cache path the keys are
        # always [B, kvheads, L, D]. Static shapes only, so it compiles.
        kvheads = self.config.text_config.kvheads or self.config.text_config.nheads
        shape_workaround = not use_cache and embeds.size(1) == kvheads
        output = self.language_model(
            embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache or shape_workaround,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )
        return output[0] if shape_workaround else output

    def _apply_attention_mask(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        past_key_value_states,
        attn_kwargs: dict,
    ) -> Optional[torch.Tensor]:
        """HF attention_mask -> FMS `mask` (into attn_kwargs) and `position_ids` (returned), each only where the
        caller did not pass it, exactly as `padding_attn_kwargs` builds them."""
        if attn_kwargs.get("mask") is not None and position_ids is not None:
            raise ValueError(
                "attention_mask was given together with mask and position_ids, so it would be ignored; pass either "
                "HF's attention_mask or FMS's mask/position_ids"
            )
        batch, seq_len = input_ids.shape[:2]
        expected = (batch, _cache_length(past_key_value_states) + seq_len)
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask must be [batch, past + seq_len] = {list(expected)} for input_ids of shape "
                f"{list(input_ids.shape[:2])}, got {list(attention_mask.shape)}"
            )
        dtype = self.language_model.base_model.embedding.weight.dtype
        padding = padding_attn_kwargs(attention_mask.to(input_ids.device), dtype=dtype)
        if attn_kwargs.get("mask") is None:
            attn_kwargs["mask"] = padding["mask"][:, -seq_len:, :]
        if position_ids is None:
            position_ids = padding["position_ids"][:, -seq_len:]
        return position_ids

    def reserve_positions(
        self, length: int, position_ids: Optional[torch.Tensor] = None, device: Optional[torch.device] = None
    ) -> None:
        """Grow the decoder's RoPE tables to cover `length` positions (and every position in `position_ids`).
        forward calls it eagerly; call it before torch.compile for sequences longer than max_expected_seq_len."""
        if position_ids is not None and position_ids.numel() > 0:
            length = max(length, int(position_ids.max()) + 1)
        device = device if device is not None else self.language_model.head.weight.device
        self.language_model.base_model.rot_emb.compute_freqs_cis(device, int(length))

    def prepare_inputs_for_generation(
        self, iteration: int, input_ids: torch.Tensor, kwargs: MutableMapping[str, Any]
    ) -> Tuple[torch.Tensor, MutableMapping[str, Any]]:
        """Hook for `fms.utils.generation.generate`: the audio is encoded once, at iteration 0, and its embeddings
        are kept for re-merging only when the KV cache is off (the full sequence is re-run each step)."""
        if iteration == 0:
            attention_mask = kwargs.pop("attention_mask", None)
            if attention_mask is not None:
                # FMS generate extends `mask`/`position_ids` step by step; HF's [B, L] mask must become them once
                position_ids = self._apply_attention_mask(
                    attention_mask, input_ids, kwargs.get("position_ids"), None, kwargs
                )
                kwargs["position_ids"] = position_ids
            features = kwargs.pop("input_features", None)
            if features is not None:
                kwargs["audio_embeds"] = self.get_audio_features(features)
            kwargs["use_audio_adapter"] = features is not None or kwargs.get("audio_embeds") is not None
        elif kwargs.get("use_cache"):
            # the audio rows are in the cache now; the new token is text
            kwargs.pop("audio_embeds", None)
            kwargs.pop("input_features_mask", None)
        return input_ids, kwargs


def _cuda_graph_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _cache_length(past_key_value_states) -> int:
    """Positions already in an FMS KV cache (per layer (k, v), k: [B, kvheads, past, head_dim]); 0 without one."""
    if not past_key_value_states:
        return 0
    first = past_key_value_states[0]
    if first is None or first[0] is None:
        return 0
    return first[0].size(2)


_architecture_name = "granite_speech"


def _granite_speech_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeech(config, **kwargs)

    return factory


for _variant, _config in VARIANTS.items():
    models.register_model(_architecture_name, _variant, _granite_speech_factory_factory(_config))
