"""The static-cache fast path (`granite_speech.fast_generate`) on CPU at tiny dimensions, fp32.

Oracles: HF `generate` (the reference implementation) and FMS's own `fms.utils.generation.generate` driving the same
FMS model; and, per step, a full no-cache recompute of the model's logits. The checkpoint is the untied tiny
fixture: the tied tiny model, with random weights, greedily repeats one token, which would make token equality weak.

At the fixture's init scale (std 0.02) the tiny decoder's attention is nearly uniform, so it hardly depends on token
positions (a RoPE position off by one moves its logits by 1e-6). The per-step logits are therefore also checked on a
"sharpened" copy: q/k projections x16 (std ~0.3) and the head x30 (std ~0.6), where that error moves them by 1e-2.
"""

import pytest
import torch
from fms.utils.generation import generate

from granite_speech.fast_generate import StaticGenerator, generate_static
from granite_speech.model import padding_attn_kwargs
from parity.granite.fixtures import build_checkpoint
from parity.granite.hf import load_hf_model
from granite_speech.checkpoint import load_model

NEW_TOKENS = 32
LOGITS_ATOL = 1e-4
# encoder frames per clip (3 audio tokens per 15 frames) and text tokens before the audio: different lengths, so
# the batch is left-padded and input_features_mask has ragged rows. No prompt is 2 tokens long (= tiny kvheads).
BATCHES = {"batch1": ([60], [4]), "batch3": ([60, 30, 45], [4, 7, 2])}
TEXT_AFTER_AUDIO = 5
# prompts are drawn from these seeds until HF's greedy output varies in every row (a random tiny model often falls
# into short cycles, which would make token equality a weak check)
PROMPT_SEEDS = range(12)
MIN_DISTINCT_TOKENS = 8
SHARPEN_QK, SHARPEN_HEAD = 16.0, 30.0


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoint():
    return build_checkpoint("tiny-untied")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return load_hf_model(checkpoint)


@pytest.fixture(scope="module")
def fms_model(checkpoint):
    # the adapter kept separate: on with audio, off without (HF generate's behaviour)
    return load_model(checkpoint, lora_mode="audio_only")


@pytest.fixture(scope="module")
def sharp_model(checkpoint):
    model = load_model(checkpoint, lora_mode="audio_only")
    with torch.no_grad():
        for block in model.language_model.base_model.layers:
            in_proj = block.attn.in_proj
            in_proj.qkv_fused.weight[: sum(in_proj.splits[:2])] *= SHARPEN_QK
        model.language_model.head.weight *= SHARPEN_HEAD
    return model


def make_prompts(frames, text_lens, audio_token, vocab, seed):
    """Random log-mel-like features and left-padded prompts `text <|audio|>*n text` (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    n_audio = [3 * -(-f // 15) for f in frames]
    features = torch.zeros(len(frames), max(frames), 160)
    features_mask = torch.zeros(len(frames), max(n_audio), dtype=torch.bool)
    rows = []
    for i, (f, n, t) in enumerate(zip(frames, n_audio, text_lens)):
        features[i, :f] = torch.randn(f, 160, generator=gen)
        features_mask[i, :n] = True
        before = torch.randint(1, vocab - 1, (t,), generator=gen)
        after = torch.randint(1, vocab - 1, (TEXT_AFTER_AUDIO,), generator=gen)
        rows.append(torch.cat([before, torch.full((n,), audio_token), after]))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                input_features_mask=features_mask)


def distinct_per_row(tokens):
    return [len(set(row.tolist())) for row in tokens]


@pytest.fixture(scope="module")
def varied_prompts(hf_model, fms_model):
    """batch name -> the first seeded prompts whose HF greedy continuation varies in every row."""
    cfg = fms_model.config
    found = {}
    for name, (frames, text_lens) in BATCHES.items():
        tried = []
        for seed in PROMPT_SEEDS:
            prompts = make_prompts(frames, text_lens, cfg.audio_token_index, cfg.text_config.src_vocab_size, seed)
            distinct = distinct_per_row(hf_greedy(hf_model, prompts, NEW_TOKENS)[:, prompts["input_ids"].size(1) :])
            tried.append(distinct)
            if min(distinct) >= MIN_DISTINCT_TOKENS:
                found[name] = prompts
                break
        assert name in found, f"{name}: no seed gives varied HF continuations (distinct tokens per row: {tried})"
    return found


@pytest.fixture(scope="module", params=list(BATCHES))
def prompts(request, varied_prompts):
    return varied_prompts[request.param]


def hf_greedy(hf_model, prompts, new_tokens, eos_token_id=None, pad_token_id=0):
    return hf_model.generate(
        **prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )


def fms_greedy(fms_model, prompts, new_tokens):
    prompt_len = prompts["input_ids"].size(1)
    extra = padding_attn_kwargs(prompts["attention_mask"])
    if "input_features" in prompts:
        extra.update(input_features=prompts["input_features"], input_features_mask=prompts["input_features_mask"])
    return generate(
        fms_model,
        prompts["input_ids"],
        max_seq_len=prompt_len + new_tokens,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        prepare_model_inputs_hook=fms_model.prepare_inputs_for_generation,
        extra_kwargs=extra,
    )


def assert_diverse(tokens):
    distinct = distinct_per_row(tokens)
    assert min(distinct) >= MIN_DISTINCT_TOKENS, f"the reference rows hold only {distinct} distinct tokens"


@torch.no_grad()
def test_tokens_equal_hf_and_fms_generate(hf_model, fms_model, prompts):
    prompt_len = prompts["input_ids"].size(1)
    hf_tokens = hf_greedy(hf_model, prompts, NEW_TOKENS)
    fms_tokens = fms_greedy(fms_model, prompts, NEW_TOKENS)
    fast_tokens = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS)
    assert_diverse(hf_tokens[:, prompt_len:])
    assert fast_tokens.shape == hf_tokens.shape == (prompts["input_ids"].size(0), prompt_len + NEW_TOKENS)
    assert torch.equal(fast_tokens, hf_tokens), f"fast {fast_tokens[:, prompt_len:].tolist()} != HF {hf_tokens[:, prompt_len:].tolist()}"
    assert torch.equal(fast_tokens, fms_tokens), f"fast {fast_tokens[:, prompt_len:].tolist()} != FMS {fms_tokens[:, prompt_len:].tolist()}"


@torch.no_grad()
def test_text_only_prompt_runs_without_adapter(hf_model, fms_model, varied_prompts):
    """No audio: HF disables the adapter in generate, GraniteSpeech.forward turns it off; the fast path must too."""
    text = varied_prompts["batch3"]
    # keep only the text around the audio: drop the audio tokens and re-left-pad
    rows = [r[(m == 1) & (r != fms_model.config.audio_token_index)] for r, m in zip(text["input_ids"], text["attention_mask"])]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = r
        attention_mask[i, length - len(r) :] = 1
    prompts = dict(input_ids=input_ids, attention_mask=attention_mask)
    hf_tokens = hf_greedy(hf_model, prompts, NEW_TOKENS)
    fast_tokens = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS)
    assert fms_model.lora is not None and not fms_model.lora.enabled
    assert_diverse(hf_tokens[:, length:])
    assert torch.equal(fast_tokens, hf_tokens), f"fast {fast_tokens[:, length:].tolist()} != HF {hf_tokens[:, length:].tolist()}"
    assert torch.equal(fast_tokens, fms_greedy(fms_model, prompts, NEW_TOKENS))


@pytest.mark.parametrize("which", ["fixture", "sharpened"])
@torch.no_grad()
def test_step_logits_equal_full_recompute(fms_model, sharp_model, prompts, which):
    """Prefill and every static-cache decode step give the logits of a no-cache forward over the whole sequence."""
    fms_model = sharp_model if which == "sharpened" else fms_model
    prompt_len = prompts["input_ids"].size(1)
    generator = StaticGenerator(fms_model, prompt_len + NEW_TOKENS, use_cuda_graph=False)
    audio = generator.encode_audio(prompts["input_features"])
    torch.testing.assert_close(audio, fms_model.get_audio_features(prompts["input_features"]), rtol=0, atol=0)
    logits = generator.prefill(prompts["input_ids"], audio, prompts["input_features_mask"], prompts["attention_mask"])
    for step in range(NEW_TOKENS):
        length = prompt_len + step
        tokens = generator.tokens(length)
        mask = torch.cat([prompts["attention_mask"], torch.ones(tokens.size(0), step, dtype=torch.long)], dim=1)
        full = fms_model(
            tokens,
            audio_embeds=audio,
            input_features_mask=prompts["input_features_mask"],
            **padding_attn_kwargs(mask),
        )[:, -1]
        torch.testing.assert_close(logits, full, rtol=0, atol=LOGITS_ATOL, msg=lambda m: f"step {step}: {m}")
        # the next token is the argmax of these logits
        assert torch.equal(generator.tokens(length + 1)[:, -1], full.argmax(-1))
        if step + 1 < NEW_TOKENS:
            logits = generator.decode_step().clone()


@torch.no_grad()
def test_sharpened_model_tokens_equal_fms_generate(sharp_model, prompts):
    fast_tokens = generate_static(sharp_model, **prompts, max_new_tokens=NEW_TOKENS)
    fms_tokens = fms_greedy(sharp_model, prompts, NEW_TOKENS)
    assert_diverse(fms_tokens[:, prompts["input_ids"].size(1) :])
    assert torch.equal(fast_tokens, fms_tokens)


@torch.no_grad()
def test_eos_pads_finished_rows_and_stops_like_hf(hf_model, fms_model, varied_prompts):
    prompts = varied_prompts["batch3"]
    prompt_len = prompts["input_ids"].size(1)
    free_run = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS)[:, prompt_len:]
    # eos := a token that several rows emit, first at different steps: those rows finish at different times and,
    # keeping only them, generation stops before NEW_TOKENS
    first_step = {}
    for row, tokens in enumerate(free_run.tolist()):
        for step, token in enumerate(tokens):
            first_step.setdefault(token, {}).setdefault(row, step)
    usable = {t: steps for t, steps in first_step.items() if len(steps) >= 2 and len(set(steps.values())) > 1}
    assert usable, f"no token emitted by two rows at different steps in {free_run.tolist()}"
    eos = max(usable, key=lambda t: (len(usable[t]), -max(usable[t].values())))
    rows = sorted(usable[eos])
    prompts = {k: v[rows] for k, v in prompts.items()}
    pad = 7  # not 0, so padding is told apart from the config's eos/pad id
    hf_tokens = hf_greedy(hf_model, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
    fast_tokens = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
    assert hf_tokens.size(1) == prompt_len + max(usable[eos].values()) + 1 < prompt_len + NEW_TOKENS
    assert (hf_tokens[:, prompt_len:] == pad).any(), "no row was padded after its eos"
    assert torch.equal(fast_tokens, hf_tokens), f"fast {fast_tokens[:, prompt_len:].tolist()} != HF {hf_tokens[:, prompt_len:].tolist()}"


@torch.no_grad()
def test_generator_reuse_resets_state(fms_model, varied_prompts):
    """One generator (cache and state kept per batch size) gives each prompt the tokens a fresh one gives."""
    cfg = fms_model.config
    first = varied_prompts["batch3"]
    second = make_prompts([45, 45, 15], [3, 3, 8], cfg.audio_token_index, cfg.text_config.src_vocab_size, seed=99)
    generator = StaticGenerator(fms_model, max_len=128, use_cuda_graph=False)
    reused = [generator.generate(**p, max_new_tokens=NEW_TOKENS) for p in (first, second, first)]
    fresh = [generate_static(fms_model, **p, max_new_tokens=NEW_TOKENS) for p in (first, second)]
    assert torch.equal(reused[0], fresh[0]) and torch.equal(reused[1], fresh[1]) and torch.equal(reused[2], fresh[0])


@torch.no_grad()
def test_compiled_step_traces_without_graph_breaks(fms_model, varied_prompts):
    """compile_step=True: the step functions trace as whole graphs (aot_eager backend on CPU) with the same tokens."""
    prompts = varied_prompts["batch3"]
    torch._dynamo.reset()
    compiled = generate_static(fms_model, **prompts, max_new_tokens=8, compile_step=True, compile_backend="aot_eager")
    eager = generate_static(fms_model, **prompts, max_new_tokens=8)
    assert torch.equal(compiled, eager)


def test_bad_inputs_raise_clear_errors(fms_model):
    cfg = fms_model.config
    prompts = make_prompts([60, 30, 45], [4, 7, 2], cfg.audio_token_index, cfg.text_config.src_vocab_size, seed=0)
    right_padded = prompts["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        generate_static(fms_model, **{**prompts, "attention_mask": right_padded}, max_new_tokens=4)
    generator = StaticGenerator(fms_model, max_len=prompts["input_ids"].size(1) + 4, use_cuda_graph=False)
    with pytest.raises(ValueError, match="exceeds the cache"):
        generator.generate(**prompts, max_new_tokens=generator.max_len)
    with pytest.raises(ValueError, match="LongTensor"):
        generator.prefill(prompts["input_ids"].float())
    with pytest.raises(TypeError, match="GraniteSpeech"):
        StaticGenerator(fms_model.language_model, max_len=16)
