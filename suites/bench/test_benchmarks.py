"""Speed and memory of Granite Speech generation at real dimensions (bf16, seeded random weights), side by side:
HF eager `generate`, FMS eager `fms.utils.generation.generate` (use_cache), and the static-cache fast path
(`granite_speech.fast_generate`, CUDA graph; and with compiled layers).

Run on a GPU: `pytest -m benchmark suites/bench` (pyproject's addopts deselect these by default). Results go to
results/bench/*.json (see bench_results.py) and are printed as the BENCHMARKS.md table at the end.

Method (perf-anchors.md): medians of timed runs after warm-up, host clock around device-synchronised calls;
decode ms/token = (time for 128 new tokens - time for 1) / 127 with 30 s of audio (300 audio tokens) + 30 text
tokens; new tokens are forced (no eos) on every side; the floor of a decode step is the bytes it must read (decoder
weights once, plus the KV cache) over the measured device copy bandwidth.
"""

import copy
import statistics
import time

import pytest
import torch
from fms.utils.generation import generate

from bench_models import (DEVICE, DTYPE, LONGEST_AUDIO_S, MAX_NEW_TOKENS, SELECTED_IMPLS, VARIANTS, BenchModels,
                          synchronize, timed)
from granite_speech.model import padding_attn_kwargs
from parity.granite.hf import hf_audio_features
from parity.testing import assert_compiled_parity

# `gpu` only where they time a card: GRANITE_SPEECH_BENCH_DEVICE=cpu runs them on the CPU to debug
pytestmark = [pytest.mark.benchmark, *([pytest.mark.gpu] if DEVICE.type == "cuda" else [])]

GENERATE_IMPLS = tuple(i for i in ("fast", "fast_compiled", "fast_autotuned", "fast_static_prefill",
                                   "fast_encoder_flex", "fast_splitk", "fast_compiled_splitk", "hf", "hf_static", "fms")
                       if i in SELECTED_IMPLS)
ENCODER_IMPLS = tuple(i for i in ("fast", "fast_encoder_compiled", "fast_encoder_flex", "hf", "fms")
                      if i in SELECTED_IMPLS)
THROUGHPUT_IMPLS = tuple(i for i in ("fast", "fast_compiled", "fast_autotuned", "fast_static_prefill",
                                     "fast_encoder_flex", "hf", "hf_static")
                         if i in SELECTED_IMPLS)
AUDIO_SECONDS = (3, 10, 30)
ROUNDS = {"hf": 3, "hf_static": 3, "fms": 3, "fast": 5, "fast_compiled": 5, "fast_autotuned": 5,
          "fast_static_prefill": 5, "fast_encoder_flex": 5, "fast_splitk": 5, "fast_compiled_splitk": 5}
PROFILED_STEPS = 5
GRAPH_TIMED_STEPS = 64


def median_seconds(fn, rounds: int) -> float:
    durations = []
    run = timed(fn, durations)
    for _ in range(rounds):
        run()
    return statistics.median(durations)


def run_generate(models: BenchModels, impl: str, inputs, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens (eos disabled/forced off) with one implementation."""
    if impl in ("hf", "hf_static"):
        cache = {"past_key_values": models.hf_static_cache(inputs["input_ids"].size(0))} if impl == "hf_static" else {}
        return models.hf.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **cache
        )
    if impl == "fms":
        prompt_len = inputs["input_ids"].size(1)
        return generate(
            models.fms,
            inputs["input_ids"],
            max_seq_len=prompt_len + new_tokens,
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            prepare_model_inputs_hook=models.fms.prepare_inputs_for_generation,
            extra_kwargs={
                "input_features": inputs["input_features"],
                "input_features_mask": inputs["input_features_mask"],
                **padding_attn_kwargs(inputs["attention_mask"], dtype=DTYPE),
            },
        )
    return models.generator(impl).generate(**inputs, max_new_tokens=new_tokens)


def run_audio_features(models: BenchModels, impl: str, features: torch.Tensor) -> torch.Tensor:
    if impl.startswith("hf"):
        return hf_audio_features(models.hf, features)
    if impl == "fms":
        return models.fms.get_audio_features(features)
    return models.generator(impl).encode_audio(features)


def fp32_audio_features(models: BenchModels, features: torch.Tensor) -> torch.Tensor:
    """FMS's encoder + projector in fp32 eager: the value both 16-bit paths approximate (copies made for this call)."""
    encoder, projector = (copy.deepcopy(m).float() for m in (models.fms.encoder, models.fms.projector))
    return projector(encoder(features.float()))


def model_bytes(models: BenchModels, impl: str) -> int:
    return models.hf_bytes if impl.startswith("hf") else models.fms_bytes


def kv_cache_bytes(models: BenchModels, batch: int, length: int) -> int:
    cfg = models.fms.language_model.config
    kvheads = cfg.kvheads or cfg.nheads
    return 2 * cfg.nlayers * batch * kvheads * length * cfg.head_dim * torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("seconds", AUDIO_SECONDS)
@pytest.mark.parametrize("impl", ENCODER_IMPLS)
@torch.no_grad()
def test_encoder_projector(benchmark, models, results, impl, seconds):
    features = models.inputs(seconds)["input_features"]
    reference = models.fms.get_audio_features(features)
    for _ in range(2):
        out = run_audio_features(models, impl, features)
    durations = []
    benchmark.pedantic(timed(lambda: run_audio_features(models, impl, features), durations), rounds=10, iterations=1)
    ms = statistics.median(durations) * 1e3
    diff = (out.float() - reference.float()).abs().max().item()
    results.add(models.variant, f"encoder_projector_{seconds}s", impl, ms, "ms", audio_tokens=out.size(1),
                max_abs_diff_vs_fms_eager=diff)
    assert out.shape == reference.shape
    if impl == "fast":  # the graph replays the same kernels as the eager call
        assert diff == 0.0, f"graphed encoder differs from the eager one by {diff}"
    elif impl.startswith("fast_encoder"):  # compiled: other kernels, so other rounding; judged against fp32 eager
        measured = assert_compiled_parity(f"{impl} audio", reference, out, lambda: fp32_audio_features(models, features),
                                          dtype=DTYPE, device=DEVICE)
        results.rows[-1].update(measured)


@pytest.mark.parametrize("impl", GENERATE_IMPLS)
@torch.no_grad()
def test_prefill(benchmark, models, results, impl):
    inputs = models.inputs(LONGEST_AUDIO_S)
    start = time.perf_counter()
    run_generate(models, impl, inputs, 2)  # warm-up; for the fast paths also graph capture / compile
    synchronize()
    if impl in ("fast", "fast_compiled", "fast_autotuned", "fast_static_prefill", "hf_static"):
        results.add(models.variant, "warmup", impl, time.perf_counter() - start, "s",
                    what="first call: encoder graph, prefill and batch-1 decode graph captures (and compile)" if impl != "hf_static"
                    else "first call: transformers compiles the decode forward for the static cache")
    durations = []
    benchmark.pedantic(timed(lambda: run_generate(models, impl, inputs, 1), durations), rounds=5, iterations=1)
    results.add(models.variant, "prefill", impl, statistics.median(durations) * 1e3, "ms",
                prompt_tokens=inputs["input_ids"].size(1))


@pytest.mark.parametrize("batch", (1, 8))
@pytest.mark.parametrize("impl", GENERATE_IMPLS)
@torch.no_grad()
def test_decode(benchmark, models, results, copy_bandwidth, impl, batch):
    inputs = models.inputs(LONGEST_AUDIO_S, batch=batch)
    prompt_len = inputs["input_ids"].size(1)
    run_generate(models, impl, inputs, 2)  # warm-up (captures this batch size's graph)
    one_token_s = median_seconds(lambda: run_generate(models, impl, inputs, 1), rounds=3)

    durations = []
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    tokens = benchmark.pedantic(
        timed(lambda: run_generate(models, impl, inputs, MAX_NEW_TOKENS), durations), rounds=ROUNDS[impl], iterations=1
    )
    transient = torch.cuda.max_memory_allocated() - resident if DEVICE.type == "cuda" else 0
    full_s = statistics.median(durations)
    models.tokens[(impl, batch)] = tokens[:, prompt_len:].cpu()

    per_token_ms = (full_s - one_token_s) / (MAX_NEW_TOKENS - 1) * 1e3
    kv_bytes = kv_cache_bytes(models, batch, prompt_len + MAX_NEW_TOKENS // 2)  # mean cache length read per step
    floor_ms = (models.decoder_bytes + kv_bytes) / copy_bandwidth * 1e3
    results.add(models.variant, f"decode_b{batch}", impl, per_token_ms, "ms/token", batch=batch,
                one_token_s=one_token_s, full_s=full_s, floor_ms=floor_ms, over_floor=per_token_ms / floor_ms)
    if impl == "fast":
        results.add(models.variant, "decode_floor", "all", floor_ms, "ms/step", batch=batch,
                    decoder_GiB=models.decoder_bytes / 2**30, kv_cache_GiB=kv_bytes / 2**30,
                    copy_bandwidth_TBps=copy_bandwidth / 1e12)
    print(f"\n{models.variant} {impl} batch {batch}: decode {per_token_ms:.2f} ms/token "
          f"(floor {floor_ms:.2f} ms: weights + KV / copy bandwidth; {per_token_ms / floor_ms:.1f}x)")
    if batch == 1:
        results.add(models.variant, "e2e_30s_128", impl, full_s, "s")
        results.add(models.variant, "rtf_30s_128", impl, full_s / LONGEST_AUDIO_S, "")
        generator = models.generators.get(impl)
        state_bytes = generator.static_bytes(batch) if generator is not None else 0  # allocated before the run
        if impl == "hf_static":
            state_bytes = kv_cache_bytes(models, batch, models.max_len())
        peak = model_bytes(models, impl) + state_bytes + transient
        results.add(models.variant, "peak_memory", impl, peak / 2**30, "GiB", weights_GiB=model_bytes(models, impl) / 2**30,
                    static_cache_GiB=state_bytes / 2**30, transient_peak_GiB=transient / 2**30)
    assert tokens.shape == (batch, prompt_len + MAX_NEW_TOKENS)


@pytest.mark.parametrize("batch", (1, 8))
@torch.no_grad()
def test_fast_graph_replay_equals_eager_step(models, results, batch):
    """The CUDA-graph replay gives the tokens of the same decode step run eagerly (same kernels, same order)."""
    inputs = models.inputs(LONGEST_AUDIO_S, batch=batch, seed=1)
    graphed = models.generator("fast").generate(**inputs, max_new_tokens=32)
    eager = models.generator("fast_eager").generate(**inputs, max_new_tokens=32)
    fms_tokens = run_generate(models, "fms", inputs, 32)
    prompt_len = inputs["input_ids"].size(1)
    agree = (graphed[:, prompt_len:] == fms_tokens[:, prompt_len:]).float().mean().item()
    results.add(models.variant, f"graph_vs_eager_b{batch}", "fast", float(torch.equal(graphed, eager)), "bool",
                token_agreement_with_fms_eager=agree)
    assert torch.equal(graphed, eager), "graph replay and eager decode step disagree"


@pytest.mark.parametrize("impl", ("fast", "fast_compiled"))
@torch.no_grad()
def test_profile_decode_step(models, results, impl):
    """Where a decode step's time goes: kernel count and GPU time by kind (eager steps under the profiler), next to
    the graph-replayed step time."""
    if DEVICE.type != "cuda":
        pytest.skip("kernel profile needs CUDA")
    inputs = models.inputs(LONGEST_AUDIO_S)
    graphed = models.generator(impl)
    graphed.generate(**inputs, max_new_tokens=2)
    graphed.prefill(inputs["input_ids"], graphed.encode_audio(inputs["input_features"]),
                    inputs["input_features_mask"], inputs["attention_mask"])
    synchronize()
    start = time.perf_counter()
    for _ in range(GRAPH_TIMED_STEPS):
        graphed.decode_step()
    synchronize()
    graph_step_ms = (time.perf_counter() - start) / GRAPH_TIMED_STEPS * 1e3

    from granite_speech.fast_generate import StaticGenerator

    eager = StaticGenerator(models.fms, models.max_len(), use_cuda_graph=False, compile_step=impl == "fast_compiled")
    eager.prefill(inputs["input_ids"], eager.encode_audio(inputs["input_features"]),
                  inputs["input_features_mask"], inputs["attention_mask"])
    for _ in range(2):
        eager.decode_step()
    synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            eager.decode_step()
        synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    by_name = {}
    for event in kernels:
        name = event.name.lower()
        kind = ("gemm" if any(s in name for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk"))
                else "attention" if any(s in name for s in ("fmha", "attention", "flash")) else "other")
        us = event.time_range.elapsed_us()
        by_kind[kind] += us
        total, count = by_name.get(event.name, (0.0, 0))
        by_name[event.name] = (total + us, count + 1)
    per_step = {k: v / PROFILED_STEPS / 1e3 for k, v in by_kind.items()}
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    summary = {
        "kernels_per_step": len(kernels) / PROFILED_STEPS,
        "gpu_ms_per_step_by_kind": per_step,
        "gpu_ms_per_step": sum(per_step.values()),
        "graph_step_ms": graph_step_ms,
        "top_kernels": [{"name": n[:120], "ms_per_step": t / PROFILED_STEPS / 1e3, "per_step": c / PROFILED_STEPS}
                        for n, (t, c) in top],
    }
    results.note(f"{models.variant}_{impl}_decode_profile_b1", summary)
    results.add(models.variant, "graph_step_b1", impl, graph_step_ms, "ms/step", **{k: v for k, v in summary.items()
                                                                                  if k != "top_kernels"})
    print(f"\n{models.variant} {impl}: {summary['kernels_per_step']:.0f} kernels/step, GPU busy "
          f"{summary['gpu_ms_per_step']:.2f} ms ({per_step}), graph step {graph_step_ms:.2f} ms")
    assert summary["kernels_per_step"] > 0


_TRANSCRIPTS = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("decoder", ("eager", "fast"))
def test_transcribe_batch(benchmark, results, variant, decoder):
    """`transcribe` end to end as a user runs it (model load from the checkpoint folder included) on every bundled
    clip as one padded batch, with each decoding loop; the transcripts of both loops must be equal."""
    from granite_speech.__main__ import transcribe
    from granite_speech.audio import read_audio
    from parity.granite.fixtures import SPEECH_DIR, build_checkpoint

    folder = build_checkpoint(variant)
    clips = sorted(SPEECH_DIR.glob("*.flac"))
    audio_s = sum(read_audio(clip, 16000).numel() for clip in clips) / 16000

    def run():
        return transcribe(folder, clips, max_new_tokens=MAX_NEW_TOKENS, device=DEVICE, dtype=DTYPE,
                          decoder=decoder)

    texts = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _TRANSCRIPTS[variant, decoder] = texts
    other = _TRANSCRIPTS.get((variant, "eager" if decoder == "fast" else "fast"))
    assert other is None or other == texts, "the fast decoding loop transcribed differently from FMS generate"
    seconds = benchmark.stats.stats.median
    results.add(variant, f"transcribe {len(clips)} clips ({audio_s:.1f} s audio), load included", decoder,
                seconds * 1e3, "ms", rtfx=audio_s / seconds, texts=texts)


THROUGHPUT_BATCH = 64


@pytest.mark.parametrize("impl", THROUGHPUT_IMPLS)
@torch.no_grad()
def test_throughput_batch(benchmark, models, results, impl):
    """Batch throughput: 64 clips of 30 s, 128 new tokens each (forced), one `generate` call; RTFx = audio seconds
    per wall second, and peak memory, for the fast path and HF `generate` on the same inputs; how many rows give
    HF's tokens exactly is recorded (bf16 near-ties on random weights separate some)."""
    inputs = models.inputs(LONGEST_AUDIO_S, batch=THROUGHPUT_BATCH)
    run_generate(models, impl, inputs, 2)  # warm-up (captures this batch size's graph)
    durations = []
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = benchmark.pedantic(timed(lambda: run_generate(models, impl, inputs, MAX_NEW_TOKENS), durations),
                                rounds=2, iterations=1)
    wall = statistics.median(durations)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0
    # where the wall goes: the first token (encoder + prefill of the 64 prompts) against the 127 decode steps
    first_token_s = median_seconds(lambda: run_generate(models, impl, inputs, 1), rounds=2)
    results.add(models.variant, f"throughput_b{THROUGHPUT_BATCH}_30s_128", impl,
                THROUGHPUT_BATCH * LONGEST_AUDIO_S / wall, "RTFx", wall_s=wall, peak_GiB=peak,
                first_token_s=first_token_s, decode_ms_per_step=(wall - first_token_s) / (MAX_NEW_TOKENS - 1) * 1e3)
    print(f"\n{models.variant} {impl} batch {THROUGHPUT_BATCH}: {wall:.2f} s, RTFx "
          f"{THROUGHPUT_BATCH * LONGEST_AUDIO_S / wall:.0f}, peak {peak:.1f} GiB")
    assert tokens.shape == (THROUGHPUT_BATCH, inputs["input_ids"].size(1) + MAX_NEW_TOKENS)
    models.tokens[(impl, THROUGHPUT_BATCH)] = tokens[:, inputs["input_ids"].size(1):].cpu()
    other = models.tokens.get(("hf" if impl == "fast" else "fast", THROUGHPUT_BATCH))
    if other is not None and impl in ("fast", "hf"):  # greedy tokens agree where no bf16 near-tie separates them: record how many rows do
        results.add(models.variant, f"throughput_b{THROUGHPUT_BATCH}_rows_equal_hf", "fast",
                    float((other == models.tokens[(impl, THROUGHPUT_BATCH)]).all(dim=1).sum()), "rows")
