"""The config-coverage audit: every field of an HF Granite Speech config and of its PEFT `adapter_config.json` is
accounted for before any weight is read, like the weight-coverage audit (`coverage`) accounts for every tensor.

Each field has one rule:

- `mapped`      carried into the FMS config (the FMS field is named); values the port cannot compute are refused;
- `irrelevant`  cannot change inference numerics (the one-line reason says why);
- `refused`     not implemented by the port: only the neutral value(s) load, anything else raises.

A refusal is an `UnsupportedConfigError` naming the field path (`projector_config.hidden_act`), the value and what
is supported. A field no rule knows (a newer transformers or peft) is reported with an `UnauditedConfigWarning`,
never skipped silently. Rules cover the fields of both supported transformers lines (4.57.x and 5.x): a field that
exists on only one line simply never shows up on the other.

`audit_hf_config` runs from the HF -> FMS config mapping (`granite_speech.config.from_hf_config`, which the HF
registry's `build_granite_speech_params` calls), `audit_adapter_config` from `read_lora_config`.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

MAPPED, IRRELEVANT, REFUSED = "mapped", "irrelevant", "refused"
KINDS = (MAPPED, IRRELEVANT, REFUSED)

SUB_CONFIGS = ("encoder_config", "projector_config", "text_config")
ADAPTER_SECTION = "adapter_config"

# Activations whose FMS implementation (fms.utils.activation.str_to_activation) is the function HF's ACT2FN runs
# for the same name. Others (gelu_new, quick_gelu, relu6, ...) are refused rather than approximated.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "mish", "relu", "sigmoid", "silu", "swish", "tanh")
# HF rope types the FMS RoPE tables compute exactly (`granite_speech.model.GraniteSpeechRotaryEmbedding`), each with
# the parameters its inverse frequencies read besides rope_theta. dynamic (recomputed per batch length),
# yarn/longrope (attention scaling, per-dimension factors) and the rest are refused.
ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_PARAMETERS)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")


class UnsupportedConfigError(ValueError):
    """A config field is set to a value the FMS port does not implement."""

    def __init__(self, path: str, value: Any, supported: str, reason: str = "", where: str = "",
                 detail: Optional[str] = None):
        self.path, self.value, self.supported = path, value, supported
        message = detail or (
            f"{path}={value!r} is not supported by the FMS Granite Speech port"
            + (f" ({reason})" if reason else "")
            + f"; supported: {supported}"
        )
        super().__init__(f"{where}: {message}" if where else message)


class UnauditedConfigWarning(UserWarning):
    """A config holds fields the audit has no rule for (a newer transformers or peft): check what they do."""


# ---------------------------------------------------------------------------------------------- rules
_ANY = object()


@dataclass(frozen=True)
class Rule:
    kind: str
    note: str  # mapped: the FMS field(s); irrelevant / refused: why
    accepts: Optional[Callable[[Any], bool]] = None  # None: every value
    supported: str = ""  # how errors name the accepted values
    check: Optional[Callable[[str, Any], List[Tuple[str, Any]]]] = None  # custom validation -> unknown sub-fields
    example: Any = _ANY  # a value that must change the FMS config (mapped) or be refused (refused); for tests
    reason: str = ""  # why other values are refused (defaults to `note` for refused fields)

    def validate(self, path: str, value: Any) -> List[Tuple[str, Any]]:
        if self.check is not None:
            return self.check(path, value)
        if self.accepts is not None and not self.accepts(value):
            raise UnsupportedConfigError(path, value, self.supported, self.reason or self.note)
        return []


def mapped(note: str, accepts=None, supported: str = "", check=None, example=_ANY, reason: str = "") -> Rule:
    if accepts is not None and not reason:
        raise ValueError(f"mapped rule {note!r}: say why the values it does not accept are refused")
    return Rule(MAPPED, note, accepts, supported, check, example, reason)


def irrelevant(reason: str) -> Rule:
    return Rule(IRRELEVANT, reason)


def refused(reason: str, accepts: Callable[[Any], bool], supported: str, example: Any) -> Rule:
    return Rule(REFUSED, reason, accepts, supported, None, example)


def _is(*values) -> Callable[[Any], bool]:
    """Exactly one of `values` (True is not 1)."""
    return lambda v: any(type(v) is type(x) and v == x for x in values)


def _empty(value: Any) -> bool:
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _whole_positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def size(note: str, example: Any) -> Rule:
    """A mapped layer count or dimension: a whole number >= 1 (0 or -1 layers would build a model the checkpoint's
    tensors cannot fill, and fail only after every weight was read)."""
    return mapped(note, _whole_positive, "a whole number >= 1", example=example,
                  reason="a count or dimension of the model")


_NONE_OR_EMPTY = "unset (null or empty)"
_GENERATION = irrelevant("generation default read by HF generate(); FMS generation takes its own arguments")
_OUTPUT = irrelevant("selects which outputs HF returns, not their values")
_INIT = irrelevant("weight initialisation only; weights come from the checkpoint")
_DROPOUT_OFF = irrelevant("dropout, inactive at inference (get_model returns the model in eval mode)")
_METADATA = irrelevant("file metadata")
_TOKEN_ID = irrelevant("tokenizer/generation metadata; the forward never reads it")

# PreTrainedConfig / PretrainedConfig fields every section inherits (5.x names and the extra 4.57 ones). A section's
# own rule wins over these.
COMMON_RULES: Dict[str, Rule] = {
    "transformers_version": _METADATA,
    "architectures": irrelevant("HF class name; get_model dispatches GraniteSpeechForConditionalGeneration here"),
    "_name_or_path": _METADATA,
    "name_or_path": _METADATA,
    "_commit_hash": _METADATA,
    "output_hidden_states": _OUTPUT,
    "output_attentions": _OUTPUT,
    "return_dict": _OUTPUT,
    "dtype": irrelevant("storage dtype; FMS computes in get_model's data_type (HF in from_pretrained's dtype)"),
    "torch_dtype": irrelevant("storage dtype (pre-5 name); FMS computes in get_model's data_type"),
    "use_bfloat16": irrelevant("TensorFlow/Flax option, unused by PyTorch models"),
    "tf_legacy_loss": irrelevant("TensorFlow loss option"),
    "torchscript": irrelevant("clones instead of shares tied weights: same values"),
    "chunk_size_feed_forward": irrelevant("feed-forward applied in sequence chunks: the same per-token math"),
    "is_encoder_decoder": irrelevant("seq2seq flag, not read by Granite Speech, Granite or the Q-Former"),
    "is_decoder": irrelevant("not read by Granite Speech, Granite or the Q-Former (the Q-Former uses "
                             "cross_attention_frequency)"),
    "add_cross_attention": irrelevant("not read: Q-Former cross-attention comes from cross_attention_frequency"),
    "cross_attention_hidden_size": irrelevant("encoder-decoder option, not read by these models"),
    "tie_encoder_decoder": irrelevant("encoder-decoder option, not read by these models"),
    "tie_word_embeddings": irrelevant("read only from the top level and text_config"),
    "pruned_heads": refused("pruned attention heads are not implemented", _empty, "{} (no pruned heads)",
                            {"0": [0]}),
    "id2label": irrelevant("classification-head labels; no classification head here"),
    "label2id": irrelevant("classification-head labels; no classification head here"),
    "num_labels": irrelevant("classification-head size; no classification head here"),
    "problem_type": irrelevant("classification loss choice; no classification head here"),
    "finetuning_task": _METADATA,
    "tokenizer_class": _METADATA,
    "prefix": _METADATA,
    "task_specific_params": _GENERATION,
    "bos_token_id": _TOKEN_ID,
    "eos_token_id": _TOKEN_ID,
    "pad_token_id": _TOKEN_ID,
    "sep_token_id": _TOKEN_ID,
    "decoder_start_token_id": _TOKEN_ID,
    "initializer_range": _INIT,
    "_attn_implementation": irrelevant("HF attention kernel choice (same math); FMS uses its own SDPA"),
    "attn_implementation": irrelevant("HF attention kernel choice (same math); FMS uses its own SDPA"),
    "_attn_implementation_autoset": irrelevant("HF attention kernel bookkeeping"),
    "_experts_implementation": irrelevant("mixture-of-experts kernel choice; no experts here"),
    "experts_implementation": irrelevant("mixture-of-experts kernel choice; no experts here"),
    "per_layer_config": refused("per-layer (heterogeneous) configs are not implemented", _empty, _NONE_OR_EMPTY,
                                {"0": {}}),
    **{
        name: _GENERATION
        for name in (
            "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
            "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
            "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
            "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
            "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
            "begin_suppress_tokens",
        )
    },
}


def _model_type(expected: str) -> Rule:
    return refused(f"the port implements {expected} here", _is(expected), repr(expected), "other")


def _activation(fms_field: str) -> Rule:
    return mapped(fms_field, lambda v: v in SUPPORTED_ACTIVATIONS, ", ".join(SUPPORTED_ACTIVATIONS),
                  example="relu", reason="FMS has no activation of that name computing what HF's does")


TOP_RULES: Dict[str, Rule] = {
    "model_type": _model_type("granite_speech"),
    "text_config": mapped("text_config (audited field by field)"),
    "encoder_config": mapped("encoder_config (audited field by field)"),
    "projector_config": mapped("projector_config (audited field by field)"),
    "audio_token_index": mapped("audio_token_index", example=7),
    "audio_token_id": mapped("audio_token_index (alias)", example=7),
    "has_lora_adapter": irrelevant("HF only warns when peft is missing; the adapter is adapter_config.json's"),
    "downsample_rate": size("projector_config.downsample_rate", example=3),
    "window_size": size("projector_config.window_size", example=30),
    # 5.10+ ties on this flag, 4.57 on text_config's; a checkpoint's lm_head decides which one wrote it
    "tie_word_embeddings": mapped("text_config.tie_heads (with text_config.tie_word_embeddings and whether the "
                                  "checkpoint holds an lm_head)"),
    "pad_token_id": _TOKEN_ID,
}

ENCODER_RULES: Dict[str, Rule] = {
    "model_type": _model_type("granite_speech_encoder"),
    "input_dim": size("encoder_config.input_dim", example=80),
    "num_layers": size("encoder_config.nlayers", example=3),
    "hidden_dim": size("encoder_config.emb_dim", example=512),
    "feedforward_mult": mapped("encoder_config.hidden_grow_factor", example=2),
    "num_heads": size("encoder_config.nheads", example=2),
    "dim_head": size("encoder_config.head_dim", example=64),
    "output_dim": size("encoder_config.output_dim", example=348),
    "context_size": size("encoder_config.context_size", example=20),
    "max_pos_emb": size("encoder_config.max_pos_emb", example=256),
    "dropout": mapped("encoder_config.p_dropout (inactive at inference)", example=0.2),
    "conv_kernel_size": size("encoder_config.conv_kernel_size", example=8),
    "conv_expansion_factor": size("encoder_config.conv_expansion_factor", example=1),
}

PROJECTOR_RULES: Dict[str, Rule] = {
    "model_type": _model_type("blip_2_qformer"),
    "hidden_size": size("projector_config.emb_dim", example=512),
    "num_hidden_layers": size("projector_config.nlayers", example=3),
    "num_attention_heads": size("projector_config.nheads", example=8),
    "intermediate_size": size("projector_config.hidden_dim", example=1024),
    "hidden_act": _activation("projector_config.activation_fn"),
    "hidden_dropout_prob": mapped("projector_config.p_dropout (inactive at inference)", example=0.2),
    "attention_probs_dropout_prob": _DROPOUT_OFF,
    "layer_norm_eps": mapped("projector_config.layer_norm_eps", example=1e-6),
    "cross_attention_frequency": size("projector_config.cross_attention_frequency", example=2),
    "encoder_hidden_size": size("projector_config.encoder_dim", example=512),
    "max_position_embeddings": irrelevant("the Q-Former's position embeddings exist only with text input "
                                          "(use_qformer_text_input, refused)"),
    "vocab_size": irrelevant("the Q-Former's word embeddings exist only with text input (use_qformer_text_input, "
                             "refused)"),
    "pad_token_id": irrelevant("the Q-Former takes no tokens (use_qformer_text_input, refused)"),
    "use_qformer_text_input": refused("the Q-Former runs on its learned queries only; a text branch is not "
                                      "implemented", _is(False), "False", True),
    # 4.57 only (5.x dropped the field and ignores the key): relative_key(_query) adds distance embeddings
    "position_embedding_type": refused("relative position embeddings in the Q-Former are not implemented",
                                       lambda v: v in (None, "absolute"), "'absolute'", "relative_key"),
}


def _check_rope(path: str, value: Any) -> List[Tuple[str, Any]]:
    """text_config.rope_parameters (5.x) / rope_scaling (4.57): a supported type and nothing it would ignore."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise UnsupportedConfigError(path, value, "a mapping with rope_type in " + ", ".join(SUPPORTED_ROPE_TYPES))
    nested = [key for key, sub in value.items() if isinstance(sub, Mapping)]
    if nested:
        raise UnsupportedConfigError(f"{path}.{nested[0]}", value[nested[0]], "one flat set of RoPE parameters",
                                     "per-layer-type RoPE parameters are not implemented")
    rope_type = value.get("rope_type", value.get("type", "default"))
    if "rope_type" in value and "type" in value and value["type"] != value["rope_type"]:
        raise UnsupportedConfigError(f"{path}.type", value["type"], f"the same as rope_type ({value['rope_type']!r})")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{path}.rope_type", rope_type, ", ".join(SUPPORTED_ROPE_TYPES),
            "FMS RoPE tables compute these exactly; dynamic, yarn, longrope and others are not implemented",
        )
    partial = value.get("partial_rotary_factor", 1.0)
    if partial is not None and partial != 1.0:
        raise UnsupportedConfigError(f"{path}.partial_rotary_factor", partial, "1.0", "partial RoPE is not implemented")
    unknown = []
    for key, sub in value.items():
        if key in ("rope_type", "type", "rope_theta", "partial_rotary_factor") or key in ROPE_PARAMETERS[rope_type]:
            continue
        unknown.append((f"{path}.{key}", sub))
    for key in ROPE_PARAMETERS[rope_type]:
        if key not in value:
            raise UnsupportedConfigError(f"{path}.{key}", None, f"a value (rope_type {rope_type!r} needs it)")
    factor = value.get("factor")
    if rope_type != "default" and not (_positive(factor) and math.isfinite(factor)):
        raise UnsupportedConfigError(f"{path}.factor", factor, "a positive number")
    return unknown


def _check_partial_rotary(path: str, value: Any) -> List[Tuple[str, Any]]:
    if value is not None and value != 1.0:
        raise UnsupportedConfigError(path, value, "1.0", "partial RoPE is not implemented")
    return []


TEXT_RULES: Dict[str, Rule] = {
    "model_type": _model_type("granite"),
    "vocab_size": size("text_config.src_vocab_size", example=1000),
    "hidden_size": size("text_config.emb_dim", example=512),
    "intermediate_size": size("text_config.hidden_grow_factor (= intermediate_size / hidden_size, multiple_of 1)",
                                example=777),
    "num_hidden_layers": size("text_config.nlayers", example=3),
    "num_attention_heads": size("text_config.nheads", example=8),
    "num_key_value_heads": size("text_config.kvheads (must divide num_attention_heads)", example=1),
    "head_dim": mapped("text_config.head_dim (HF reads it when present, else hidden_size // heads)", example=32),
    "hidden_act": _activation("text_config.activation_fn"),
    "max_position_embeddings": size("text_config.max_expected_seq_len: the initial RoPE table; longer sequences "
                                      "grow it, as HF computes RoPE for any position", example=77),
    "rms_norm_eps": mapped("text_config.norm_eps", example=1e-3),
    "pad_token_id": mapped("text_config.pad_id (nn.Embedding padding_idx: gradients only)", example=3),
    "tie_word_embeddings": mapped("text_config.tie_heads (with the top-level flag and the checkpoint's lm_head)"),
    "rope_parameters": mapped("text_config.rope_theta + text_config.rope_scaling", check=_check_rope,
                              example={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "rope_theta": mapped("text_config.rope_theta (4.57 name)", example=123.0),
    "rope_scaling": mapped("text_config.rope_scaling (4.57 name)", check=_check_rope,
                           example={"rope_type": "linear", "factor": 4.0}),
    "partial_rotary_factor": Rule(REFUSED, "partial RoPE is not implemented", None, "1.0", _check_partial_rotary,
                                  0.5),
    "attention_bias": mapped("text_config.attn_bias", example=True),
    "mlp_bias": mapped("text_config.mlp_bias", example=True),
    "attention_dropout": _DROPOUT_OFF,
    "embedding_multiplier": mapped("text_config.embedding_multiplier", example=3.0),
    "logits_scaling": mapped("text_config.logits_scaling", example=3.0),
    "residual_multiplier": mapped("text_config.residual_multiplier", example=0.5),
    "attention_multiplier": mapped("text_config.attention_multiplier", example=0.5),
    "use_cache": irrelevant("HF's default for returning a KV cache; the FMS caller passes use_cache"),
}


def _check_targets(path: str, value: Any) -> List[Tuple[str, Any]]:
    supported = "a list drawn from " + ", ".join(LORA_TARGETS)
    if isinstance(value, str):
        raise UnsupportedConfigError(
            path, value, supported,
            detail=f"a regex target_modules ({value!r}) is not supported; list the modules ({supported})",
        )
    if _empty(value) or not set(value) <= set(LORA_TARGETS):
        raise UnsupportedConfigError(path, value, supported,
                                     "the modality LoRA is implemented on the attention q/k/v projections")
    return []


def _check_peft_type(path: str, value: Any) -> List[Tuple[str, Any]]:
    if value != "LORA":
        raise UnsupportedConfigError(path, value, "'LORA'",
                                     detail=f"only LoRA adapters are supported, got peft_type {value!r} "
                                            "(supported: 'LORA')")
    return []


_VARIANT = "LoRA variants other than plain (rs)LoRA are not implemented"

ADAPTER_RULES: Dict[str, Rule] = {
    "peft_type": Rule(REFUSED, "only LoRA adapters are implemented", None, "'LORA'", _check_peft_type, "IA3"),
    "task_type": irrelevant("PEFT wrapper class used in training"),
    "auto_mapping": _METADATA,
    "peft_version": _METADATA,
    "base_model_name_or_path": irrelevant("the base model is the checkpoint folder itself"),
    "revision": _METADATA,
    "inference_mode": irrelevant("freezes the adapter for training; values are the same"),
    "r": mapped("lora_rank", lambda v: _positive(v) and int(v) == v, "a positive integer", example=2,
                reason="a LoRA rank"),
    "lora_alpha": mapped("lora_alpha", _positive, "a positive number", example=3, reason="a LoRA scale"),
    "use_rslora": mapped("lora_use_rslora (scaling alpha / sqrt(r) instead of alpha / r)",
                         _is(True, False), "True, False", example=True, reason="a flag"),
    "target_modules": mapped("lora_target_modules", check=_check_targets, example=["q_proj"]),
    "exclude_modules": refused("excluding modules from the targets is not implemented", _empty, _NONE_OR_EMPTY,
                               ["q_proj"]),
    "lora_dropout": _DROPOUT_OFF,
    "fan_in_fan_out": refused("transposed (Conv1D-style) base weights are not implemented", _is(False), "False",
                              True),
    "bias": refused("trained biases in the adapter are not implemented", _is("none"), "'none'", "all"),
    "modules_to_save": refused("fully trained module copies in the adapter are not implemented", _empty,
                               _NONE_OR_EMPTY, ["lm_head"]),
    "init_lora_weights": refused(
        "pissa/olora/corda/loftq/eva/orthogonal/lora_ga initialisations rewrite the base weights when the adapter "
        "loads; that is not implemented",
        lambda v: v is True or v is False or v == "gaussian", "True, False, 'gaussian'", "pissa",
    ),
    "layers_to_transform": refused("adapting a subset of layers is not implemented", _empty, _NONE_OR_EMPTY, [0]),
    "layers_pattern": refused("adapting a subset of layers is not implemented", _empty, _NONE_OR_EMPTY, "layers"),
    "rank_pattern": refused("per-module ranks are not implemented", _empty, "{}", {"q_proj": 2}),
    "alpha_pattern": refused("per-module alphas are not implemented", _empty, "{}", {"q_proj": 2}),
    "megatron_config": refused("Megatron-parallel LoRA layers are not implemented", _empty, _NONE_OR_EMPTY,
                               {"tensor_model_parallel_size": 2}),
    "megatron_core": irrelevant("module name, read only with megatron_config (refused)"),
    "trainable_token_indices": refused("trained token embeddings in the adapter are not implemented", _empty,
                                       _NONE_OR_EMPTY, [0]),
    "loftq_config": irrelevant("read only by init_lora_weights='loftq' (refused)"),
    "eva_config": irrelevant("read only by init_lora_weights='eva' (refused)"),
    "corda_config": irrelevant("read only by init_lora_weights='corda' (refused)"),
    "lora_ga_config": irrelevant("read only by init_lora_weights='lora_ga' (refused)"),
    "use_dora": refused(_VARIANT + " (DoRA)", _is(False), "False", True),
    "velora_config": refused(_VARIANT + " (VeLoRA)", _empty, _NONE_OR_EMPTY, {"rank": 2}),
    "alora_invocation_tokens": refused(_VARIANT + " (activated LoRA)", _empty, _NONE_OR_EMPTY, [1]),
    "use_qalora": refused(_VARIANT + " (QA-LoRA)", _is(False), "False", True),
    "qalora_group_size": irrelevant("read only with use_qalora (refused)"),
    "monteclora_config": refused(_VARIANT + " (MonteCLoRA)", _empty, _NONE_OR_EMPTY, {"n": 2}),
    "layer_replication": refused("layer replication is not implemented", _empty, _NONE_OR_EMPTY, [[0, 1]]),
    "runtime_config": irrelevant("runtime placement (ephemeral GPU offload), not values"),
    "lora_bias": refused(_VARIANT + " (a bias on lora_B)", _is(False), "False", True),
    "target_parameters": refused("adapting parameters (instead of modules) is not implemented", _empty,
                                 _NONE_OR_EMPTY, ["weight"]),
    "use_bdlora": refused(_VARIANT + " (BD-LoRA)", _empty, _NONE_OR_EMPTY, {"nblocks": 2}),
    "arrow_config": refused(_VARIANT + " (Arrow routing)", _empty, _NONE_OR_EMPTY, {"top_k": 2}),
    "kasa_config": refused(_VARIANT + " (KaSA)", _empty, _NONE_OR_EMPTY, {"r": 2}),
    "ensure_weight_tying": irrelevant("ties adapters on tied embeddings/modules_to_save only (refused here)"),
}

HF_SECTIONS: Dict[str, Dict[str, Rule]] = {
    "": TOP_RULES,
    "encoder_config": ENCODER_RULES,
    "projector_config": PROJECTOR_RULES,
    "text_config": TEXT_RULES,
}


def rules_for(section: str) -> Dict[str, Rule]:
    """Every rule that applies to `section` ("" = top level, a sub-config name, or ADAPTER_SECTION)."""
    if section == ADAPTER_SECTION:
        return dict(ADAPTER_RULES)
    return {**COMMON_RULES, **HF_SECTIONS[section]}


def rule_counts(section: str, fields: Optional[List[str]] = None) -> Dict[str, int]:
    """mapped / irrelevant / refused counts of `fields` (default: every rule of the section)."""
    rules = rules_for(section)
    names = rules if fields is None else [f for f in fields if f in rules]
    counts = {kind: 0 for kind in KINDS}
    for name in names:
        counts[rules[name].kind] += 1
    return counts


# ---------------------------------------------------------------------------------------------- audits
@dataclass
class AuditReport:
    fields: Dict[str, str] = field(default_factory=dict)  # path -> kind
    unknown: List[Tuple[str, Any]] = field(default_factory=list)  # (path, value) no rule knows

    def counts(self) -> Dict[str, int]:
        return {kind: sum(1 for k in self.fields.values() if k == kind) for kind in KINDS}


def _audit_section(report: AuditReport, prefix: str, values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        rule = rules.get(key)
        if rule is None:
            report.unknown.append((path, value))
            continue
        report.fields[path] = rule.kind
        if not (prefix == "" and key in SUB_CONFIGS):
            report.unknown.extend(rule.validate(path, value))


def _warn_unknown(report: AuditReport, what: str) -> None:
    if report.unknown:
        listed = "; ".join(f"{path}={value!r}" for path, value in report.unknown)
        warnings.warn(
            UnauditedConfigWarning(
                f"{what}: {len(report.unknown)} field(s) the Granite Speech config audit has no rule for (a newer "
                f"transformers or peft?); the FMS model does not implement them, check they do not change the "
                f"numbers: {listed}"
            ),
            stacklevel=3,
        )


def hf_config_sections(hf_config: Any) -> Dict[str, Mapping[str, Any]]:
    """The top level and each sub-config of an HF GraniteSpeechConfig (object or config.json dict) as dicts."""
    data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    sections: Dict[str, Mapping[str, Any]] = {"": data}
    for name in SUB_CONFIGS:
        sub = data.get(name)
        if sub is not None:
            sections[name] = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
    return sections


def audit_hf_config(hf_config: Any, warn: bool = True) -> AuditReport:
    """Check every field of an HF GraniteSpeechConfig; raise UnsupportedConfigError on the first unsupported value,
    report fields no rule knows with an UnauditedConfigWarning."""
    report = AuditReport()
    for section, values in hf_config_sections(hf_config).items():
        _audit_section(report, section, values, rules_for(section))
    if warn:
        _warn_unknown(report, "config.json")
    return report


def audit_adapter_config(adapter_config: Mapping[str, Any], where: str = "adapter_config.json",
                         warn: bool = True) -> AuditReport:
    """The same for a PEFT adapter_config.json (as a dict); errors are prefixed with `where` (the file path)."""
    report = AuditReport()
    try:
        # the type first: the other rules describe LoRA fields
        ADAPTER_RULES["peft_type"].validate(f"{ADAPTER_SECTION}.peft_type", adapter_config.get("peft_type"))
        _audit_section(report, ADAPTER_SECTION, adapter_config, ADAPTER_RULES)
    except UnsupportedConfigError as err:
        raise UnsupportedConfigError(err.path, err.value, err.supported, where=where, detail=str(err)) from None
    if warn:
        _warn_unknown(report, where)
    return report
