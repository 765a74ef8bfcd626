"""Planted faults: the harness's self-test. Each fault is a real porting mistake applied at run time to a loaded FMS
model; a harness worth trusting must fail on it and name `probe` as the first divergence, in propagated and in
teacher-forced mode alike. The catalogue is data; each applier mutates the model it is given (load a fresh one).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from granite_speech.checkpoint.adapter import rope_permute


@dataclass(frozen=True)
class Fault:
    name: str
    probe: str  # the probe that must be named as the first divergence
    apply: Callable[[torch.nn.Module], None]
    lora_mode: str = "merged"
    # where teacher forcing must put the module's own error; None for faults in code *between* probed modules
    # (an input probe has no module to re-run: the propagated first divergence is what locates those)
    teacher_probe: Optional[str] = "same"

    @property
    def expected_own_error(self) -> Optional[str]:
        return self.probe if self.teacher_probe == "same" else self.teacher_probe


def _perturb_one_weight(model):
    # one element of the attention output projection, by the largest weight's magnitude: one wrong number
    w = model.encoder.layers[1].attn.dense.weight
    w[3, 5] += w.abs().max()


def _swap_glu_halves(model):
    conv = model.encoder.layers[2].conv.up_conv
    for p in (conv.weight, conv.bias):
        value, gate = p.data.chunk(2, dim=0)
        p.data = torch.cat([gate, value], dim=0)


def _batchnorm_stats_not_loaded(model):
    bn = model.encoder.layers[0].conv.batch_norm
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


def _skip_mid_layer_ctc(model):
    # the self-conditioning term contributes nothing, as if the mid-layer CTC step were left out
    model.encoder.ctc_out_mid.weight.zero_()
    model.encoder.ctc_out_mid.bias.zero_()


def _swapped_cross_attention_key_value(model):
    attn = model.projector.layers[0].cross_attn
    attn.key.weight.data, attn.value.weight.data = attn.value.weight.data.clone(), attn.key.weight.data.clone()
    attn.key.bias.data, attn.value.bias.data = attn.value.bias.data.clone(), attn.key.bias.data.clone()


def _embedding_multiplier_skipped_on_audio(model):
    embed = model.embed_inputs
    scale = model.config.text_config.embedding_multiplier

    def embed_without_audio_scaling(input_ids, *args, **kwargs):
        embeds = embed(input_ids, *args, **kwargs)
        is_audio = (input_ids == model.config.audio_token_index).unsqueeze(-1)
        return torch.where(is_audio, embeds / scale, embeds)

    model.embed_inputs = embed_without_audio_scaling


def _rope_rows_not_permuted(model):
    # the q rows of layer 1 left in HF's half-rotation order (undo the adapter's permutation)
    text = model.config.text_config
    qkv = model.language_model.base_model.layers[1].attn.in_proj.qkv_fused.weight
    q_rows = text.nheads * text.head_dim
    permuted = qkv.data[:q_rows]
    for _ in range(_permutation_order(text.head_dim) - 1):
        permuted = rope_permute(permuted, text.head_dim)
    qkv.data[:q_rows] = permuted


def _permutation_order(head_dim: int) -> int:
    """How many applications of the RoPE row permutation give back the identity (its inverse is order-1 of them)."""
    rows = torch.arange(head_dim).unsqueeze(-1).float()
    current, order = rope_permute(rows, head_dim), 1
    while not torch.equal(current, rows):
        current, order = rope_permute(current, head_dim), order + 1
    return order


def _wrong_lora_scale(model):
    # merged with half the adapter_config scale, as a port hard-coding 0.5 for alpha / r would
    lora = model.lora
    lora.detach()
    lora.scaling = lora.scaling * 0.5
    lora.merge_into(model.language_model.base_model)
    model.lora = None


CATALOGUE = (
    Fault("perturbed_weight", "encoder.block.1.attn", _perturb_one_weight),
    Fault("swapped_glu_halves", "encoder.block.2.conv", _swap_glu_halves),
    Fault("batchnorm_stats_not_loaded", "encoder.block.0.conv", _batchnorm_stats_not_loaded),
    Fault("mid_layer_ctc_skipped", "encoder.ctc_mid", _skip_mid_layer_ctc),
    Fault("swapped_cross_attention_key_value", "projector.qformer.0", _swapped_cross_attention_key_value),
    Fault("embedding_multiplier_skipped_on_audio", "decoder.inputs_embeds", _embedding_multiplier_skipped_on_audio,
          teacher_probe=None),
    Fault("rope_rows_not_permuted", "decoder.layer.1.attn.q", _rope_rows_not_permuted),
    Fault("wrong_lora_scale", "decoder.layer.0.attn.q", _wrong_lora_scale, lora_mode="audio_only"),
)
