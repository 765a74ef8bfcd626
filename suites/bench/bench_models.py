"""The models and inputs the benchmarks measure: HF and FMS Granite Speech at real dimensions, bf16, seeded random
weights built in device memory (no checkpoint on disk), and prompts of 30 text tokens around one audio clip.

Environment:
  GRANITE_SPEECH_BENCH_VARIANTS  comma-separated variants (default "2b,8b"; the 4.x members "4.0-1b", "4.1-2b",
                                 "4.1-2b-plus"; "tiny", "tiny-4.0", "tiny-plus" for a quick debugging run)
  GRANITE_SPEECH_BENCH_DEVICE    torch device (default "cuda"; "cpu" runs the same code at tiny dims to debug it)
  GRANITE_SPEECH_BENCH_IMPLS     comma-separated implementations to time (default: all of IMPLS)
"""

import os
import time
from dataclasses import dataclass, field
from typing import Dict

import torch

from parity.granite.fixtures import load_hf_config

VARIANTS = tuple(v for v in os.environ.get("GRANITE_SPEECH_BENCH_VARIANTS", "2b,8b").split(",") if v)
DEVICE = torch.device(os.environ.get("GRANITE_SPEECH_BENCH_DEVICE", "cuda"))
DTYPE = torch.bfloat16
SEED = 0
MAX_NEW_TOKENS = 128
PROMPT_TEXT_TOKENS = 30  # text tokens around the audio placeholders (perf-anchors.md: 30)
LONGEST_AUDIO_S = 30
# hf: HF eager `generate`; hf_static: HF `generate` with a static KV cache, whose decode forward transformers compiles
# by itself on CUDA (what an HF user picks for speed); fms: FMS eager `generate`; fast / fast_compiled: the fast path;
# fast_autotuned: fast_compiled with inductor's GEMM autotuning (max-autotune-no-cudagraphs);
# fast_static_prefill: the fast path with the static prefill (prompt through the step's layer math, graphed);
# fast_encoder_compiled / fast_encoder_flex: the fast path with encoder + projector compiled (math / flex attention);
# fast_splitk / fast_compiled_splitk: the decode step's weight products by the split-K GEMV (`gemv="splitk"`)
IMPLS = ("fast", "fast_compiled", "fast_autotuned", "fast_static_prefill", "fast_encoder_compiled", "fast_encoder_flex",
         "fast_splitk", "fast_compiled_splitk", "hf", "hf_static", "fms")
SELECTED_IMPLS = tuple(i for i in os.environ.get("GRANITE_SPEECH_BENCH_IMPLS", ",".join(IMPLS)).split(",") if i)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, durations):
    """`fn` wrapped to append its wall time, between device synchronisations, to `durations`."""
    def run():
        synchronize()
        start = time.perf_counter()
        out = fn()
        synchronize()
        durations.append(time.perf_counter() - start)
        return out

    return run


def audio_token_count(frames: int, window: int = 15, queries: int = 3) -> int:
    return queries * -(-frames // window)


def make_inputs(audio_token_index: int, vocab: int, seconds: float, batch: int, seed: int = SEED) -> Dict[str, torch.Tensor]:
    """`batch` prompts of PROMPT_TEXT_TOKENS text tokens around one clip of `seconds` (50 encoder frames/s),
    random features (log-mel scale) and random text ids; no padding."""
    gen = torch.Generator().manual_seed(seed)
    frames = int(seconds * 50)
    n_audio = audio_token_count(frames)
    before = PROMPT_TEXT_TOKENS // 3
    text = torch.randint(1, audio_token_index - 1, (batch, PROMPT_TEXT_TOKENS), generator=gen)
    ids = torch.cat([text[:, :before], torch.full((batch, n_audio), audio_token_index), text[:, before:]], dim=1)
    return {
        "input_ids": ids.to(DEVICE),
        "attention_mask": torch.ones_like(ids).to(DEVICE),
        "input_features": torch.randn(batch, frames, 160, generator=gen).to(DEVICE, DTYPE),
        "input_features_mask": torch.ones(batch, n_audio, dtype=torch.bool).to(DEVICE),
    }


def tensor_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() in seen:
            continue  # tied weights count once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class BenchModels:
    variant: str
    hf: torch.nn.Module
    fms: torch.nn.Module
    audio_token_index: int
    vocab: int
    hf_bytes: int
    fms_bytes: int
    decoder_bytes: int  # what one decode step must read: every decoder weight once (tied embedding/head once)
    build_s: float
    generators: Dict[str, object] = field(default_factory=dict)
    hf_caches: Dict[int, object] = field(default_factory=dict)  # batch -> HF StaticCache of max_len()
    tokens: Dict[tuple, torch.Tensor] = field(default_factory=dict)  # (impl, batch) -> generated tokens

    def inputs(self, seconds: float = LONGEST_AUDIO_S, batch: int = 1, seed: int = SEED):
        return make_inputs(self.audio_token_index, self.vocab, seconds, batch, seed)

    def max_len(self) -> int:
        return PROMPT_TEXT_TOKENS + audio_token_count(LONGEST_AUDIO_S * 50) + MAX_NEW_TOKENS

    def generator(self, impl: str):
        from granite_speech.fast_generate import StaticGenerator

        if impl not in self.generators:
            kwargs = {"fast": {}, "fast_compiled": {"compile_step": True}, "fast_eager": {"use_cuda_graph": False},
                      "fast_static_prefill": {"static_prefill": True}, "fast_encoder_compiled": {"encoder": "compiled"},
                      "fast_encoder_flex": {"encoder": "flex"}, "fast_splitk": {"gemv": "splitk"},
                      "fast_compiled_splitk": {"compile_step": True, "gemv": "splitk"},
                      "fast_autotuned": {"compile_step": True, "compile_mode": "max-autotune-no-cudagraphs"}}
            self.generators[impl] = StaticGenerator(self.fms, self.max_len(), **kwargs[impl])
        return self.generators[impl]


    def hf_static_cache(self, batch: int):
        """One HF StaticCache per batch size, of the longest length any benchmark asks for (one shape: compiled once),
        emptied before each use."""
        from transformers import StaticCache

        if batch not in self.hf_caches:
            self.hf_caches[batch] = StaticCache(config=self.hf.config, max_cache_len=self.max_len())
        cache = self.hf_caches[batch]
        cache.reset()
        return cache


def _config(variant: str) -> dict:
    from parity.granite.fixtures.family import FAMILY_CONFIGS, load_family_config

    return load_family_config(variant) if variant in FAMILY_CONFIGS else load_hf_config(variant)


def _fms_on_meta(hf_config: dict, hf_class_config) -> torch.nn.Module:
    """The FMS model of the member (3.3 and the 4.x members of its layout share one; 4.1-2b-plus has the
    `cat_hidden_layers` encoder), on the meta device, no adapter (the in-memory HF model has none either)."""
    from granite_speech import GraniteSpeech, from_hf_config

    with torch.device("meta"):
        if hf_config["model_type"] == "granite_speech_plus":
            from granite_speech.plus import GraniteSpeechPlus, GraniteSpeechPlusConfig, build_granite_speech_plus_params

            return GraniteSpeechPlus(GraniteSpeechPlusConfig(**build_granite_speech_plus_params(hf_class_config)))
        return GraniteSpeech(from_hf_config(hf_config))


def build_models(variant: str) -> BenchModels:
    """HF model randomly initialised (transformers' own init, seeded) on the device; the FMS model loaded from its
    state dict through the project's `hf` adapter, as `get_model` would from a checkpoint. Any 3.3 or 4.x variant
    of `fixtures/configs` (2b, 8b, 4.0-1b, 4.1-2b, 4.1-2b-plus, tiny...)."""
    from fms.utils.serialization import load_state_dict_into_model

    from parity.granite.fixtures import family

    start = time.perf_counter()
    hf_config = _config(variant)
    member = hf_config["model_type"]  # granite_speech or granite_speech_plus: also the FMS architecture's name
    hf_class_config = family.hf_config(hf_config)
    torch.manual_seed(SEED)
    with torch.device(DEVICE):
        hf = family.hf_classes(member)[1]._from_config(hf_class_config, dtype=DTYPE)
    hf.eval()
    fms = _fms_on_meta(hf_config, hf_class_config)
    load_state_dict_into_model(fms, dict(hf.state_dict()), member, "hf", initial_device=DEVICE)
    fms.post_init()
    # BatchNorm's num_batches_tracked is not in the adapted checkpoint (eval never reads it); get_model does this too
    fms._apply(lambda t: torch.zeros_like(t, device=DEVICE) if t.device.type == "meta" else t)
    fms.eval()
    synchronize()
    text = hf_config["text_config"]
    return BenchModels(
        variant=variant,
        hf=hf,
        fms=fms,
        audio_token_index=hf_config["audio_token_index"],
        vocab=text["vocab_size"],
        hf_bytes=tensor_bytes(hf),
        fms_bytes=tensor_bytes(fms),
        decoder_bytes=tensor_bytes(fms.language_model),
        build_s=time.perf_counter() - start,
    )


