"""Granite Speech in FMS: Conformer encoder -> windowed Q-Former projector -> FMS Granite decoder.

Layout follows `fms/models/llava_next.py`: the composite module, its generation hook, then the variants and the
factory registration. The checkpoint adapter steps live in `granite_speech.checkpoint.adapter` and register themselves on import.
"""

import logging
from typing import Any, MutableMapping, Optional, Tuple

import torch
import torch.nn as nn

from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.models.granite import Granite

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

        self.encoder = ConformerEncoder(self.config.encoder_config)
        self.projector = QFormerProjector(self.config.projector_config)
        self.language_model = Granite(self.config.text_config, distributed_strategy)
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
        # HF embeds the placeholders as token 0 before overwriting them
        text_embeds = self.language_model.base_model.embedding(input_ids.masked_fill(is_audio, 0))
        if input_features is not None:
            audio_embeds = self.get_audio_features(input_features)
        if audio_embeds is None:
            if not torch.compiler.is_compiling() and bool(is_audio.any()):
                raise ValueError(
                    f"input_ids hold {int(is_audio.sum())} audio tokens (id {self.config.audio_token_index}) "
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
        **attn_kwargs,
    ):
        """Logits (and the KV cache when use_cache) for token ids with optional audio.

        `input_ids` may also be precomputed embeddings [B, L, D] (as FMS decoders accept). `audio_embeds` are
        projector outputs computed earlier (generation encodes audio once). `use_audio_adapter` switches the
        modality LoRA in lora_mode="audio_only"; by default it is on exactly when audio is given.
        """
        if input_ids.dim() == 3:
            embeds = input_ids
        else:
            embeds = self.embed_inputs(input_ids, input_features, input_features_mask, audio_embeds)
        if self.lora is not None:
            has_audio = input_features is not None or audio_embeds is not None
            self.lora.enabled = has_audio if use_audio_adapter is None else use_audio_adapter
        return self.language_model(
            embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )

    def prepare_inputs_for_generation(
        self, iteration: int, input_ids: torch.Tensor, kwargs: MutableMapping[str, Any]
    ) -> Tuple[torch.Tensor, MutableMapping[str, Any]]:
        """Hook for `fms.utils.generation.generate`: the audio is encoded once, at iteration 0, and its embeddings
        are kept for re-merging only when the KV cache is off (the full sequence is re-run each step)."""
        if iteration == 0:
            features = kwargs.pop("input_features", None)
            if features is not None:
                kwargs["audio_embeds"] = self.get_audio_features(features)
            kwargs["use_audio_adapter"] = features is not None or kwargs.get("audio_embeds") is not None
        elif kwargs.get("use_cache"):
            # the audio rows are in the cache now; the new token is text
            kwargs.pop("audio_embeds", None)
            kwargs.pop("input_features_mask", None)
        return input_ids, kwargs


_architecture_name = "granite_speech"


def _granite_speech_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeech(config, **kwargs)

    return factory


for _variant, _config in VARIANTS.items():
    models.register_model(_architecture_name, _variant, _granite_speech_factory_factory(_config))
