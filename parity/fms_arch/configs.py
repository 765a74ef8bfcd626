"""Each FMS architecture's HF counterpart, its tiny default HF config, and the seeded weight regime.

The table is read from FMS itself where FMS says it: the HF class of an architecture is the key FMS's own config
registry maps to it (`fms.models.hf.config_utils`), so `fms-parity list` names the class FMS claims to load. The
tiny configs are written here (FMS has none): 2 layers, hidden 64, non-default constants (RoPE theta, norm eps,
multipliers) so that a setting FMS ignores moves the numbers instead of coinciding with a default.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

SEED = 0
# weight regime: N(0, (gain / sqrt(fan_in))^2) per matrix, norms 1 + N(0, 0.3^2), biases N(0, 0.2^2). At std 0.02
# every attention row is near-uniform and greedy tokens repeat; with gain 2.5 attention is peaked and tokens vary.
WEIGHT_GAIN = 2.5
NORM_SPREAD = 0.3
BIAS_SPREAD = 0.2

_DEC = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ROPE = {"rope_type": "default", "rope_theta": 5000.0}
_GRANITE = dict(_DEC, logits_scaling=4.0, embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5)
_ENC = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=40, layer_norm_eps=1e-6, pad_token_id=1, type_vocab_size=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
              mamba_expand=2, mamba_chunk_size=8, mamba_conv_bias=True, mamba_proj_bias=False)


@dataclass(frozen=True)
class Arch:
    """One FMS architecture and how its HF side is built. `kind`: decoder | encoder | vision | multimodal."""

    name: str
    hf_class: str  # transformers class that builds and saves the checkpoint
    config_class: str  # transformers config class
    config: Dict = field(default_factory=dict)
    kind: str = "decoder"
    family: str = "dense"  # dense | moe | hybrid | encoder | vision | multimodal
    sub_configs: Dict[str, Tuple[str, Dict]] = field(default_factory=dict)  # name -> (config class, kwargs)
    refused: Optional[str] = None  # why this architecture is not compared (recorded, never skipped silently)


ARCHITECTURES: Tuple[Arch, ...] = (
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", dict(_DEC, rope_parameters=_ROPE)),
    Arch("granite", "GraniteForCausalLM", "GraniteConfig", dict(_GRANITE, rope_parameters=_ROPE)),
    Arch("granite_swa", "GraniteSWAForCausalLM", "GraniteSWAConfig",
         dict(_GRANITE, rope_parameters=_ROPE, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    Arch("granite_moe_hybrid", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
         dict(_GRANITE, rope_parameters=_ROPE, num_local_experts=0, shared_intermediate_size=96, vocab_size=100352,
              layer_types=["attention", "attention"], position_embedding_type="rope"),
         family="hybrid"),
    Arch("mixtral", "MixtralForCausalLM", "MixtralConfig",
         dict(_DEC, rope_parameters=_ROPE, num_attention_heads=8, num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
         family="moe"),
    Arch("mistral", "MistralForCausalLM", "MistralConfig",
         dict(_DEC, rope_parameters=_ROPE, sliding_window=None, intermediate_size=256)),
    Arch("mistral3", "Mistral3ForConditionalGeneration", "Mistral3Config", dict(tie_word_embeddings=False),
         kind="multimodal",
         family="multimodal",
         sub_configs={"text_config": ("MistralConfig", dict(_DEC, rope_parameters=_ROPE, sliding_window=None,
                                                                intermediate_size=256)),
                      "vision_config": ("PixtralVisionConfig",
                                        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))}),
    Arch("ministral3", "Mistral3ForConditionalGeneration", "Mistral3Config", dict(tie_word_embeddings=False),
         kind="multimodal",
         family="multimodal",
         sub_configs={"text_config": ("Ministral3Config", dict(_DEC, sliding_window=None, intermediate_size=256, rope_parameters={
             "rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0, "original_max_position_embeddings": 32,
             "beta_fast": 32.0, "beta_slow": 1.0, "llama_4_scaling_beta": 0.1, "mscale": 1.0,
             "mscale_all_dim": 1.0})),
                      "vision_config": ("PixtralVisionConfig",
                                        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))}),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", dict(_DEC, rope_parameters=_ROPE, head_dim=16, intermediate_size=256)),
    Arch("gpt_bigcode", "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
         dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64, multi_query=True,
              layer_norm_epsilon=1e-4, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
              activation_function="gelu_pytorch_tanh")),
    Arch("gpt_oss", "GptOssForCausalLM", "GptOssConfig",
         dict(_DEC, head_dim=64, intermediate_size=64, max_position_embeddings=131072, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
         family="moe"),
    Arch("bamba", "BambaForCausalLM", "BambaConfig",
         dict(_DEC, **_MAMBA, num_hidden_layers=10, attn_layer_indices=[9], intermediate_size=256,
              rope_parameters=_ROPE), family="hybrid"),
    Arch("roberta", "RobertaForMaskedLM", "RobertaConfig", dict(_ENC), kind="encoder", family="encoder"),
    Arch("roberta_classification", "RobertaForSequenceClassification", "RobertaConfig", dict(_ENC, num_labels=3),
         kind="encoder", family="encoder"),
    Arch("roberta_question_answering", "RobertaForQuestionAnswering", "RobertaConfig", dict(_ENC), kind="encoder",
         family="encoder"),
    Arch("bert", "BertForMaskedLM", "BertConfig", dict(_ENC, pad_token_id=0), kind="encoder", family="encoder"),
    Arch("bert_classification", "BertForSequenceClassification", "BertConfig", dict(_ENC, pad_token_id=0, num_labels=3),
         kind="encoder", family="encoder"),
    Arch("mpnet", "MPNetForMaskedLM", "MPNetConfig",
         dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              max_position_embeddings=40, layer_norm_eps=1e-6, pad_token_id=1, bos_token_id=0, eos_token_id=2,
              relative_attention_num_buckets=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
         kind="encoder", family="encoder"),
    Arch("siglip_vision", "SiglipModel", "SiglipConfig", {}, kind="vision", family="vision",
         sub_configs={"vision_config": ("SiglipVisionConfig",
                                        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-5)),
                      "text_config": ("SiglipTextConfig",
                                      dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16))}),
    Arch("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextConfig",
         dict(image_token_index=127, image_grid_pinpoints=[[32, 32], [32, 64]], vision_feature_layer=-1,
              vision_feature_select_strategy="full"),
         kind="multimodal", family="multimodal",
         sub_configs={"text_config": ("GraniteConfig", dict(_GRANITE, rope_parameters=_ROPE)),
                      "vision_config": ("SiglipVisionConfig",
                                        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8))}),
)

BY_NAME: Dict[str, Arch] = {arch.name: arch for arch in ARCHITECTURES}


def hf_config(arch: Arch, overrides: Optional[Dict] = None):
    """The transformers config of `arch` (its tiny default, or `overrides` read from a user's config file)."""
    import transformers

    if overrides is not None:
        return transformers.AutoConfig.for_model(**overrides) if "model_type" in overrides else \
            getattr(transformers, arch.config_class)(**overrides)
    kwargs = dict(arch.config)
    for key, (cls, sub) in arch.sub_configs.items():
        kwargs[key] = getattr(transformers, cls)(**sub)
    config = getattr(transformers, arch.config_class)(**kwargs)
    config.architectures = [arch.hf_class]
    return config


def seed_weights(model: torch.nn.Module, seed: int = SEED) -> None:
    """The bug-revealing regime (see WEIGHT_GAIN): every floating parameter redrawn from `seed`, in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.is_floating_point():
                continue
            draw = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or \
                    (param.dim() == 1 and leaf == "weight"):
                value = 1.0 + NORM_SPREAD * draw
            elif param.dim() == 1:
                value = BIAS_SPREAD * draw
            else:
                value = draw * (WEIGHT_GAIN / param.shape[-1] ** 0.5)  # Linear / Embedding: [out, in]
            param.copy_(value.to(param.dtype))


def compared(arch: Arch) -> str:
    """What `fms-parity compare` judges for this architecture (the sections of its report)."""
    inputs = {"decoder": "1 sequence + left-padded batch", "encoder": "1 sequence + right-padded batch",
              "vision": "1 image", "multimodal": "1 text-only sequence"}[arch.kind]
    parts = [inputs, "propagated + teacher-forced", "fp64 floors + formula", "bf16 + upcast audit"]
    if arch.kind in ("decoder", "multimodal"):
        parts.append("greedy generation" + (" (text prompt)" if arch.kind == "multimodal" else ""))
    return "; ".join(parts)
