"""Property tests of granite_speech.lengths against HF's feature extractor (the oracle).

For raw lengths in [257, 600000] (beyond 30 s) and batches of 1-4 clips: mel / encoder / window / token counts and
the input_features_mask equal what HF's GraniteSpeechFeatureExtractor produces on random noise of those lengths.

The strategies are built from the boundary structure, not only uniform integers (which almost never land on one):
half of the drawn lengths are `boundary_samples` -- a multiple k of a structural period in encoder frames (1, the
projector window 15, the attention blocks 40 and 200, and their common multiples 120 and 600), off by -1/0/+1 frame,
with an even or odd mel-frame count (the odd last mel frame is dropped) and at the first, second or last sample of
its hop (N % 160 in {0, 1, 159}) -- so multiples of the hop, window and block sizes and their neighbours are drawn on
every run, long inputs included. `hypothesis.event` labels each draw (`pytest --hypothesis-show-statistics` lists
them) and test_boundary_strategy_draws_every_class asserts that hypothesis does draw every class. Example counts of
the HF-backed tests come from the hypothesis profile (conftest: `ci` / `dev`). No model: CPU, fp32, whatever the
options say (`fixed:no-model/cpu/float32` in the test ids).
"""

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import transformers  # a hard dependency: no importorskip escape hatch

from granite_speech import lengths

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")

HOP, WINDOW, DOWNSAMPLE = 160, 15, 5
QUERIES = WINDOW // DOWNSAMPLE
FRAME_STACK = 2  # mel frames per encoder frame
MIN_SAMPLES, MAX_SAMPLES = 257, 480_000  # 257: shortest clip HF's STFT accepts; 480000: 30 s
LONG_SAMPLES = 600_000  # 37.5 s: longer than the published 30 s
# periods in encoder frames: one frame, the projector window, the tiny and real attention blocks, common multiples
FRAME_PERIODS = (1, WINDOW, 40, 120, 200, 600)
SAMPLE_OFFSETS = (0, 1, HOP - 1)  # first, second and last sample of a hop


def samples_at(encoder_frames: int, mel_parity: int, sample_offset: int) -> int:
    """The clip length whose centred STFT gives 2 * encoder_frames + mel_parity mel frames, `sample_offset` samples
    into the last hop (mel = N // hop + 1)."""
    return HOP * (FRAME_STACK * encoder_frames + mel_parity - 1) + sample_offset


@st.composite
def boundary_samples(draw, max_samples=LONG_SAMPLES):
    period = draw(st.sampled_from(FRAME_PERIODS))
    k = draw(st.integers(1, max(1, (max_samples // (HOP * FRAME_STACK) - 1) // period)))
    frame_offset = draw(st.sampled_from((-1, 0, 1)))
    mel_parity = draw(st.sampled_from((0, 1)))
    sample_offset = draw(st.sampled_from(SAMPLE_OFFSETS))
    n = samples_at(max(1, k * period + frame_offset), mel_parity, sample_offset)
    return min(max(n, MIN_SAMPLES), max_samples)


def boundary_classes(num_samples: int) -> set:
    """The boundary classes a length falls in (for events and the coverage test)."""
    enc = lengths.encoder_frames(lengths.mel_frames(num_samples))
    classes = {f"N%hop={num_samples % HOP}"} if num_samples % HOP in SAMPLE_OFFSETS else set()
    if lengths.mel_frames(num_samples) % 2:
        classes.add("odd mel count")
    for period in FRAME_PERIODS[1:]:
        for offset, name in ((0, "on"), (1, "+1"), (period - 1, "-1")):
            if enc % period == offset:
                classes.add(f"{name} {period}-frame boundary")
    if num_samples >= MAX_SAMPLES:
        classes.add(">= 30 s")
    return classes


def label(num_samples: int) -> None:
    for name in sorted(boundary_classes(num_samples)):
        event(name)


clip_lengths_st = st.one_of(boundary_samples(), st.integers(MIN_SAMPLES, LONG_SAMPLES))
batch_lengths = st.lists(clip_lengths_st, min_size=1, max_size=4)
any_lengths = st.one_of(boundary_samples(5 * MAX_SAMPLES), st.integers(0, 5 * MAX_SAMPLES))


@pytest.fixture(scope="module")
def hf_extractor():
    torch.set_num_threads(1)
    return transformers.GraniteSpeechFeatureExtractor()


def _noise(num_samples: int, seed: int) -> torch.Tensor:
    return torch.randn(num_samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def _our_tokens(num_samples):
    return lengths.audio_tokens_from_samples(num_samples, HOP, WINDOW, DOWNSAMPLE)


@given(num_samples=clip_lengths_st)
@example(num_samples=MIN_SAMPLES)
@example(num_samples=16_000)
@example(num_samples=16_159)  # last sample count before the mel-frame count goes up
@example(num_samples=16_160)
@example(num_samples=MAX_SAMPLES)
@example(num_samples=MAX_SAMPLES - 1)
def test_single_clip_counts_match_hf(hf_extractor, num_samples):
    note(f"num_samples={num_samples}")
    label(num_samples)
    audio = _noise(num_samples, num_samples)
    hf_mel = hf_extractor.mel_filters(audio.unsqueeze(0))  # HF's own torchaudio transform: [1, n_mels, frames]
    hf_out = hf_extractor(audio)
    hf_tokens = hf_extractor._get_num_audio_features([num_samples])[0]

    mel = lengths.mel_frames(num_samples, HOP)
    enc = lengths.encoder_frames(mel)
    windows = lengths.projector_windows(enc, WINDOW)
    tokens = lengths.audio_tokens(windows, WINDOW, DOWNSAMPLE)
    note(f"ours: mel={mel} enc={enc} windows={windows} tokens={tokens}; HF tokens={hf_tokens}")

    assert mel == hf_mel.shape[-1]
    assert enc == hf_out["input_features"].shape[1]
    assert windows * QUERIES == hf_tokens  # HF has no window count of its own; it is tokens / queries
    assert tokens == hf_tokens == hf_out["audio_embed_sizes"][0]
    assert _our_tokens(num_samples) == hf_tokens
    assert torch.equal(lengths.input_features_mask([tokens]), hf_out["input_features_mask"])


@given(clip_lengths=batch_lengths)
@example(clip_lengths=[MIN_SAMPLES, MAX_SAMPLES])
@example(clip_lengths=[MAX_SAMPLES, 16_000, 16_001, MIN_SAMPLES])
@example(clip_lengths=[48_000, 48_000, 48_000])
def test_batch_counts_and_mask_match_hf(hf_extractor, clip_lengths):
    note(f"clip_lengths={clip_lengths}")
    for n in clip_lengths:
        label(n)
    clips = [_noise(n, i) for i, n in enumerate(clip_lengths)]
    hf_out = hf_extractor(clips)
    ours_tokens = [_our_tokens(n) for n in clip_lengths]
    note(f"ours tokens={ours_tokens}; HF audio_embed_sizes={hf_out['audio_embed_sizes']}")

    assert ours_tokens == hf_out["audio_embed_sizes"] == hf_extractor._get_num_audio_features(clip_lengths)
    assert lengths.encoder_frames(lengths.mel_frames(max(clip_lengths), HOP)) == hf_out["input_features"].shape[1]
    ours_mask = lengths.input_features_mask(ours_tokens)
    assert ours_mask.dtype == torch.bool
    assert torch.equal(ours_mask, hf_out["input_features_mask"])
    # the same from a tensor of lengths (the model's path)
    tensor_tokens = _our_tokens(torch.tensor(clip_lengths))
    assert tensor_tokens.tolist() == ours_tokens
    assert torch.equal(lengths.input_features_mask(tensor_tokens), hf_out["input_features_mask"])


@settings(max_examples=200)  # pure integer arithmetic: cheap, so more examples than the profile's
@given(num_samples=any_lengths, delta=st.one_of(st.sampled_from((0, 1, HOP - 1, HOP, 2 * HOP)), st.integers(0, 50_000)))
def test_token_invariants(num_samples, delta):
    label(num_samples)
    tokens, tokens_after = _our_tokens(num_samples), _our_tokens(num_samples + delta)
    note(f"tokens({num_samples})={tokens}, tokens({num_samples + delta})={tokens_after}")
    assert tokens <= tokens_after  # monotonic non-decreasing in N
    assert tokens % QUERIES == 0
    enc = lengths.encoder_frames(lengths.mel_frames(num_samples))
    # enough windows to cover every encoder frame, and not one more
    assert (tokens // QUERIES) * WINDOW >= enc > (tokens // QUERIES - 1) * WINDOW
    mask = lengths.input_features_mask([tokens, tokens_after])
    assert mask.sum(-1).tolist() == [tokens, tokens_after]


@settings(max_examples=100)
@given(
    clip_lengths=st.lists(any_lengths, min_size=1, max_size=6),
    window=st.sampled_from([(15, 5), (15, 3), (15, 1), (10, 5), (8, 2)]),
)
def test_tensor_and_int_paths_agree(clip_lengths, window):
    window_size, downsample_rate = window
    note(f"clip_lengths={clip_lengths} window={window}")
    as_ints = [lengths.audio_tokens_from_samples(n, HOP, window_size, downsample_rate) for n in clip_lengths]
    as_tensor = lengths.audio_tokens_from_samples(torch.tensor(clip_lengths), HOP, window_size, downsample_rate)
    assert as_tensor.tolist() == as_ints
    mask = lengths.input_features_mask(as_tensor)
    assert mask.sum(-1).tolist() == as_ints
    assert mask.shape == (len(clip_lengths), max(as_ints))
    # each row is a prefix of True followed by False
    assert torch.equal(mask, mask.cummin(dim=-1).values)


def test_window_must_split_into_downsampled_queries():
    with pytest.raises(ValueError, match=r"window_size \(15\) must be a multiple of downsample_rate \(4\)"):
        lengths.audio_tokens_from_samples(16_000, HOP, 15, 4)
    with pytest.raises(ValueError, match=r"downsample_rate must be > 0, got 0"):
        lengths.tokens_per_window(15, 0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: lengths.mel_frames(-1), ValueError, r"num_samples must be >= 0, got -1"),
        (lambda: lengths.mel_frames(torch.tensor([5, -3])), ValueError, r"num_samples must be >= 0, got \[5, -3\]"),
        (lambda: lengths.mel_frames(16000.0), TypeError, r"num_samples must be an int or an integer torch.Tensor"),
        (lambda: lengths.mel_frames(torch.tensor([1.0])), TypeError, r"integer tensor, got dtype torch.float32"),
        (lambda: lengths.mel_frames(True), TypeError, r"num_samples must be an int"),
        (lambda: lengths.mel_frames(100, hop_length=0), ValueError, r"hop_length must be > 0, got 0"),
        (lambda: lengths.projector_windows(10, window_size=-15), ValueError, r"window_size must be > 0, got -15"),
        (lambda: lengths.input_features_mask([]), ValueError, r"at least one clip"),
        (lambda: lengths.input_features_mask([3, -6]), ValueError, r"token_counts\[i\] must be >= 0, got -6"),
        (lambda: lengths.input_features_mask(torch.ones(2, 2, dtype=torch.long)), ValueError, r"must be 1-D"),
        (lambda: lengths.input_features_mask([6, 9], max_tokens=6), ValueError, r"max_tokens \(6\) is smaller"),
        (lambda: lengths.input_features_mask(12), TypeError, r"token_counts must be a sequence of ints"),
        (lambda: lengths.min_num_samples(0), ValueError, r"n_fft must be > 0, got 0"),
    ],
)
def test_invalid_lengths_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_hf_boundary_of_shortest_clip(hf_extractor):
    # our minimum is exactly where HF's STFT starts to accept a lone clip
    assert lengths.min_num_samples(hf_extractor.melspec_kwargs["n_fft"]) == MIN_SAMPLES
    hf_extractor(torch.zeros(MIN_SAMPLES))
    with pytest.raises(RuntimeError):
        hf_extractor(torch.zeros(MIN_SAMPLES - 1))


def test_compiles_without_graph_breaks(hf_extractor):
    """The model path (integer tensors, mask width from a shape) traces as one graph."""

    def tokens_and_mask(num_samples: torch.Tensor, input_features: torch.Tensor):
        tokens = lengths.audio_tokens_from_samples(num_samples)
        max_tokens = lengths.audio_tokens_from_encoder_frames(input_features.shape[1])
        return tokens, lengths.input_features_mask(tokens, max_tokens=max_tokens)

    clip_lengths = [16_000, 4_000, 48_000]
    num_samples = torch.tensor(clip_lengths)
    features = torch.zeros(3, lengths.encoder_frames(lengths.mel_frames(48_000)), 160)
    compiled = torch.compile(tokens_and_mask, backend="eager", fullgraph=True)
    eager_tokens, eager_mask = tokens_and_mask(num_samples, features)
    compiled_tokens, compiled_mask = compiled(num_samples, features)
    hf_out = hf_extractor([_noise(n, 0) for n in clip_lengths])
    assert compiled_tokens.tolist() == eager_tokens.tolist() == hf_out["audio_embed_sizes"]
    assert torch.equal(compiled_mask, eager_mask)
    assert torch.equal(compiled_mask, hf_out["input_features_mask"])


REQUIRED_CLASSES = (
    {f"N%hop={offset}" for offset in SAMPLE_OFFSETS}
    | {"odd mel count", ">= 30 s"}
    | {f"{name} {period}-frame boundary" for period in FRAME_PERIODS[1:] for name in ("on", "+1", "-1")}
)


def test_boundary_strategy_draws_every_class():
    """Hypothesis, drawing from the strategy the HF-backed tests use, reaches every boundary class (on a window, a
    block, one frame before or after, odd mel counts, the first and last sample of a hop, beyond 30 s)."""
    seen = set()

    @settings(max_examples=400, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(clip_lengths_st)
    def draw(num_samples):
        assert MIN_SAMPLES <= num_samples <= LONG_SAMPLES
        seen.update(boundary_classes(num_samples))

    draw()
    assert REQUIRED_CLASSES <= seen, f"never drawn: {sorted(REQUIRED_CLASSES - seen)}"
