"""The static-cache fast path (`granite_speech.fast_generate`) at tiny dimensions in fp32, on the session's device.

Oracles: HF `generate` (the reference implementation) and FMS's own `fms.utils.generation.generate` driving the same
FMS model; and, per step, a full no-cache recompute of the model's logits. The checkpoint is the untied tiny fixture
(`fixed:tiny-untied/<device>/float32` in the test ids): its weights sit in the bug-revealing regime
(suites/test_fixture_regime.py holds them there: decoder attention far from uniform, so a RoPE position off by one
or a wrong GQA head mapping moves the logits), its GQA ratio is 3 and its LoRA changes tokens. fp32 because the
oracle is token equality, which 16-bit rounding would make fragile.

On a CUDA device the fast path runs as it does in production, replayed from CUDA graphs; the `gpu`-marked tests also
check the graph against the same step run eagerly, and the inductor-compiled step against eager, on the tiny fixture
(suites/test_fast_generate_session.py does so on the session model: --model, e.g. 2b on the GPU gate).
"""

import pytest
import torch
from fms.utils.generation import generate

from granite_speech.checkpoint import load_model
from granite_speech.fast_generate import StaticGenerator, generate_static
from granite_speech.model import padding_attn_kwargs
from parity.granite.fixtures import build_checkpoint
from parity.granite.hf import load_hf_model
from parity.granite.plugin import resolve_run_scope
from parity.testing import assert_parity

NEW_TOKENS = 32
# encoder frames per clip (3 audio tokens per 15 frames) and text tokens before the audio: different lengths, so
# the batch is left-padded and input_features_mask has ragged rows. No prompt is 2 tokens long (= tiny kvheads).
BATCHES = {"batch1": ([60], [4]), "batch3": ([60, 30, 45], [4, 7, 2])}
TEXT_AFTER_AUDIO = 5
# prompts are drawn from these seeds until HF's greedy output varies in every row
PROMPT_SEEDS = range(12)
MIN_DISTINCT_TOKENS = 12  # of NEW_TOKENS per row
MIN_CHANGED_BY_AUDIO = 0.25

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.runs_at("tiny-untied", dtype="float32")]


@pytest.fixture(scope="module")
def checkpoint():
    return build_checkpoint("tiny-untied")


@pytest.fixture(scope="module")
def fast_device(pytestconfig):
    """The session's device (--device): the fixed-size tests here follow it."""
    return resolve_run_scope(pytestconfig, "tiny-untied", dtype="float32").device


@pytest.fixture(scope="module")
def hf_model(checkpoint, fast_device):
    return load_hf_model(checkpoint, device=str(fast_device))


@pytest.fixture(scope="module")
def fms_model(checkpoint, fast_device):
    # the adapter kept separate: on with audio, off without (HF generate's behaviour)
    return load_model(checkpoint, lora_mode="audio_only", device=fast_device)


def make_prompts(frames, text_lens, audio_token, vocab, seed, device="cpu"):
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
    prompts = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                   input_features_mask=features_mask)
    return {k: v.to(device) for k, v in prompts.items()}


def distinct_per_row(tokens):
    return [len(set(row.tolist())) for row in tokens]


def hf_greedy(hf_model, prompts, new_tokens, eos_token_id=None, pad_token_id=0):
    return hf_model.generate(
        **prompts, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )


@pytest.fixture(scope="module")
def varied_prompts(hf_model, fms_model, fast_device):
    """batch name -> the first seeded prompts whose HF greedy continuation varies in every row."""
    cfg = fms_model.config
    found = {}
    for name, (frames, text_lens) in BATCHES.items():
        tried = []
        for seed in PROMPT_SEEDS:
            prompts = make_prompts(frames, text_lens, cfg.audio_token_index, cfg.text_config.src_vocab_size, seed,
                                   fast_device)
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


def assert_informative(tokens, prompt_len, other=None):
    """Varied rows that differ from each other, and (given the tokens for other audio) audio that changes them."""
    new = tokens[:, prompt_len:]
    distinct = distinct_per_row(new)
    assert min(distinct) >= MIN_DISTINCT_TOKENS, f"the reference rows hold only {distinct} distinct tokens"
    rows = [tuple(r) for r in new.tolist()]
    assert len(set(rows)) == len(rows), "two rows generated the same tokens"
    if other is not None:
        changed = (other[:, prompt_len:] != new).float().mean(-1).tolist()
        assert min(changed) >= MIN_CHANGED_BY_AUDIO, f"other audio changed only {changed} of each row"


def _other_audio(prompts):
    return dict(prompts, input_features=prompts["input_features"].flip(-1))


@torch.no_grad()
@pytest.mark.parametrize("static_prefill", [False, True], ids=["model_prefill", "static_prefill"])
def test_tokens_equal_hf_and_fms_generate(hf_model, fms_model, prompts, static_prefill):
    prompt_len = prompts["input_ids"].size(1)
    hf_tokens = hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert_informative(hf_tokens, prompt_len, hf_greedy(hf_model, _other_audio(prompts), NEW_TOKENS))
    fms_tokens = fms_greedy(fms_model, prompts, NEW_TOKENS)
    fast_tokens = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS, static_prefill=static_prefill)
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
    input_ids = torch.zeros(len(rows), length, dtype=torch.long, device=text["input_ids"].device)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = r
        attention_mask[i, length - len(r) :] = 1
    prompts = dict(input_ids=input_ids, attention_mask=attention_mask)
    hf_tokens = hf_greedy(hf_model, prompts, NEW_TOKENS)
    fast_tokens = generate_static(fms_model, **prompts, max_new_tokens=NEW_TOKENS)
    assert fms_model.lora is not None and not fms_model.lora.enabled
    assert_informative(hf_tokens, length)
    assert torch.equal(fast_tokens, hf_tokens), f"fast {fast_tokens[:, length:].tolist()} != HF {hf_tokens[:, length:].tolist()}"
    assert torch.equal(fast_tokens, fms_greedy(fms_model, prompts, NEW_TOKENS))


@torch.no_grad()
def test_step_logits_equal_full_recompute(fms_model, prompts, record_property):
    """Prefill and every static-cache decode step give the logits of a no-cache forward over the whole sequence
    (a RoPE position off by one moves them by ~1e-2 in this regime, against a measured floor of ~1e-6)."""
    prompt_len = prompts["input_ids"].size(1)
    generator = StaticGenerator(fms_model, prompt_len + NEW_TOKENS, use_cuda_graph=False)
    audio = generator.encode_audio(prompts["input_features"])
    torch.testing.assert_close(audio, fms_model.get_audio_features(prompts["input_features"]), rtol=0, atol=0)
    logits = generator.prefill(prompts["input_ids"], audio, prompts["input_features_mask"], prompts["attention_mask"])
    fast_steps, full_steps = [], []
    for step in range(NEW_TOKENS):
        length = prompt_len + step
        tokens = generator.tokens(length)
        ones = torch.ones(tokens.size(0), step, dtype=torch.long, device=tokens.device)
        mask = torch.cat([prompts["attention_mask"], ones], dim=1)
        full = fms_model(
            tokens,
            audio_embeds=audio,
            input_features_mask=prompts["input_features_mask"],
            **padding_attn_kwargs(mask),
        )[:, -1]
        fast_steps.append(logits.clone())
        full_steps.append(full)
        # the next token is the argmax of these logits
        assert torch.equal(generator.tokens(length + 1)[:, -1], full.argmax(-1)), f"step {step}"
        if step + 1 < NEW_TOKENS:
            logits = generator.decode_step()
    assert_parity("fast_step_logits", torch.stack(full_steps, 1), torch.stack(fast_steps, 1), dtype=torch.float32,
                  device=fms_model.language_model.head.weight.device, tolerance_class="logits",
                  record=record_property)


@torch.no_grad()
@pytest.mark.parametrize("batch", ["batch1", "batch3"])
def test_static_prefill_equals_model_forward_prefill(fms_model, varied_prompts, batch, record_property):
    """The static prefill (the step's layer math over the bucket-padded prompt, K/V written straight into the cache)
    against the model's own forward (static_prefill=False): the same last-position logits, the same first token and
    the same K/V in every layer's real cache columns. A prompt two tokens shorter (more bucket padding) gives the
    logits the model's forward gives for it, so the bucket's padding is masked."""
    prompts = varied_prompts[batch]
    prompt_len = prompts["input_ids"].size(1)
    fast, reference = (StaticGenerator(fms_model, prompt_len + 4, use_cuda_graph=False, static_prefill=static)
                       for static in (True, False))
    audio = fms_model.get_audio_features(prompts["input_features"])
    args = (prompts["input_ids"], audio, prompts["input_features_mask"], prompts["attention_mask"])
    fast_logits, reference_logits = fast.prefill(*args).clone(), reference.prefill(*args).clone()
    session, reference_session = fast._active, reference._active
    assert session.offset > 0, "the prompt fills its bucket exactly: its padding is not exercised"
    device = fms_model.language_model.head.weight.device
    assert_parity("static_prefill_logits", reference_logits, fast_logits, dtype=torch.float32, device=device,
                  tolerance_class="logits", record=record_property)
    assert torch.equal(fast.tokens(prompt_len + 1), reference.tokens(prompt_len + 1))
    real = prompts["attention_mask"].bool().to(device)
    offset = session.offset
    for layer, (fast_kv, reference_kv) in enumerate(zip(session.cache.columns(offset + prompt_len),
                                                        reference_session.cache.columns(prompt_len))):
        for name, got, want in zip("kv", fast_kv, reference_kv):
            # padding columns hold whatever pads compute; only the real tokens' K/V is compared
            got, want = got[:, :, offset:].transpose(1, 2)[real], want.transpose(1, 2)[real]
            assert_parity(f"static_prefill_layer{layer}_{name}", want, got, dtype=torch.float32, device=device,
                          tolerance_class="activation", record=record_property)
    # the first decode step reads that cache: same logits
    assert_parity("static_prefill_first_step", reference.decode_step(), fast.decode_step(), dtype=torch.float32,
                  device=device, tolerance_class="logits", record=record_property)
    # two columns fewer: the longest row loses two leading text tokens (every row has >= 2 before its audio)
    shorter = {k: v[:, 2:] if k in ("input_ids", "attention_mask") else v for k, v in prompts.items()}
    shorter_args = (shorter["input_ids"], audio, shorter["input_features_mask"], shorter["attention_mask"])
    assert_parity("static_prefill_more_padding", reference.prefill(*shorter_args), fast.prefill(*shorter_args),
                  dtype=torch.float32, device=device, tolerance_class="logits", record=record_property)
    assert fast._active.offset == offset + 2
    # text only (the placeholders replaced by a text token, no audio): the adapter is off in both
    text_ids = prompts["input_ids"].masked_fill(prompts["input_ids"] == fms_model.config.audio_token_index, 5)
    text_args = (text_ids, None, None, prompts["attention_mask"])
    assert_parity("static_prefill_text_only", reference.prefill(*text_args), fast.prefill(*text_args),
                  dtype=torch.float32, device=device, tolerance_class="logits", record=record_property)
    assert not fms_model.lora.enabled


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
def test_generator_reuse_resets_state(fms_model, varied_prompts, fast_device):
    """One generator (cache and state kept per batch size) gives each prompt the tokens a fresh one gives."""
    cfg = fms_model.config
    first = varied_prompts["batch3"]
    second = make_prompts([45, 45, 15], [3, 3, 8], cfg.audio_token_index, cfg.text_config.src_vocab_size, seed=99,
                          device=fast_device)
    generator = StaticGenerator(fms_model, max_len=128)
    reused = [generator.generate(**p, max_new_tokens=NEW_TOKENS) for p in (first, second, first)]
    fresh = [generate_static(fms_model, **p, max_new_tokens=NEW_TOKENS) for p in (first, second)]
    assert not torch.equal(fresh[0][:, -NEW_TOKENS:], fresh[1][:, -NEW_TOKENS:])
    assert torch.equal(reused[0], fresh[0]) and torch.equal(reused[1], fresh[1]) and torch.equal(reused[2], fresh[0])


@torch.no_grad()
def test_compiled_step_traces_without_graph_breaks(fms_model, varied_prompts):
    """compile_step=True: the step functions trace as whole graphs (aot_eager backend) with the same tokens."""
    prompts = varied_prompts["batch3"]
    torch._dynamo.reset()
    compiled = generate_static(fms_model, **prompts, max_new_tokens=8, compile_step=True, compile_backend="aot_eager",
                               use_cuda_graph=False)
    eager = generate_static(fms_model, **prompts, max_new_tokens=8, use_cuda_graph=False)
    assert torch.equal(compiled, eager)


def test_bad_inputs_raise_clear_errors(fms_model, fast_device):
    cfg = fms_model.config
    prompts = make_prompts([60, 30, 45], [4, 7, 2], cfg.audio_token_index, cfg.text_config.src_vocab_size, seed=0,
                           device=fast_device)
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


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
@pytest.mark.parametrize("encoder", [pytest.param("compiled", marks=pytest.mark.gpu), "flex"])
def test_compiled_encoders_give_the_eager_audio_and_hfs_tokens(fms_model, hf_model, varied_prompts, fast_device,
                                                               encoder, record_property):
    """`StaticGenerator(encoder=...)`: encoder + projector compiled, the block attention through SDPA's math kernel
    or `flex_attention`, replayed from the CUDA graph on GPU. The audio embeddings of the ragged batch equal the eager
    model's within the activation tolerance, and the greedy tokens equal HF's. On the CPU the graph is traced through
    aot_eager (inductor has no CPU kernel for this flex score_mod; 12 s a variant, so only flex runs there); on CUDA,
    inductor."""
    prompts = varied_prompts["batch3"]
    backend = "inductor" if fast_device.type == "cuda" else "aot_eager"
    length = prompts["input_ids"].size(1)
    generator = StaticGenerator(fms_model, length + NEW_TOKENS, compile_backend=backend, encoder=encoder)
    assert_parity(f"{encoder}_encoder_audio", fms_model.get_audio_features(prompts["input_features"]),
                  generator.encode_audio(prompts["input_features"]), dtype=torch.float32, device=fast_device,
                  record=record_property)
    assert all(layer.attn.kernel == "math" for layer in fms_model.encoder.layers), "the kernel was not restored"
    tokens = generator.generate(**prompts, max_new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, hf_greedy(hf_model, prompts, NEW_TOKENS))
    with pytest.raises(ValueError, match="encoder must be one of"):
        StaticGenerator(fms_model, 16, encoder="flash")


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.parametrize("compile_step", [False, True], ids=["graphed", "compiled"])
def test_splitk_gemv_gives_hfs_tokens(fms_model, hf_model, varied_prompts, compile_step):
    """`StaticGenerator(gemv="splitk")` on the card: the decode step's weight products by the Triton split-K kernel,
    replayed from the CUDA graph (and inside the inductor-compiled step): both batches' greedy tokens equal HF's.
    (The CPU runs the same kernel through Triton's interpreter: suites/test_gemv.py.)"""
    for name, prompts in varied_prompts.items():
        generator = StaticGenerator(fms_model, prompts["input_ids"].size(1) + NEW_TOKENS, compile_step=compile_step,
                                    gemv="splitk")
        tokens = generator.generate(**prompts, max_new_tokens=NEW_TOKENS)
        assert torch.equal(tokens, hf_greedy(hf_model, prompts, NEW_TOKENS)), name


@pytest.mark.parametrize("kwargs, message", [
    ({"compile_step": True, "compile_mode": "reduce-overhead"}, "compile_mode must be one of"),
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "needs something compiled"),
    ({"compile_step": True, "compile_mode": "default", "compile_backend": "aot_eager"}, "an inductor setting"),
])
def test_compile_mode_is_refused_where_it_cannot_apply(fms_model, kwargs, message):
    """Modes that capture CUDA graphs of their own would nest inside the generator's; a mode with nothing compiled,
    or for a backend that has no modes, would be ignored: each is refused, naming what was wrong."""
    with pytest.raises(ValueError, match=message):
        StaticGenerator(fms_model, 16, **kwargs)


def test_gemv_choice_is_refused_where_it_cannot_apply(fms_model, fast_device, monkeypatch):
    """An unknown gemv, and the Triton split-K kernel off CUDA (outside Triton's interpreter), are refused before
    anything runs (suites/test_gemv.py runs it on the CPU in an interpreter of its own: TRITON_INTERPRET is read when
    Triton is first imported, so it is not switched on in this process)."""
    with pytest.raises(ValueError, match="gemv must be one of"):
        StaticGenerator(fms_model, 16, gemv="cutlass")
    if fast_device.type == "cuda":
        assert StaticGenerator(fms_model, 16, gemv="splitk").spec.splitk_rows == 8
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton kernel for CUDA, and the model is on cpu"):
        StaticGenerator(fms_model, 16, gemv="splitk")


# ----------------------------------------------------------------------------------------------- CUDA graphs
def _graph_vs_eager(model, prompts, new_tokens, compile_step=False, static_prefill=False, compile_mode=None):
    graphed = StaticGenerator(model, prompts["input_ids"].size(1) + new_tokens, use_cuda_graph=True,
                              compile_step=compile_step, static_prefill=static_prefill, compile_mode=compile_mode)
    eager = StaticGenerator(model, prompts["input_ids"].size(1) + new_tokens, use_cuda_graph=False,
                            static_prefill=static_prefill)
    assert graphed.use_cuda_graph, "the CUDA graph path is not taken"
    return graphed.generate(**prompts, max_new_tokens=new_tokens), eager.generate(**prompts, max_new_tokens=new_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("static_prefill", [False, True], ids=["model_prefill", "static_prefill"])
@torch.no_grad()
def test_cuda_graph_replay_equals_eager_step(fms_model, prompts, fast_device, static_prefill):
    """The graph-replayed decode step (and audio encode, and with static_prefill the graphed prefill) gives the
    tokens of the same steps run eagerly."""
    if fast_device.type != "cuda":
        pytest.skip("needs a CUDA device: run with --device cuda")
    graphed, eager = _graph_vs_eager(fms_model, prompts, NEW_TOKENS, static_prefill=static_prefill)
    assert_informative(eager, prompts["input_ids"].size(1))
    assert torch.equal(graphed, eager), "graph replay and eager decode step disagree"


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode, batch", [(None, "batch1"), (None, "batch3"),
                                                 ("max-autotune-no-cudagraphs", "batch1")],
                         ids=["default-batch1", "default-batch3", "autotuned-batch1"])
@torch.no_grad()
def test_inductor_compiled_graph_equals_eager_step(fms_model, varied_prompts, fast_device, compile_mode, batch):
    """compile_step=True with inductor (and with its GEMM autotuning), replayed from a CUDA graph: the tokens of the
    eager step. The autotuned mode at batch 1 only: it changes which GEMM kernels run, not the step's batch handling
    (the default mode's batch-3 case), and its batch-3 autotuning took 45 s of the 2b gate's 205 s
    (results/gpu-h100-2026-12-07e/log-gate-2b.txt)."""
    if fast_device.type != "cuda":
        pytest.skip("needs a CUDA device: run with --device cuda")
    prompts = varied_prompts[batch]
    torch._dynamo.reset()
    compiled, eager = _graph_vs_eager(fms_model, prompts, 16, compile_step=True, compile_mode=compile_mode)
    assert torch.equal(compiled, eager), "compiled graph and eager decode step disagree"
