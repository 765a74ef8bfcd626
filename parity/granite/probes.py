"""The Granite Speech probe table: which HF module is compared with which FMS module, sized from the config.

HF paths are written in the hub layout (transformers 4.57 in memory) and resolved on 5.x models through
`HF_LAYOUT_ALIASES`, derived from the one layout map in `granite_speech.checkpoint.layout`.
"""

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from granite_speech.checkpoint.layout import HUB_TO_TF5
from parity.granite.hf import hf_divides_logits
from parity.probes import Probe, Repeat, TableEntry, expand

# hub-layout module path prefix -> 5.10.1+ in-memory prefix
HF_LAYOUT_ALIASES: Tuple[Tuple[str, str], ...] = HUB_TO_TF5
# the validity mask of every decoder probe: real (non-pad) text positions [batch, seq_len], from the attention mask
TEXT = "text"
AUDIO_PROBE_PREFIXES = ("encoder.", "projector.")


def text_mask(inputs: Mapping[str, Any]):
    """The `text` validity mask of a batch: its attention mask, or every position when it has none."""
    import torch

    if "attention_mask" in inputs and inputs["attention_mask"] is not None:
        return inputs["attention_mask"].bool().cpu()
    return torch.ones(inputs["input_ids"].shape[:2], dtype=torch.bool)

@dataclass(frozen=True)
class GraniteSpeechDims:
    encoder_layers: int
    qformer_layers: int
    decoder_layers: int
    logits_scaling: float = 1.0
    # only needed for the detailed decoder attention probes
    decoder_heads: int = 0
    decoder_kv_heads: int = 0
    decoder_head_dim: int = 0

    def as_mapping(self) -> dict:
        return {
            "encoder_layers": self.encoder_layers,
            "encoder_mid": self.encoder_layers // 2,  # HF runs the mid CTC after block L // 2 (1-based)
            "qformer_layers": self.qformer_layers,
            "decoder_layers": self.decoder_layers,
        }


def _get(cfg: Any, *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
        if value is not None:
            return value
    return None


def _need(cfg: Any, where: str, *keys: str) -> Any:
    value = _get(cfg, *keys)
    if value is None:
        raise ValueError(f"config has no {' / '.join(keys)} in {where}; cannot size the probe table")
    return value


def granite_speech_dims(config: Any) -> GraniteSpeechDims:
    """Dimensions from an HF GraniteSpeechConfig (object or config.json dict), an FMS GraniteSpeechConfig, or a
    GraniteSpeechDims / mapping of its fields."""
    if isinstance(config, GraniteSpeechDims):
        return config
    if isinstance(config, Mapping) and "encoder_layers" in config:
        return GraniteSpeechDims(**config)
    enc, proj, text = (_get(config, name) for name in ("encoder_config", "projector_config", "text_config"))
    if enc is None or proj is None or text is None:
        raise TypeError(
            f"expected a Granite Speech config with encoder_config/projector_config/text_config, got {type(config).__name__}"
        )
    heads = _get(text, "num_attention_heads", "nheads") or 0
    hidden = _get(text, "hidden_size", "emb_dim") or 0
    return GraniteSpeechDims(
        encoder_layers=int(_need(enc, "encoder_config", "num_layers", "nlayers")),
        qformer_layers=int(_need(proj, "projector_config", "num_hidden_layers", "nlayers")),
        decoder_layers=int(_need(text, "text_config", "num_hidden_layers", "nlayers")),
        logits_scaling=float(_get(text, "logits_scaling") or 1.0),
        decoder_heads=int(heads),
        decoder_kv_heads=int(_get(text, "num_key_value_heads", "kvheads") or heads),
        decoder_head_dim=int(_get(text, "head_dim") or (hidden // heads if heads else 0)),
    )


_NOT_TEACHER_INPUT = "an input probe: the captured value is what the module receives, there is nothing to re-run"

ENCODER_BLOCK_ROWS = (
    Probe("encoder.block.{i}.ff1", "encoder.layers.{i}.ff1", "encoder.layers.{i}.ff1", note="FF(h) before the 0.5 scale"),
    Probe("encoder.block.{i}.attn", "encoder.layers.{i}.attn", "encoder.layers.{i}.attn", note="before the residual"),
    Probe("encoder.block.{i}.conv", "encoder.layers.{i}.conv", "encoder.layers.{i}.conv", note="before the residual"),
    Probe("encoder.block.{i}.ff2", "encoder.layers.{i}.ff2", "encoder.layers.{i}.ff2", note="FF(h) before the 0.5 scale"),
    Probe("encoder.block.{i}.post_norm", "encoder.layers.{i}.post_norm", "encoder.layers.{i}.post_norm"),
    Probe(
        "encoder.block.{i}",
        "encoder.layers.{i}",
        "encoder.layers.{i}",
        note="block output (cloned in the hook: HF adds the mid-CTC term in place after the middle block)",
    ),
)

QFORMER_ROWS = (
    Probe(
        "projector.qformer.{l}",
        "projector.qformer.encoder.layer.{l}",
        "projector.layers.{l}",
        hf_take="output[0?]",
        fms_take="output[0?]",
        teacher=(("input[0]", "input[0]"), ("input.encoder_hidden_states", "input[1]")),
        note="query states [B*nb, Q, Hq] (layer 0 input is the broadcast [1, Q, Hq] queries in HF)",
    ),
)


def granite_decoder_rows(hf_prefix: str, fms_prefix: str, dims: GraniteSpeechDims, *,
                         detail: bool = False) -> Tuple[Probe, ...]:
    """Per-layer decoder rows (`{i}` placeholders) for an HF GraniteModel at `hf_prefix` and an FMS GraniteHeadless at
    `fms_prefix`. `detail` adds q/k/v, attention and MLP outputs; FMS q/k come out permuted for interleaved RoPE, so their
    adapters undo the permutation."""
    hf_layer, fms_layer = f"{hf_prefix}.layers.{{i}}", f"{fms_prefix}.layers.{{i}}"
    rows = []
    if detail:
        heads, kv, dh = dims.decoder_heads, dims.decoder_kv_heads, dims.decoder_head_dim
        if not (heads and kv and dh):
            raise ValueError(f"detailed decoder probes need decoder_heads/kv_heads/head_dim, got {dims}")
        for index, part in enumerate(("q", "k", "v")):
            # the in_proj output (q, k, v), fused or not, after any hook on it (the audio_only LoRA adds there)
            adapter = f"rope_interleaved_to_halves({dh})" if part != "v" else "identity"
            rows.append(Probe(f"decoder.layer.{{i}}.attn.{part}", f"{hf_layer}.self_attn.{part}_proj",
                              f"{fms_layer}.attn.in_proj", fms_take=f"output[{index}]", fms_adapter=adapter,
                              note=f"{part} projection before RoPE (LoRA included)", valid=TEXT))
        rows.append(Probe("decoder.layer.{i}.attn", f"{hf_layer}.self_attn", f"{fms_layer}.attn",
                          hf_take="output[0?]", fms_take="output[0?]", note="attention output before the residual",
                          valid=TEXT))
        rows.append(Probe("decoder.layer.{i}.mlp", f"{hf_layer}.mlp", f"{fms_layer}.ff_sub_layer",
                          note="MLP output before the residual", valid=TEXT))
    rows.append(Probe("decoder.layer.{i}", hf_layer, fms_layer, hf_take="output[0?]", fms_take="output[0?]",
                      valid=TEXT))
    return tuple(rows)


def granite_speech_table(dims: GraniteSpeechDims, transformers_version: str, *,
                         detail: bool = False) -> Tuple[TableEntry, ...]:
    scaling = dims.logits_scaling
    if hf_divides_logits(transformers_version):
        hf_logits_adapter = "identity"
        logits_note = f"transformers {transformers_version} and FMS both return lm_head(h) / logits_scaling ({scaling:g})"
    else:
        hf_logits_adapter = f"div_logits_scaling({scaling!r})"
        logits_note = (
            f"transformers {transformers_version} returns raw lm_head(h); divided by logits_scaling ({scaling:g}) "
            "to compare with FMS, which divides"
        )
    return (
        Probe("encoder.input_linear", "encoder.input_linear", "encoder.input_linear"),
        Repeat("i", 0, "encoder_mid", ENCODER_BLOCK_ROWS),
        # a one-block encoder has no middle block (L // 2 = 0 counts from 1): neither side self-conditions
        *((Probe("encoder.ctc_mid", "encoder.out_mid", "encoder.ctc_out_mid",
                 note="self-conditioning term out_mid(softmax(out(h))) added after the middle block"),)
          if dims.encoder_layers >= 2 else ()),
        Repeat("i", "encoder_mid", "encoder_layers", ENCODER_BLOCK_ROWS),
        Repeat("l", 0, "qformer_layers", QFORMER_ROWS),
        Probe("projector.out", "projector.linear", "projector.out_proj", note="projected audio embeddings [B, nb*Q, Dt]"),
        Probe("decoder.inputs_embeds", "language_model.model", "language_model.base_model",
              hf_take="input.inputs_embeds", fms_take="input[0]", teacher=(),
              note="merged text+audio embeddings before the embedding multiplier; " + _NOT_TEACHER_INPUT, valid=TEXT),
        Repeat("i", 0, "decoder_layers",
               granite_decoder_rows("language_model.model", "language_model.base_model", dims, detail=detail)),
        Probe("decoder.norm", "language_model.model.norm", "language_model.base_model.dec_norm", valid=TEXT),
        Probe("logits.head", "language_model.lm_head", "language_model.head", tolerance_class="logits",
              note="raw head output (no logits_scaling) on both sides", valid=TEXT),
        Probe("logits", "", "", hf_take="output.logits", fms_take="output[0?]", hf_adapter=hf_logits_adapter,
              tolerance_class="logits", teacher=(), valid=TEXT,
              note=logits_note + "; model output: nothing to teacher-force"),
    )


def granite_speech_probes(config_or_dims: Any, transformers_version: Optional[str] = None, *,
                          detail: bool = False) -> Tuple[Probe, ...]:
    """The Granite Speech probe list in execution order, sized from the config; `transformers_version` (default:
    the installed one) decides the model-level logits adapter."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    dims = granite_speech_dims(config_or_dims)
    table = granite_speech_table(dims, transformers_version, detail=detail)
    return expand(table, dims.as_mapping())
