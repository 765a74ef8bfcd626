"""Probe tables of the Granite Speech family beyond 3.3, and the dispatch of a config to its table.

| HF model_type        | table                          | what it adds to / changes from the 3.3 table                        |
|----------------------|--------------------------------|---------------------------------------------------------------------|
| granite_speech       | `parity.granite.probes` (3.3)  | (4.0-1b, 4.1-2b: the same classes, LoRA merged in the weights)      |
| granite_speech_plus  | `granite_speech_plus_probes`   | `encoder.out` (the `cat_hidden_layers` concatenation the projector  |
|                      |                                | reads) and one probe per concatenated part, before the Q-Former     |
| granite_speech5_ctc  | `granite_speech5_probes`       | a CTC-only table: Parakeet-style blocks at three frame rates, the   |
|                      |                                | self-conditioning term, encoder output, tied CTC head, logits       |

Rows whose math is the 3.3 one are the 3.3 rows (`parity.granite.probes`); the plus table IS the 3.3 table plus the
rows above. The 5.0 model masks its padding, so every 5.0 probe is judged on valid frames only: the validity masks,
one per frame rate (`frames.x1`, `frames.x2`, `frames.x4`, ... after each subsampling block) and one for the
stride-2 convolution of a subsampling block (`frames.xN.conv`, ceil(T/2) frames), come from `ctc5_frame_masks`.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from parity.granite.probes import (
    QFORMER_ROWS,
    _get,
    _need,
    granite_speech_dims,
    granite_speech_table,
)
from parity.probes import Probe, Repeat, TableEntry, expand

PLUS = "granite_speech_plus"
SPEECH = "granite_speech"
CTC5 = "granite_speech5_ctc"
MODEL_TYPES = (SPEECH, PLUS, CTC5)


def model_type_of(config: Any) -> str:
    """The HF model_type of a config object or config.json dict (the table dispatch key)."""
    model_type = _get(config, "model_type")
    if model_type is None:
        raise ValueError("config has no model_type; cannot pick a probe table")
    return str(model_type)


# ---------------------------------------------------------------------------------------------- granite_speech_plus
def cat_hidden_layers(config: Any) -> Tuple[int, ...]:
    """The exported layers in the order HF concatenates them (block order; 0 = the input_linear output)."""
    enc = _need(config, "config", "encoder_config")
    layers = _get(enc, "cat_hidden_layers") or ()
    return tuple(sorted(set(int(i) for i in layers)))


def plus_encoder_rows(cat: Sequence[int], hidden: int, encoder_layers: int) -> Tuple[Probe, ...]:
    """`encoder.out` and its parts: HF `encoder` (BaseModelOutputWithPooling) vs FMS `encoder` (a tensor)."""
    mid = encoder_layers // 2
    rows = [Probe("encoder.out", "encoder", "encoder", hf_take="output.last_hidden_state",
                  note=f"the projector's input: {len(cat)} exported state(s) and the final output concatenated on the "
                       f"feature axis, [B, T, {hidden} x {len(cat) + 1}]")]
    parts = [*(f"layer.{i}" for i in cat), "final"]
    for index, part in enumerate(parts):
        layer = int(part.split(".")[1]) if part.startswith("layer.") else None
        if layer == 0:
            what = "the input_linear output"
        elif layer == mid:
            what = (f"the output of block {layer} (1-based) WITH the mid-layer CTC term: HF adds it in place to the "
                    f"tensor it exported")
        elif layer is not None:
            what = f"the output of block {layer} (1-based)"
        else:
            what = "the final encoder output"
        span = f"feature_slice({index * hidden}, {(index + 1) * hidden})"
        rows.append(Probe(f"encoder.out.{part}", "encoder", "encoder", hf_take="output.last_hidden_state",
                          hf_adapter=span, fms_adapter=span, teacher=(),
                          note=f"part {index} of encoder.out: {what}; teacher-forced as encoder.out"))
    return tuple(rows)


def granite_speech_plus_table(config: Any, transformers_version: str, *, detail: bool = False
                              ) -> Tuple[TableEntry, ...]:
    """The 3.3 table with the plus rows inserted after the last encoder block, before the Q-Former."""
    dims = granite_speech_dims(config)
    cat = cat_hidden_layers(config)
    hidden = int(_need(_need(config, "config", "encoder_config"), "encoder_config", "hidden_dim", "emb_dim"))
    extra = plus_encoder_rows(cat, hidden, dims.encoder_layers)
    table: List[TableEntry] = []
    for entry in granite_speech_table(dims, transformers_version, detail=detail):
        if isinstance(entry, Repeat) and entry.rows is QFORMER_ROWS:
            table.extend(extra)
        table.append(entry)
    if len(table) != len(granite_speech_table(dims, transformers_version, detail=detail)) + len(extra):
        raise RuntimeError("internal error: the 3.3 table has no Q-Former rows to insert the plus rows before")
    return tuple(table)


def granite_speech_plus_probes(config: Any, transformers_version: Optional[str] = None, *,
                               detail: bool = False) -> Tuple[Probe, ...]:
    transformers_version = transformers_version or _installed_transformers()
    table = granite_speech_plus_table(config, transformers_version, detail=detail)
    return expand(table, granite_speech_dims(config).as_mapping())


# ---------------------------------------------------------------------------------------------- granite_speech5
@dataclass(frozen=True)
class Ctc5Dims:
    layers: int
    subsample_layers: Tuple[int, ...]

    @property
    def mid(self) -> int:
        """1-based index of the block followed by the self-conditioning term (0: none, as HF with one layer)."""
        return self.layers // 2

    def rate_in(self, block: int) -> int:
        """Frame-rate reduction (1, 2, 4, ...) at the input of `block` (0-based)."""
        return 2 ** sum(1 for s in self.subsample_layers if s < block)

    def rate_out(self, block: int) -> int:
        return self.rate_in(block) * (2 if block in self.subsample_layers else 1)


def ctc5_dims(config: Any) -> Ctc5Dims:
    enc = _need(config, "config", "encoder_config")
    layers = int(_need(enc, "encoder_config", "num_hidden_layers", "nlayers"))
    subsample = _get(enc, "subsample_layers")
    subsample = (0, 1) if subsample is None else tuple(sorted(set(int(i) for i in subsample)))
    return Ctc5Dims(layers, subsample)


def frames(rate: int) -> str:
    """Name of the validity mask of frames at 1/rate of the input frame rate."""
    return f"frames.x{rate}"


def conv_frames(rate: int) -> str:
    """Name of the validity mask of a subsampling block's stride-2 conv output (input at 1/rate)."""
    return f"frames.x{rate}.conv"


def granite_speech5_table(config: Any) -> Tuple[Probe, ...]:
    """Concrete rows (the validity mask changes with the frame rate, so blocks are written out, not repeated)."""
    dims = ctc5_dims(config)
    rows = [Probe("encoder.input_linear", "encoder.input_linear", "encoder.input_linear", valid=frames(1),
                  note="padded frames are zeroed after it, not inside it")]
    for i in range(dims.layers):
        r_in, r_out = dims.rate_in(i), dims.rate_out(i)
        sub = i in dims.subsample_layers
        layer_hf, layer_fms = f"encoder.layers.{i}", f"encoder.layers.{i}"
        kind = f"subsampling block (x{r_in} -> x{r_out})" if sub else f"block at x{r_in}"
        rows += [
            Probe(f"encoder.block.{i}.ff1", f"{layer_hf}.feed_forward1", f"{layer_fms}.ff1", valid=frames(r_in),
                  note=f"{kind}: FF(LN(h)) before the 0.5 scale"),
            Probe(f"encoder.block.{i}.attn", f"{layer_hf}.self_attn", f"{layer_fms}.attn", hf_take="output[0]",
                  valid=frames(r_in), note="block attention (padded keys masked) before the residual"),
            Probe(f"encoder.block.{i}.conv", f"{layer_hf}.conv", f"{layer_fms}.conv",
                  valid=conv_frames(r_in) if sub else frames(r_in),
                  note=("stride-2 depthwise conv: ceil(T/2) frames, trimmed to T//2 after it; " if sub else "")
                  + "GLU output of padded frames zeroed before the depthwise conv; before the residual"),
            Probe(f"encoder.block.{i}.ff2", f"{layer_hf}.feed_forward2", f"{layer_fms}.ff2", valid=frames(r_out),
                  note="FF(LN(h)) before the 0.5 scale"),
            Probe(f"encoder.block.{i}.post_norm", f"{layer_hf}.norm_out", f"{layer_fms}.post_norm",
                  valid=frames(r_out)),
            Probe(f"encoder.block.{i}", layer_hf, layer_fms, valid=frames(r_out),
                  note="block output" + (" (before the self-conditioning term)" if i + 1 == dims.mid else "")),
        ]
        if i + 1 == dims.mid:
            rows += [
                Probe("encoder.ctc_mid.logits", "encoder.out", "encoder.ctc_out", tolerance_class="logits",
                      valid=frames(r_out), note="mid-layer CTC logits out(h) (the weights the CTC head is tied to)"),
                Probe("encoder.ctc_mid", "encoder.out_mid", "encoder.ctc_out_mid", valid=frames(r_out),
                      note="self-conditioning term out_mid(softmax(out(h))) added after this block"),
            ]
    final = frames(dims.rate_out(dims.layers - 1))
    rows += [
        Probe("encoder", "encoder", "encoder", hf_take="output.last_hidden_state", fms_take="output[0]",
              valid=final, note="encoder output (HF ModelOutput.last_hidden_state; FMS returns (hidden, mask))"),
        Probe("ctc_head", "ctc_head", "head", tolerance_class="logits", valid=final,
              note="CTC head (tied to encoder.out unless tie_word_embeddings is false)"),
        Probe("logits", "", "", hf_take="output.logits", fms_take="output", tolerance_class="logits", teacher=(),
              valid=final, note="model output: nothing to teacher-force"),
    ]
    return tuple(rows)


def granite_speech5_probes(config: Any) -> Tuple[Probe, ...]:
    return expand(granite_speech5_table(config), {})


def _downsample(mask):
    half = mask.shape[1] // 2
    return mask[:, : 2 * half].reshape(mask.shape[0], half, 2).all(dim=2)


def ctc5_frame_masks(attention_mask, config: Any) -> Dict[str, Any]:
    """Every validity mask the 5.0 table names, from the input frame mask [B, T] (1 = real frame): `frames.xR` at
    each rate (AND of frame pairs after each subsampling block, as HF), `frames.xR.conv` (input frames 0, 2, 4, ...:
    the centre of each stride-2 conv output frame, ceil(T/2) of them)."""
    dims = ctc5_dims(config)
    mask = attention_mask.bool().cpu()
    masks = {frames(1): mask}
    for i in range(dims.layers):
        if i in dims.subsample_layers:
            rate = dims.rate_in(i)
            masks[conv_frames(rate)] = mask[:, ::2]
            mask = _downsample(mask)
            masks[frames(rate * 2)] = mask
    return masks


# ---------------------------------------------------------------------------------------------- dispatch
def probes_for(hf_config: Any, transformers_version: Optional[str] = None, *, detail: bool = False
               ) -> Tuple[Probe, ...]:
    """The probe list of any family member, chosen by the config's model_type."""
    from parity.granite.probes import granite_speech_probes

    model_type = model_type_of(hf_config)
    if model_type == SPEECH:
        return granite_speech_probes(hf_config, transformers_version, detail=detail)
    if model_type == PLUS:
        return granite_speech_plus_probes(hf_config, transformers_version, detail=detail)
    if model_type == CTC5:
        return granite_speech5_probes(hf_config)
    raise ValueError(f"no probe table for model_type {model_type!r}; expected one of {MODEL_TYPES}")


def masks_for(hf_config: Any, inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """The validity masks a member's table names, from the HF model inputs of a batch."""
    from parity.granite.probes import TEXT, text_mask

    if model_type_of(hf_config) == CTC5:
        mask = inputs.get("attention_mask")
        if mask is None:
            import torch

            mask = torch.ones(inputs["input_features"].shape[:2], dtype=torch.bool)
        return ctc5_frame_masks(mask, hf_config)
    return {TEXT: text_mask(inputs)}


def _installed_transformers() -> str:
    import transformers

    return transformers.__version__
