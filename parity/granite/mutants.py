"""Source-level mutants of `granite_speech/`: the harness's self-test beyond the weight edits of `faults.py`.

Each `Mutant` is one realistic porting mistake written as a text edit of the source: `old` (a snippet that must occur
exactly once in `granite_speech/<file>`) replaced by `new`. `parity.granite.mutate` copies the package, applies one
edit and runs `compare` (and optionally the suites) on the mutated copy: a harness worth trusting fails the run, and
names the mutated module as the first divergence or the first own error (`expect`).

`expect` holds probe names or prefixes: an entry matches a probe named exactly so, or any probe under it
(`"encoder.block.0"` matches `encoder.block.0.conv`; an entry ending in "." such as `"step.1."` matches every probe that
starts with it). The generation probes are `step.N.token` / `step.N.logits`: in the fast path's section step 0 comes
from its static prefill, steps >= 1 from its decode step (`_DECODE_STEP` matches any of those; `_FAST_STEP` any step,
for code the two share).

Missing-upcast mutants are no-ops in float32: only the bf16 case of compare's default inputs can see them. The
catalogue is data; `suites/test_mutants.py` checks that every `old` still occurs exactly once, so the catalogue
cannot rot silently while the sources move.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "granite_speech"
KINDS = ("formula", "length", "mask", "rope", "lora", "cache", "upcast", "eps", "preprocessing", "generation",
         "config", "checkpoint", "judge")  # judge: a mistake in parity/ itself (parity.granite.judge_mutants)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to granite_speech/
    old: str  # must occur exactly once in the file
    new: str
    expect: Tuple[str, ...]  # probe names / prefixes that count as "localised"
    kind: str
    why: str
    # the fast-path options of the mutant's `compare` run: code only one fast variant runs (the flex kernel, the
    # split-K GEMV) is judged by that variant's section (the baseline is the default run: a section it lacks is new)
    compare_args: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"mutant {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.old == self.new:
            raise ValueError(f"mutant {self.name}: new equals old")
        if not self.expect:
            raise ValueError(f"mutant {self.name}: expect names no probe")

    def source(self, package_dir: Path = PACKAGE_DIR) -> str:
        return (Path(package_dir) / self.file).read_text()

    def check(self, package_dir: Path = PACKAGE_DIR) -> Optional[str]:
        """None when the edit applies to the sources in `package_dir`, else why not."""
        path = Path(package_dir) / self.file
        if not path.is_file():
            return f"{self.name}: {path} does not exist"
        count = path.read_text().count(self.old)
        if count != 1:
            return f"{self.name}: `old` occurs {count} times in {self.file} (must be exactly once)"
        return None

    def apply(self, package_dir: Path) -> None:
        """Edit the copy of the package in `package_dir` in place (raises when `old` is not there exactly once)."""
        problem = self.check(package_dir)
        if problem:
            raise ValueError(problem)
        path = Path(package_dir) / self.file
        path.write_text(path.read_text().replace(self.old, self.new))

    def localised(self, probe_name: Optional[str]) -> bool:
        return bool(probe_name) and any(matches(probe_name, entry) for entry in self.expect)


def matches(probe_name: str, entry: str) -> bool:
    """`entry` names `probe_name` exactly, or is a prefix of it (ending in '.', or followed by a '.')."""
    if entry.endswith("."):
        return probe_name.startswith(entry)
    return probe_name == entry or probe_name.startswith(entry + ".")


# ---------------------------------------------------------------------------------------------------------------
# the catalogue

_ENC_ATTN, _ENC_CONV = ("encoder.block.0.attn",), ("encoder.block.0.conv",)
_Q_FORMER = ("projector.qformer.0",)
# any step of the fast path's own decode (step 0 is its static prefill): a small error of the decode step may stand
# out only after a few steps; a first divergence at step 0 would name the prefill, and does not match
_DECODE_STEP = tuple(f"step.{k}." for k in range(1, 64))
_PREFILL_STEP = ("step.0.",)
_FAST_STEP = _PREFILL_STEP + _DECODE_STEP  # code the static prefill and the decode step share
_LORA_Q = ("decoder.layer.0.attn.q",)
_FLEX, _SPLITK = ("--fast-encoder", "flex"), ("--fast-gemv", "splitk")  # the compare options of a fast variant

CONFORMER = (
    Mutant("conformer_shaw_bias_unscaled", "conformer.py",
           old='bias = torch.einsum("b h c d, c r d -> b h c r", q, rel) * self.scale',
           new='bias = torch.einsum("b h c d, c r d -> b h c r", q, rel)',
           expect=_ENC_ATTN, kind="formula",
           why="the Shaw relative-position logits q.rel are not multiplied by Dh**-0.5 (only q.k gets SDPA's scale)"),
    Mutant("conformer_shaw_distance_sign_flipped", "conformer.py",
           old="dist = pos.view(-1, 1) - pos.view(1, -1)",
           new="dist = pos.view(1, -1) - pos.view(-1, 1)",
           expect=_ENC_ATTN, kind="rope",
           why="relative distance j - i instead of HF's i - j: every Shaw row reads the mirrored embedding"),
    Mutant("conformer_shaw_offset_context_size", "conformer.py",
           old="return dist.clamp(-self.context_size, self.context_size) + self.max_pos_emb",
           new="return dist.clamp(-self.context_size, self.context_size) + self.context_size",
           expect=_ENC_ATTN, kind="rope",
           why="the distance is offset by context_size instead of max_pos_emb: the wrong rel_pos_emb rows"),
    Mutant("conformer_block_padding_mask_off_by_one", "conformer.py",
           old="is_real = pos < valid",
           new="is_real = pos <= valid",
           expect=_ENC_ATTN, kind="mask",
           why="the right-padding of the last attention block masked from one frame too late (<= instead of <)"),
    Mutant("conformer_block_count_off_by_one", "conformer.py",
           old="nblocks = -(-seq_len // ctx)",
           new="nblocks = seq_len // ctx + 1",
           expect=_ENC_ATTN, kind="length",
           why="floor + 1 instead of ceil: one block too many when the frames fill whole blocks"),
    Mutant("conformer_kv_halves_swapped", "conformer.py",
           old="k, v = self.kv(y).chunk(2, dim=-1)",
           new="v, k = self.kv(y).chunk(2, dim=-1)",
           expect=_ENC_ATTN, kind="formula",
           why="to_kv split as (V, K) instead of HF's (K, V)"),
    Mutant("conformer_attention_without_upcast", "conformer.py",
           old="with sdpa_kernel(SDPBackend.MATH):\n"
               "            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)",
           new="scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias\n"
               "        out = torch.matmul(torch.softmax(scores, dim=-1), v)",
           expect=_ENC_ATTN, kind="upcast",
           why="block attention written out in the model dtype: in bf16 the scores, softmax and weights are rounded "
               "to bf16 (SDPA's math backend computes them in fp32); the same math in fp32, seen only by the bf16 case"),
    Mutant("conformer_glu_halves_swapped", "conformer.py",
           old="z = F.glu(z, dim=1)",
           new="z = F.glu(torch.cat(z.chunk(2, dim=1)[::-1], dim=1), dim=1)",
           expect=_ENC_CONV, kind="formula",
           why="GLU with the gate as the first half (HF: value first, gate second)"),
    Mutant("conformer_batchnorm_eps_keras", "conformer.py",
           old="self.batch_norm = nn.BatchNorm1d(inner, eps=config.layer_norm_eps)",
           new="self.batch_norm = nn.BatchNorm1d(inner, eps=1e-3)",
           expect=_ENC_CONV, kind="eps",
           why="BatchNorm eps 1e-3 (the Keras default) instead of torch's 1e-5"),
    Mutant("conformer_depthwise_padding_causal", "conformer.py",
           old="self.depth_padding = (kernel // 2, kernel // 2 - (kernel + 1) % 2)",
           new="self.depth_padding = (kernel - 1, 0)",
           expect=_ENC_CONV, kind="length",
           why="causal (left-only) padding of the depthwise conv, as streaming conformers do; HF pads 'same'"),
    Mutant("conformer_mid_ctc_softmax_over_time", "conformer.py",
           old="h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=-1))",
           new="h = h + self.ctc_out_mid(torch.softmax(self.ctc_out(h), dim=1))",
           expect=("encoder.ctc_mid",), kind="formula",
           why="the self-conditioning softmax taken over frames (dim 1) instead of the CTC vocabulary"),
    Mutant("conformer_ff_half_scale_dropped", "conformer.py",
           old="x = 0.5 * self.ff2(x) + x",
           new="x = self.ff2(x) + x",
           expect=("encoder.block.0",), kind="formula",
           why="the second macaron feed-forward added at full weight (the 0.5 dropped)"),
    Mutant("conformer_self_conditioning_block_off_by_one", "conformer.py",
           old="self.self_conditioning_layer = cfg.nlayers // 2",
           new="self.self_conditioning_layer = cfg.nlayers // 2 + 1",
           expect=("encoder.ctc_mid",), kind="length",
           why="the mid-layer CTC term added after block L//2 + 1 (0-based vs 1-based confusion)"),
    Mutant("flex_shaw_distance_sign_swapped", "conformer.py",
           old="score = score + shaw[b, h, q_idx, q_idx - kv_idx + ctx - 1]",
           new="score = score + shaw[b, h, q_idx, kv_idx - q_idx + ctx - 1]",
           expect=_PREFILL_STEP, kind="formula", compare_args=_FLEX,
           why="the flex kernel's Shaw term read at j - i instead of i - j (the math path, and so every model probe, "
               "is right: only the compiled encoder's section sees it)"),
    Mutant("flex_last_block_padding_keys_unmasked", "conformer.py",
           old="real = (b % nblocks != nblocks - 1) | ((q_idx < remainder) & (kv_idx < remainder))",
           new="real = (b % nblocks != nblocks - 1) | (q_idx < remainder)",
           expect=_PREFILL_STEP, kind="mask", compare_args=_FLEX,
           why="the flex kernel masks the last block's padded query rows but not its padded keys: the real frames "
               "of a partial last block attend to the padding"),
)

PROJECTOR = (
    Mutant("projector_window_padding_left", "projector.py",
           old="padded = F.pad(encoder_out, (0, 0, 0, nwindows * self.window_size - seq_len))",
           new="padded = F.pad(encoder_out, (0, 0, nwindows * self.window_size - seq_len, 0))",
           expect=_Q_FORMER, kind="length",
           why="the encoder output zero-padded on the left to whole windows: every window shifted"),
    Mutant("projector_window_count_off_by_one", "projector.py",
           old="nwindows = lengths.projector_windows(seq_len, self.window_size)",
           new="nwindows = seq_len // self.window_size + 1",
           expect=_Q_FORMER, kind="length",
           why="floor + 1 windows instead of ceil: one window too many when the frames fill whole windows"),
    Mutant("projector_cross_attention_frequency_off_by_one", "projector.py",
           old="self.has_cross_attention = layer_index % config.cross_attention_frequency == 0",
           new="self.has_cross_attention = (layer_index + 1) % config.cross_attention_frequency == 0",
           expect=_Q_FORMER, kind="length",
           why="cross-attention in layers 1, 3, ... (1-based count) instead of BLIP-2's 0, 2, ... (frequency 2)"),
    Mutant("projector_query_layernorm_skipped", "projector.py",
           old="x = self.dropout(self.ln(self.query))",
           new="x = self.dropout(self.query)",
           expect=_Q_FORMER, kind="formula",
           why="the learned queries enter the Q-Former without BLIP-2's query LayerNorm"),
    Mutant("projector_cross_attention_before_self", "projector.py",
           old="x = self.self_attn(x)\n        if self.has_cross_attention:\n            x = self.cross_attn(x, windows)",
           new="if self.has_cross_attention:\n            x = self.cross_attn(x, windows)\n        x = self.self_attn(x)",
           expect=_Q_FORMER, kind="formula",
           why="cross-attention to the audio before the queries' self-attention (BLIP-2: self first)"),
    Mutant("projector_attention_layernorm_eps", "projector.py",
           old="self.dense = nn.Linear(config.emb_dim, config.emb_dim)\n"
               "        self.ln = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)",
           new="self.dense = nn.Linear(config.emb_dim, config.emb_dim)\n"
               "        self.ln = nn.LayerNorm(config.emb_dim)",
           expect=_Q_FORMER, kind="eps",
           why="the attention output LayerNorm with torch's default eps 1e-5 instead of BERT's 1e-12"),
    Mutant("projector_gelu_tanh", "projector.py",
           old="self.act = str_to_activation(config.activation_fn)",
           new='self.act = nn.GELU(approximate="tanh")',
           expect=_Q_FORMER, kind="formula",
           why="a hard-coded tanh-approximated GELU in the Q-Former feed-forward (hidden_act 'gelu' is exact erf)"),
)

MODEL = (
    Mutant("model_audio_merge_off_by_one", "model.py",
           old="source_row = torch.searchsorted(valid_before, token_rank)",
           new="source_row = torch.searchsorted(valid_before, token_rank, right=True)",
           expect=("decoder.inputs_embeds",), kind="formula",
           why="the k-th <|audio|> placeholder takes audio row k+1 (searchsorted right instead of left)"),
    Mutant("model_audio_embeds_scaled_twice", "model.py",
           old="return merge_audio_embeds(text_embeds, is_audio, audio_embeds, input_features_mask)",
           new="return merge_audio_embeds(\n            text_embeds, is_audio, "
               "audio_embeds * self.config.text_config.embedding_multiplier, input_features_mask\n        )",
           expect=("decoder.inputs_embeds",), kind="formula",
           why="the embedding multiplier applied to the audio rows before the merge, and again by the decoder"),
    Mutant("model_padding_mask_causal_only", "model.py",
           old="allowed = (real.unsqueeze(-1) == real.unsqueeze(-2)).tril()",
           new="allowed = torch.ones_like(real.unsqueeze(-1) == real.unsqueeze(-2)).tril()",
           expect=("step.0.", "decoder.layer.0.attn"), kind="mask",
           why="the generation mask is causal only: real tokens of a left-padded row attend to the pads"),
)

LORA = (
    Mutant("lora_scale_alpha_not_divided", "lora.py",
           old="self.scaling = config.lora_scaling",
           new="self.scaling = config.lora_alpha",
           expect=_LORA_Q, kind="lora",
           why="the LoRA delta scaled by alpha instead of alpha / r"),
    Mutant("lora_target_slots_k_v_swapped", "lora.py",
           old='TARGET_SLOT = {"q_proj": 0, "k_proj": 1, "v_proj": 2}',
           new='TARGET_SLOT = {"q_proj": 0, "k_proj": 2, "v_proj": 1}',
           expect=("decoder.layer.0.attn.k", "decoder.layer.0.attn.v"), kind="lora",
           why="the v_proj adapter added to the key slot of the fused QKV (k and v have the same width under GQA)"),
    Mutant("lora_adapter_switch_inverted", "lora.py",
           old="if not self.enabled:\n                return None",
           new="if self.enabled:\n                return None",
           expect=_LORA_Q, kind="lora",
           why="the audio_only adapter hook skips exactly when the adapter should be on"),
    Mutant("config_lora_rslora_scaling", "config.py",
           old="return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_use_rslora else self.lora_rank)",
           new="return self.lora_alpha / math.sqrt(self.lora_rank)",
           expect=_LORA_Q, kind="lora",
           why="rsLoRA scaling alpha / sqrt(r) although the adapter_config has use_rslora false"),
)

FEATURES = (
    Mutant("features_dynamic_range_80", "features.py",
           old="logmel = torch.maximum(logmel, clip_max - 8.0).div(4).add(1)",
           new="logmel = torch.maximum(logmel, clip_max - 80.0).div(4).add(1)",
           expect=("features.input_features",), kind="preprocessing",
           why="the log-mel floor 80 below the max (a dB top_db habit) instead of 8 decades of log10"),
    Mutant("features_batch_global_max", "features.py",
           old="clip_max = logmel.amax(dim=(-2, -1), keepdim=True)",
           new="clip_max = logmel.amax()",
           expect=("features.input_features",), kind="preprocessing",
           why="the dynamic-range floor taken from the batch's max instead of each clip's own"),
    Mutant("features_frame_stacking_interleaved", "features.py",
           old="return logmel.reshape(logmel.shape[0], num_frames, lengths.FRAME_STACK * logmel.shape[-1])",
           new="return logmel.reshape(logmel.shape[0], num_frames, lengths.FRAME_STACK, -1).transpose(-1, -2)"
               ".reshape(logmel.shape[0], num_frames, -1)",
           expect=("features.input_features",), kind="preprocessing",
           why="the two stacked mel frames interleaved bin by bin instead of concatenated"),
    Mutant("features_hop_length_dropped", "features.py",
           old='"hop_length": self.hop_length,\n',
           new="",
           expect=("features.input_features",), kind="preprocessing",
           why="hop_length not passed to MelSpectrogram: torchaudio's default win_length // 2 = 200 samples"),
    Mutant("features_window_downsample_swapped", "features.py",
           old="num_samples, c.hop_length, c.projector_window_size, c.projector_downsample_rate",
           new="num_samples, c.hop_length, c.projector_downsample_rate, c.projector_window_size",
           expect=("features",), kind="preprocessing",
           why="projector_window_size and projector_downsample_rate passed in swapped order to the token count"),
    Mutant("lengths_window_count_floor_plus_one", "lengths.py",
           old="return (num_encoder_frames + window_size - 1) // window_size  # ceil, exact in integers",
           new="return num_encoder_frames // window_size + 1",
           expect=("features.input_features_mask", "features.audio_embed_sizes"), kind="length",
           why="audio_embed_sizes rounded as floor + 1 windows: one window too many on exact multiples"),
    Mutant("lengths_features_mask_inclusive", "lengths.py",
           old="return positions.view(1, -1) < counts.view(-1, 1)",
           new="return positions.view(1, -1) <= counts.view(-1, 1)",
           expect=("features.input_features_mask",), kind="mask",
           why="input_features_mask True for j <= tokens (one padded audio row kept per shorter clip)"),
    Mutant("lengths_odd_mel_frame_kept", "lengths.py",
           old="return num_mel_frames // FRAME_STACK",
           new="return -(-num_mel_frames // FRAME_STACK)",
           expect=("features.input_features",), kind="length",
           why="an odd last mel frame counted as an encoder frame (ceil) instead of dropped"),
)

PROCESSOR = (
    Mutant("processor_expansion_one_short", "processor.py",
           old="out.append(self.audio_token * next(sizes))",
           new="out.append(self.audio_token * (next(sizes) - 1))",
           expect=("processor.input_ids",), kind="preprocessing",
           why="each <|audio|> expanded to one copy fewer than its clip's audio_embed_sizes (the original kept)"),
    Mutant("processor_padding_side_ignored", "processor.py",
           old='        if padding_side is not None:\n            tokenizer_kwargs["padding_side"] = padding_side\n',
           new="",
           expect=("processor.input_ids", "processor.attention_mask"), kind="preprocessing",
           why="padding_side never reaches the tokenizer: its default side is used"),
)

AUDIO = (
    Mutant("audio_downmix_first_channel", "audio.py",
           old="audio = audio.mean(dim=1)",
           new="audio = audio[:, 0].clone()",
           expect=("audio.0.samples",), kind="preprocessing",
           why="a stereo file down-mixed by taking the left channel instead of the mean of the channels"),
    Mutant("audio_resample_length_floor", "audio.py",
           old="length = math.ceil(audio.numel() * sampling_rate / rate)",
           new="length = audio.numel() * sampling_rate // rate",
           expect=("audio.0.samples",), kind="length",
           why="the resampled length rounded down (librosa/soxr keep ceil(N * new / old) samples): one sample short"),
)

FAST_GENERATE = (
    Mutant("fast_cache_write_off_by_one", "fast_generate.py",
           old="key_cache.index_copy_(2, slot, k.unsqueeze(2))\n"
               "    value_cache.index_copy_(2, slot, v.unsqueeze(2))",
           new="key_cache.index_copy_(2, slot + 1, k.unsqueeze(2))\n"
               "    value_cache.index_copy_(2, slot + 1, v.unsqueeze(2))",
           expect=_DECODE_STEP, kind="cache",
           why="the new token's K/V written one cache column past its slot (the slot keeps zeros)"),
    Mutant("fast_rope_position_off_by_one", "fast_generate.py",
           old="state.rope_pos.copy_(real.sum(-1))",
           new="state.rope_pos.copy_(real.sum(-1) - 1)",
           expect=_DECODE_STEP, kind="rope",
           why="the first decoded token rotated at the last prompt token's position (count - 1)"),
    Mutant("fast_static_prefill_rope_position_off_by_one", "fast_generate.py",
           old="state.rope_pos.copy_(real.sum(-1) - 1)",
           new="state.rope_pos.copy_(real.sum(-1) - 2)",
           expect=_DECODE_STEP, kind="rope",
           why="after the static prefill, the first decoded token rotated at the last prompt token's position"),
    Mutant("fast_valid_column_not_marked", "fast_generate.py",
           old="valid.index_fill_(1, slot, True)",
           new="valid.index_fill_(1, slot - 1, True)",
           expect=_DECODE_STEP, kind="cache",
           why="the column being written is not marked valid: the new token never attends to itself"),
    Mutant("fast_logits_scaling_multiplied", "fast_generate.py",
           old="logits = (_linear(spec, x, head_w) / spec.logits_scaling).float()",
           new="logits = (_linear(spec, x, head_w) * spec.logits_scaling).float()",
           expect=_FAST_STEP, kind="generation",
           why="the decode step multiplies the head output by logits_scaling instead of dividing"),
    Mutant("fast_embedding_multiplier_dropped", "fast_generate.py",
           old="x = F.embedding(token, embedding_w) * spec.embedding_multiplier",
           new="x = F.embedding(token, embedding_w)",
           expect=_DECODE_STEP, kind="generation",
           why="the decode step's token embedding without Granite's embedding_multiplier"),
    Mutant("fast_gqa_head_grouping", "fast_generate.py",
           old="q = q.reshape(batch, spec.kvheads, spec.nheads // spec.kvheads, spec.head_dim)",
           new="q = q.reshape(batch, spec.nheads // spec.kvheads, spec.kvheads, spec.head_dim).transpose(1, 2)",
           expect=_DECODE_STEP, kind="generation",
           why="query heads grouped round-robin over the kv heads (repeat) instead of in blocks (repeat_interleave)"),
    Mutant("fast_lora_off_in_decode", "fast_generate.py",
           old="*self._layer_weights(weights, lora_on), key_cache, value_cache, rot, state.slot,",
           new="*self._layer_weights(weights, False), key_cache, value_cache, rot, state.slot,",
           expect=_DECODE_STEP, kind="lora",
           why="the audio_only modality LoRA applied in the prefill but not in the decode step"),
    Mutant("fast_lora_on_for_text_decode", "fast_generate.py",
           old="return self.model.lora is not None and bool(self.model.lora.enabled)",
           new="return self.model.lora is not None",
           expect=_DECODE_STEP, kind="lora",
           why="the decode step applies the modality LoRA whenever the model has one, also after a text-only prompt "
               "(HF's adapter is off without audio)"),
    Mutant("fast_rmsnorm_eps_llama", "fast_generate.py",
           old="xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)",
           new="xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)",
           expect=_FAST_STEP, kind="eps",
           why="the decode step's RMSNorm with Llama's eps 1e-6 instead of the config's rms_norm_eps"),
    Mutant("fast_rmsnorm_no_fp32_upcast", "fast_generate.py",
           old="xf = x.float()\n",
           new="xf = x\n",
           expect=_FAST_STEP, kind="upcast",
           why="the decode step's RMSNorm statistics in bf16 (FMS computes them in fp32); a no-op in fp32, "
               "seen only by the bf16 case"),
    Mutant("fast_prefill_position_off_by_one", "fast_generate.py",
           old="positions = (real.long().cumsum(-1) - 1).clamp(min=0)",
           new="positions = real.long().cumsum(-1).clamp(min=0)",
           expect=_PREFILL_STEP + ("step.1.",), kind="rope",
           why="the static prefill's RoPE positions count real tokens from 1 (HF and FMS count from 0); RoPE sees only "
               "relative positions, so the prompt's own logits stay right and the first decode step, reading keys "
               "rotated one position on, is where it shows"),
    Mutant("fast_prefill_padding_visible", "fast_generate.py",
           old="allowed = (real.unsqueeze(-1) == real.unsqueeze(-2)).tril()",
           new="allowed = torch.ones_like(real.unsqueeze(-1) == real.unsqueeze(-2)).tril()",
           expect=_PREFILL_STEP, kind="mask",
           why="the static prefill's mask is causal only: real tokens attend to the left padding (the batch's and "
               "the bucket's)"),
    Mutant("fast_static_prefill_adapter_always_on", "fast_generate.py",
           old="self.model.lora.enabled = audio_embeds is not None  # as GraniteSpeech.forward sets it",
           new="self.model.lora.enabled = True",
           expect=_PREFILL_STEP, kind="lora",
           why="the static prefill switches the modality LoRA on for every prompt: a text-only prompt gets the "
               "adapter HF applies only with audio (prefill and every decode step)"),
    Mutant("fast_prefill_kv_heads_tiled", "fast_generate.py",
           old="k.repeat_interleave(groups, dim=1),\n        v.repeat_interleave(groups, dim=1),",
           new="k.repeat(1, groups, 1, 1),\n        v.repeat(1, groups, 1, 1),",
           expect=_PREFILL_STEP, kind="generation",
           why="the static prefill expands the kv heads by tiling (repeat) instead of in blocks (repeat_interleave)"),
    Mutant("fast_ended_rows_not_padded", "fast_generate.py",
           old="next_token = torch.where(finished, pad, logits.argmax(-1))",
           new="next_token = logits.argmax(-1)",
           expect=("step.",), kind="generation",
           why="a row that emitted end-of-text keeps generating instead of holding pad (HF's rule)"),
)

# the split-K GEMV of the decode step (`compare --fast-gemv splitk`; on the CPU through Triton's interpreter); its
# K-slicing is the kernel test's (suites/test_gemv.py): the tiny fixture's K fits one block
GEMV = (
    Mutant("splitk_rows_past_two_dropped", "gemv.py",
           old="BLOCK_M=max(2, triton.next_power_of_2(m))",
           new="BLOCK_M=2",
           expect=_DECODE_STEP, kind="generation", compare_args=_SPLITK,
           why="the kernel's row block fixed at two rows: a batch of three leaves the third row's partial sums "
               "unwritten"),
    Mutant("splitk_weight_read_transposed", "gemv.py",
           old="w = tl.load(w_ptr + cols[:, None] * K + ks[None, :],",
           new="w = tl.load(w_ptr + ks[None, :] * N + cols[:, None],",
           expect=_DECODE_STEP, kind="formula", compare_args=_SPLITK,
           why="the weight read as [K, N] (x @ W) where nn.Linear stores [N, K] (x @ W.T): the layout confusion of "
               "a hand-written GEMV"),
)

# the eager decoding loop's per-row end-of-text (compare's rows-end-apart case)
GENERATION = (
    Mutant("generate_batch_stops_at_first_eos", "generation.py",
           old="if eos_token_id is not None and bool(ended.all()):",
           new="if eos_token_id is not None and bool(ended.any()):",
           expect=("step.", "generate.new_tokens"), kind="generation",
           why="the whole batch stops when its first row ends (FMS 1.13.1's own eos check), cutting the others short"),
    Mutant("generate_ended_rows_not_padded", "generation.py",
           old="next_val = torch.where(ended.unsqueeze(1), torch.full_like(next_val, fill), next_val)",
           new="next_val = next_val",
           expect=("step.",), kind="generation",
           why="a row that emitted end-of-text keeps generating instead of holding pad (HF's rule)"),
)

CONFIG = (
    Mutant("config_conformer_layernorm_eps", "config.py",
           old="layer_norm_eps: float = 1e-5  # nn.LayerNorm / nn.BatchNorm1d default, as HF uses",
           new="layer_norm_eps: float = 1e-12  # nn.LayerNorm / nn.BatchNorm1d default, as HF uses",
           expect=("encoder.block.0",), kind="eps",
           why="the conformer's LayerNorm/BatchNorm eps copied from the Q-Former's 1e-12"),
    Mutant("config_residual_multiplier_dropped", "config.py",
           old="        residual_multiplier=text.residual_multiplier,\n",
           new="",
           expect=("decoder.layer.0",), kind="config",
           why="the HF -> FMS text mapping forgets residual_multiplier; GraniteConfig's default 1.0 hides it"),
    Mutant("config_attention_multiplier_dropped", "config.py",
           old="        attention_multiplier=text.attention_multiplier,\n",
           new="",
           expect=("decoder.layer.0.attn",), kind="config",
           why="the HF -> FMS text mapping forgets attention_multiplier; the default 1.0 replaces Granite's 1/Dh"),
    Mutant("config_lora_scale_floor_division", "config.py",
           old="return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_use_rslora else self.lora_rank)",
           new="return self.lora_alpha // (math.sqrt(self.lora_rank) if self.lora_use_rslora else self.lora_rank)",
           expect=_LORA_Q, kind="lora",
           why="alpha // r: exact for 16/8, zero for the published 32/64 adapter"),
    Mutant("config_rope_theta_defaulted_on_5x", "config.py",
           old='theta = params.get("rope_theta", getattr(text, "rope_theta", None))',
           new="theta = 10_000.0",
           expect=("decoder.layer.0",), kind="rope",
           why="the 5.x rope_parameters path ignores rope_theta; FMS's default 10000 hides it where a config uses it"),
)

# the HF -> FMS checkpoint adapter: faults the weight-coverage audit cannot see (every tensor placed, shapes right)
# projector.py's rename rules, from the attention-output LayerNorm's rule to the feed-forward LayerNorm's: one
# contiguous `old` holding both, so that their targets can be swapped
_QFORMER_NORM_RULES = r'''    (r"\.attention\.output\.LayerNorm\.", r".self_attn.ln."),
    (r"\.crossattention\.attention\.", r".cross_attn."),
    (r"\.crossattention\.output\.dense\.", r".cross_attn.dense."),
    (r"\.crossattention\.output\.LayerNorm\.", r".cross_attn.ln."),
    (r"\.intermediate_query\.dense\.", r".ff.w1."),
    (r"\.output_query\.dense\.", r".ff.w2."),
    (r"\.output_query\.LayerNorm\.", r".ff.ln."),'''


def _swapped(text: str, a: str, b: str) -> str:
    """`text` with every `a` and `b` exchanged."""
    return b.join(part.replace(b, a) for part in text.split(a))


CHECKPOINT = (
    Mutant("adapter_lora_b_rows_not_rope_permuted", "checkpoint/adapter.py",
           old=r'''    r"|lora\.layers\.\d+\.(q_proj|k_proj)\.lora_B\.weight)$"''',
           new=r'''    r")$"''',
           expect=("decoder.layer.0.attn",), kind="checkpoint",
           why="q/k rows permuted from HF's half rotation to FMS's interleaved pairs, but not the LoRA B rows that "
               "feed them: the adapter's delta lands on the wrong rows"),
    Mutant("adapter_rope_permute_inverted", "checkpoint/adapter.py",
           old="weight.view(heads, 2, head_dim // 2, *weight.shape[1:])",
           new="weight.view(heads, head_dim // 2, 2, *weight.shape[1:])",
           expect=("decoder.layer.0.attn",), kind="checkpoint",
           why="the q/k row permutation applied in the FMS -> HF direction (its inverse)"),
    Mutant("adapter_qformer_layernorms_swapped", "projector.py",
           old=_QFORMER_NORM_RULES,
           new=_swapped(_QFORMER_NORM_RULES, 'r".self_attn.ln."', 'r".ff.ln."'),
           expect=_Q_FORMER, kind="checkpoint",
           why="the Q-Former's attention-output LayerNorm loaded as its feed-forward LayerNorm and the feed-forward "
               "one as the attention's (same shapes: the coverage audit sees every tensor placed)"),
)

# the `transcribe` plumbing around the model (compare's transcribe section)
CLI = (
    Mutant("transcribe_first_clip_for_every_prompt", "__main__.py",
           old='inputs = processor([prompt] * len(job.audio), job.audio, padding_side="left")',
           new='inputs = processor([prompt] * len(job.audio), job.audio[:1] * len(job.audio), padding_side="left")',
           expect=("transcribe.",), kind="preprocessing",
           why="transcribe gives every prompt the first clip's audio"),
)

CATALOGUE: Tuple[Mutant, ...] = (CONFORMER + PROJECTOR + MODEL + LORA + FEATURES + PROCESSOR + AUDIO + FAST_GENERATE
                                 + GEMV + GENERATION + CONFIG + CHECKPOINT + CLI)


def by_name(names: Iterable[str]) -> List[Mutant]:
    return by_name_in(CATALOGUE, names)


def by_name_in(catalogue: Iterable[Mutant], names: Iterable[str]) -> List[Mutant]:
    index = {m.name: m for m in catalogue}
    names = list(names)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise KeyError(f"unknown mutant(s) {unknown}; known: {sorted(index)}")
    return [index[n] for n in names]


def _check_unique_names() -> None:
    seen = set()
    for mutant in CATALOGUE:
        if mutant.name in seen:
            raise ValueError(f"duplicate mutant name {mutant.name}")
        seen.add(mutant.name)


_check_unique_names()
