"""Same seed -> same bits: fixture checkpoints rebuilt in other cache folders are byte-identical, FMS forwards and
greedy generation repeat exactly (also in a fresh process), and a different seed really changes the weights.

Digests are sha256 over the raw bytes of a tensor, so "identical" means bit-identical, not close. The fixture-builder
checks use the tiny variant on the CPU whatever `--model` is (the builder is the same code for every size; the test id
says `fixed:tiny/cpu/float32`); the repeat-forward and repeat-generation checks run on the session's model, device and
dtype (`model:...`), and first make sure there is something to repeat: varied tokens that other inputs change.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from fms.utils.generation import generate
from safetensors.torch import load_file

from granite_speech.features import GraniteSpeechFeatureExtractor
from parity.granite.fixtures import build_checkpoint
from parity.granite.launches import launch_fixture, launch_logged
from granite_speech.checkpoint import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# adapter_config.json records where its base model was written (as PEFT does): the one field allowed to differ
# between two cache folders
PATH_FIELDS = {"adapter_config.json": ("base_model_name_or_path",)}


FIXED = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")
SESSION = pytest.mark.runs_at("session")
NEW_TOKENS = 12
MIN_DISTINCT_TOKENS = 5


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()


def seeded_inputs(config, seed: int, device="cpu", dtype=torch.float32):
    """A prompt with one window's worth of audio tokens around text, and matching features."""
    q, window = config.projector_config.queries_per_window, config.projector_config.window_size
    g = torch.Generator().manual_seed(seed)
    frames = 2 * window + 3
    tokens = -(-frames // window) * q
    text = torch.randint(1, 200, (1, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((1, tokens), config.audio_token_index), text[:, 3:]], dim=1)
    features = torch.randn(1, frames, config.encoder_config.input_dim, generator=g)
    return ids.to(device), features.to(device, dtype)


def logits_digest(folder: str, seed: int, num_threads: int) -> str:
    """sha256 of the tiny model's logits on seeded inputs; also run in a fresh process by the test below."""
    torch.set_num_threads(num_threads)
    model = load_model(folder)
    ids, features = seeded_inputs(model.config, seed)
    with torch.no_grad():
        return tensor_digest(model(ids, input_features=features))


def _file_digests(folder: Path) -> dict:
    digests = {}
    for path in sorted(folder.iterdir()):
        if path.name in PATH_FIELDS:
            content = json.loads(path.read_text())
            for field in PATH_FIELDS[path.name]:
                content.pop(field)
            data = json.dumps(content, sort_keys=True).encode()
        else:
            data = path.read_bytes()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.fixture(scope="module")
def tiny_seed0():
    return build_checkpoint("tiny", seed=0)


@FIXED
def test_rebuilding_the_fixture_in_other_folders_is_byte_identical(tiny_seed0, tmp_path):
    first = build_checkpoint("tiny", seed=0, cache_dir=tmp_path / "cache-a")
    second = build_checkpoint("tiny", seed=0, cache_dir=tmp_path / "cache-b")
    assert first != second and first.parent != tiny_seed0.parent
    digests = _file_digests(first)
    assert sum(name.endswith(".safetensors") for name in digests) >= 3  # >= 2 model shards + the adapter
    assert _file_digests(second) == digests
    # and the cached folder the other suites use is what a fresh build gives
    assert _file_digests(tiny_seed0) == digests


@FIXED
def test_a_different_seed_changes_every_weight(tiny_seed0, tmp_path):
    other = build_checkpoint("tiny", seed=1, cache_dir=tmp_path / "cache")
    names = sorted(p.name for p in tiny_seed0.glob("*.safetensors"))
    assert names == sorted(p.name for p in other.glob("*.safetensors"))
    unchanged = []
    for name in names:
        a, b = load_file(str(tiny_seed0 / name)), load_file(str(other / name))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), name
        unchanged += [f"{name}:{k}" for k in a if a[k].is_floating_point() and torch.equal(a[k], b[k])]
    assert not unchanged, f"tensors identical under seeds 0 and 1: {unchanged}"


@SESSION
@torch.no_grad()
def test_two_forwards_give_identical_bits(fms_model, device, dtype, seed, record_property):
    ids, features = seeded_inputs(fms_model.config, seed, device, dtype)
    first = fms_model(ids, input_features=features)
    second = fms_model(ids, input_features=features)
    record_property("logits_sha256", tensor_digest(first))
    assert tensor_digest(first) == tensor_digest(second)
    assert torch.equal(first, second)
    # the digest is sensitive: other inputs give other bits
    other_ids, other_features = seeded_inputs(fms_model.config, seed + 1, device, dtype)
    assert tensor_digest(fms_model(other_ids, input_features=other_features)) != tensor_digest(first)


@FIXED
def test_two_loads_of_one_checkpoint_give_identical_bits(tiny_seed0):
    digests = [logits_digest(str(tiny_seed0), seed=5, num_threads=torch.get_num_threads()) for _ in range(2)]
    assert digests[0] == digests[1]


def _fresh_process_digest(folder: Path):
    """The tiny fixture's logits digest computed by a fresh interpreter (started when collection ends)."""
    threads = torch.get_num_threads()
    (folder / "threads").write_text(str(threads))
    code = (
        "import sys; sys.path.insert(0, 'suites'); from test_determinism import logits_digest; "
        "print(logits_digest(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return launch_logged([sys.executable, "-c", code, str(build_checkpoint("tiny", seed=0)), "5", str(threads)],
                         folder, cwd=REPO_ROOT, env=env)


EARLY_LAUNCHES = {"fresh_process": _fresh_process_digest}  # started when collection ends (see the plugin)


fresh_process = launch_fixture("fresh_process")


@FIXED
def test_a_fresh_process_gives_identical_bits(fresh_process, tiny_seed0):
    result, folder = fresh_process
    here = logits_digest(str(tiny_seed0), seed=5, num_threads=int((folder / "threads").read_text()))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == here


@pytest.mark.runs_at("no-model", device="cpu", dtype="float32")
def test_feature_extraction_repeats_exactly():
    extractor = GraniteSpeechFeatureExtractor()
    g = torch.Generator().manual_seed(9)
    clips = [torch.randn(n, generator=g) * 0.1 for n in (4_000, 9_001, 16_000)]
    first, second = extractor(clips), extractor(clips)
    assert tensor_digest(first["input_features"]) == tensor_digest(second["input_features"])
    assert torch.equal(first["input_features_mask"], second["input_features_mask"])


@SESSION
@torch.no_grad()
def test_greedy_generation_repeats_exactly(fms_model, device, dtype, seed, record_property):
    def run(inputs_seed):
        ids, features = seeded_inputs(fms_model.config, inputs_seed, device, dtype)
        out = generate(
            fms_model, ids, max_seq_len=ids.size(1) + NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=False,
            use_cache=True, prepare_model_inputs_hook=fms_model.prepare_inputs_for_generation,
            extra_kwargs={"input_features": features},
        )
        assert out.size(1) == ids.size(1) + NEW_TOKENS
        return out[:, ids.size(1):]

    first, second = run(seed), run(seed)
    # something to repeat: varied tokens, and other inputs give other tokens
    distinct = len(set(first.flatten().tolist()))
    record_property("distinct_generated_tokens", distinct)
    assert distinct >= MIN_DISTINCT_TOKENS, f"degenerate generation {first.tolist()}"
    assert not torch.equal(run(seed + 1), first), "other inputs generated the same tokens"
    assert torch.equal(first, second)
