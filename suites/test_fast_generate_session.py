"""The fast path on the session model (--model / --device / --dtype; 2b on the GPU gate): the CUDA-graph-replayed
decode step gives the tokens of the same step run eagerly, on a real clip through the checkpoint's own processor.

A module of its own because suites/test_fast_generate.py overrides `fms_model` with its tiny fixture: a test there
that asked for the session's processor got a 2b tokenizer's ids fed to the tiny model (a device-side assert on the
GPU gate, which poisoned every later CUDA test of the run).
"""

import pytest
import torch

from granite_speech.checkpoint import load_model
from granite_speech.fast_generate import StaticGenerator

pytestmark = [pytest.mark.gpu, pytest.mark.runs_at("session")]

NEW_TOKENS = 32
MIN_DISTINCT_TOKENS = 8  # of NEW_TOKENS: a model that repeats one token would make the comparison empty


@pytest.fixture(scope="module")
def audio_only_model(checkpoint_dir, device, dtype):
    # the adapter kept separate and switched on by the audio, as transcribe runs it
    return load_model(checkpoint_dir, lora_mode="audio_only", dtype=dtype, device=device)


@pytest.mark.parametrize("static_prefill", [False, True], ids=["model_prefill", "static_prefill"])
@torch.no_grad()
def test_cuda_graph_replay_equals_eager_step_on_session_model(device, speech_dataset, hf_processor, audio_only_model,
                                                              static_prefill):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device: run with --device cuda")
    dtype = audio_only_model.language_model.head.weight.dtype
    # the clip nearest 4 s whose greedy tokens are not degenerate: a seeded random model (tiny) repeats itself on
    # some clips, and which ones depends on the device's rounding
    for row in sorted(speech_dataset, key=lambda r: abs(len(r["audio"]["array"]) - 64000)):
        inputs = hf_processor(text=["<|audio|> transcribe"], audio=[torch.tensor(row["audio"]["array"])],
                              return_tensors="pt")
        prompts = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                   for k, v in inputs.items()
                   if k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
        max_len = prompts["input_ids"].size(1) + NEW_TOKENS
        eager = StaticGenerator(audio_only_model, max_len, use_cuda_graph=False, static_prefill=static_prefill)
        eager_tokens = eager.generate(**prompts, max_new_tokens=NEW_TOKENS)
        if len(set(eager_tokens[0, -NEW_TOKENS:].tolist())) >= MIN_DISTINCT_TOKENS:
            break
    else:
        pytest.fail(f"degenerate generation on every clip (fewer than {MIN_DISTINCT_TOKENS} distinct tokens of "
                    f"{NEW_TOKENS}): nothing to compare")
    graphed = StaticGenerator(audio_only_model, max_len, use_cuda_graph=True, static_prefill=static_prefill)
    assert graphed.use_cuda_graph, "the CUDA graph path is not taken"
    graphed_tokens = graphed.generate(**prompts, max_new_tokens=NEW_TOKENS)
    assert torch.equal(graphed_tokens, eager_tokens), "graph replay and eager decode step disagree"
