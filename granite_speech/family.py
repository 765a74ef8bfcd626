"""The Granite Speech family beyond 3.3 on the 3.3 classes, and what the family members share.

Members and where they live (one FMS architecture per HF architecture, so that `get_model("hf_pretrained")` maps
`config.json`'s `architectures[0]` to one FMS architecture, one adapter and one param builder):

| member                           | HF architecture                           | FMS architecture    | variant     |
|----------------------------------|-------------------------------------------|---------------------|-------------|
| granite-speech-3.3-2b / -8b      | GraniteSpeechForConditionalGeneration     | granite_speech      | 2b / 8b     |
| granite-4.0-1b-speech            | GraniteSpeechForConditionalGeneration     | granite_speech      | 4.0-1b      |
| granite-speech-4.1-2b            | GraniteSpeechForConditionalGeneration     | granite_speech      | 4.1-2b      |
| granite-speech-4.1-2b-plus       | GraniteSpeechPlusForConditionalGeneration | granite_speech_plus | 4.1-2b-plus |
| granite-speech-5.0-470m-turboctc | GraniteSpeech5ForCTC                      | granite_speech5     | 5.0-470m    |

4.0-1b and 4.1-2b are the 3.3 architecture with the modality LoRA merged into the decoder weights: their folders
hold no adapter files, `has_lora_adapter` is false, and they load with `lora_rank=0` (`lora_regime` says so).
Importing this module registers their variants on `granite_speech`.

Dimensions are those of the public config.json copies (see parity/granite/fixtures/configs/FAMILY.md for where
each number comes from and which ones are not public).
"""

import json
from pathlib import Path
from typing import Iterable, Union

from fms import models

from granite_speech.checkpoint.files import check_weight_files
from granite_speech.config import ConformerConfig, GraniteSpeechConfig, QFormerProjectorConfig
from granite_speech.model import _granite_speech_factory_factory


def text_config(**values):
    """A decoder config of the type GraniteSpeechConfig uses, every field that matters given explicitly."""
    base = dict(
        ntk_scaling=False, attn_bias=False, mlp_bias=False, multiple_of=1, activation_fn="silu", p_dropout=0.0,
        norm_eps=1e-5, linear_config=None, fused_weights=True,
    )
    return GraniteSpeechConfig().text_config.updated(**{**base, **values})


# granite-4.0-1b-speech: 16-layer conformer (CTC vocabulary 348), the 3.3 Q-Former, a µP Granite 1B decoder
# (40 layers, 2048 wide, GQA 16/4, untied head, vocabulary 100353 with <|audio|> = 100352). Built from this config,
# HF's classes hold 2,313,141,596 parameters + 65,536 BatchNorm statistics = 2,313,207,132 tensors' elements, the
# published checkpoint's count.
_4_0_1b_config = GraniteSpeechConfig(
    encoder_config=ConformerConfig(output_dim=348),
    projector_config=QFormerProjectorConfig(output_dim=2048),
    text_config=text_config(
        src_vocab_size=100353,
        emb_dim=2048,
        nheads=16,
        head_dim=128,
        kvheads=4,
        nlayers=40,
        pad_id=100256,
        hidden_grow_factor=4096 / 2048,
        max_expected_seq_len=4096,
        tie_heads=False,
        rope_theta=10_000.0,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
    ),
    audio_token_index=100352,
    lora_rank=0,
    lora_alpha=0.0,
)

# granite-speech-4.1-2b: "keeps the 4.0 topology" with a granite-4.0-1b-base decoder. Every number equal to 4.0-1b
# (public third-party copies of the 4.1 config.json agree on the encoder, projector and decoder widths; the
# decoder's max_position_embeddings is not public and only sizes FMS's RoPE cache).
_4_1_2b_config = _4_0_1b_config.updated()

FAMILY_VARIANTS = {"4.0-1b": _4_0_1b_config, "4.1-2b": _4_1_2b_config}

_architecture_name = "granite_speech"

for _variant, _config in FAMILY_VARIANTS.items():
    if _variant not in models.list_variants(_architecture_name):  # the lead may fold these into config.VARIANTS
        models.register_model(_architecture_name, _variant, _granite_speech_factory_factory(_config))


# ---------------------------------------------------------------------------------------------- LoRA regime
LORA_REGIMES = (
    "merged_in_checkpoint",  # no adapter files, has_lora_adapter false: the LoRA is already in the weights (4.x)
    "adapter_merged_at_load",  # adapter files present, folded into the decoder weights at load (lora_mode merged)
    "adapter_audio_only",  # adapter files present, applied only when audio is given (lora_mode audio_only)
    "adapter_missing",  # has_lora_adapter true but no adapter files: the model runs WITHOUT its LoRA
    "none",  # a model with no LoRA at all (the 5.0 CTC model)
)


def lora_regime(folder: Union[str, Path], lora_mode: str = "merged") -> dict:
    """Which LoRA regime a checkpoint folder runs under, for reports: {"regime", "detail", "has_lora_adapter",
    "adapter_files"}. HF's `has_lora_adapter` only logs a warning; what runs is decided by the adapter files."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    has_adapter_files = (folder / "adapter_config.json").is_file()
    declared = config.get("has_lora_adapter")
    if "encoder_config" in config and "text_config" not in config:
        regime, detail = "none", "CTC-only model: no decoder, no LoRA"
    elif has_adapter_files:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        regime = "adapter_audio_only" if lora_mode == "audio_only" else "adapter_merged_at_load"
        detail = (
            f"PEFT adapter r={adapter.get('r')} alpha={adapter.get('lora_alpha')} on "
            f"{sorted(adapter.get('target_modules') or [])}, "
            + ("applied only with audio" if lora_mode == "audio_only" else "merged into the decoder at load")
        )
    elif declared is False:
        regime, detail = "merged_in_checkpoint", "no adapter files (has_lora_adapter=false): LoRA merged in the weights"
    elif declared is True:
        regime, detail = "adapter_missing", "has_lora_adapter=true but no adapter files: running without the LoRA"
    else:
        regime, detail = "merged_in_checkpoint", "no adapter files and no has_lora_adapter flag: weights used as-is"
    return {"regime": regime, "detail": detail, "has_lora_adapter": declared, "adapter_files": has_adapter_files}


# ---------------------------------------------------------------------------------------------- safetensors guard
def guard_architectures(architectures: Iterable[str]) -> None:
    """Extend `granite_speech.checkpoint.files`' guard (safetensors only, checked before FMS reads any weight) to
    more architectures: wraps FMS's architecture resolver once more, idempotently per architecture."""
    import fms.models as fms_models

    name = "__maybe_infer_model_variant"
    original = fms_models.__dict__[name]
    guarded_archs = set(getattr(original, "_granite_family_archs", ()))
    wanted = set(architectures) - guarded_archs
    if not wanted:
        return
    inner = getattr(original, "_granite_family_inner", original)
    archs = frozenset(guarded_archs | wanted)

    def guarded(architecture, variant, model_path, source, **kwargs):
        resolved = inner(architecture, variant, model_path, source, **kwargs)
        if resolved[0] in archs and resolved[2] is not None:
            check_weight_files(resolved[2])
        return resolved

    guarded._granite_family_archs = archs
    guarded._granite_family_inner = inner
    guarded._granite_speech_guard = getattr(inner, "_granite_speech_guard", False)  # files.install_fms_guard's mark
    guarded.__wrapped__ = inner
    setattr(fms_models, name, guarded)
