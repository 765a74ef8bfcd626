"""GraniteSpeechProcessor: same input_ids / attention_mask / input_features / input_features_mask as HF's.

No model: tokenizer and feature extractor on the CPU in fp32 whatever --model/--device/--dtype say
(`fixed:no-model/cpu/float32` in the test ids)."""

import json

import pytest
import torch
from packaging.version import Version

from granite_speech.features import GraniteSpeechFeatureExtractor
from granite_speech.processor import GraniteSpeechProcessor
from parity.granite.fixtures import build_tokenizer, hf_config_path

import transformers  # noqa: E402  (a hard dependency: no importorskip escape hatch)

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")

AUDIO = "<|audio|>"
USER = "<|start_of_role|>user<|end_of_role|>"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out_dir, json.loads(hf_config_path("tiny").read_text()))
    return out_dir


def _tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def hf_processor(tokenizer_dir):
    torch.set_num_threads(1)
    return transformers.GraniteSpeechProcessor(transformers.GraniteSpeechFeatureExtractor(), _tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return GraniteSpeechProcessor(GraniteSpeechFeatureExtractor(), _tokenizer(tokenizer_dir))


def _noise(num_samples: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def assert_same_as_hf(ours: dict, hf) -> None:
    assert set(ours) == set(hf.keys())
    for key in hf.keys():
        assert ours[key].dtype == hf[key].dtype, key
        assert ours[key].shape == hf[key].shape, key
        assert torch.equal(ours[key], hf[key]), key


def _audio_count(outputs, processor) -> list[int]:
    return (outputs["input_ids"] == processor.audio_token_id).sum(-1).tolist()


def test_one_prompt_one_clip(processor, hf_processor):
    text = f"{USER}{AUDIO}can you transcribe the speech into a written format?<|end_of_text|>"
    audio = _noise(16_000)
    ours = processor(text, audio)
    assert_same_as_hf(ours, hf_processor(text, audio, return_tensors="pt"))
    assert set(ours) == {"input_ids", "attention_mask", "input_features", "input_features_mask"}
    assert _audio_count(ours, processor) == hf_processor.audio_processor._get_num_audio_features([16_000])


@pytest.mark.parametrize("padding_side", ["left", "right", None])
def test_three_prompts_different_clip_lengths(processor, hf_processor, padding_side):
    texts = [
        f"{USER}{AUDIO}transcribe",
        f"{USER}short {AUDIO}",
        f"{USER}a much longer prompt before the clip: {AUDIO} and after it",
    ]
    clip_lengths = [16_000, 8_000, 33_333]
    clips = [_noise(n, seed=i) for i, n in enumerate(clip_lengths)]
    side = {} if padding_side is None else {"padding_side": padding_side}
    ours = processor(texts, clips, **side)
    hf = hf_processor(texts, clips, return_tensors="pt", **side)
    assert_same_as_hf(ours, hf)
    assert _audio_count(ours, processor) == hf_processor.audio_processor._get_num_audio_features(clip_lengths)
    # rows are really padded (different lengths), on the requested side
    pad_count = (ours["attention_mask"] == 0).sum(-1)
    assert pad_count.gt(0).any()
    if padding_side == "left":
        assert ours["attention_mask"][:, -1].all() and not ours["attention_mask"][:, 0].all()
    if padding_side == "right":
        assert ours["attention_mask"][:, 0].all() and not ours["attention_mask"][:, -1].all()


def test_several_placeholders_in_one_prompt(processor, hf_processor):
    texts = [f"{USER}first {AUDIO} then {AUDIO}: same speaker?", f"{USER}{AUDIO}"]
    clip_lengths = [20_000, 5_000, 40_000]
    clips = [_noise(n, seed=i) for i, n in enumerate(clip_lengths)]
    ours = processor(texts, clips, padding_side="left")
    assert_same_as_hf(ours, hf_processor(texts, clips, return_tensors="pt", padding_side="left"))
    sizes = hf_processor.audio_processor._get_num_audio_features(clip_lengths)
    assert _audio_count(ours, processor) == [sizes[0] + sizes[1], sizes[2]]
    # clip 0's tokens come before clip 1's in the first prompt, separated by text
    row = ours["input_ids"][0]
    audio_positions = (row == processor.audio_token_id).nonzero().flatten()
    gaps = audio_positions.diff()
    assert (gaps > 1).sum() == 1 and audio_positions[gaps.argmax()] - audio_positions[0] + 1 == sizes[0]


def test_collated_batch_tensor_counts_each_row_as_a_clip(processor, hf_processor):
    texts = [f"{USER}{AUDIO} one", f"{USER}{AUDIO} two"]
    clips = [_noise(12_000, 1), _noise(12_000, 2)]
    # HF 5.23 counts a [2, N] tensor as one audio and raises here; a list of the same clips is the oracle
    expected = hf_processor(texts, clips, return_tensors="pt")
    assert_same_as_hf(processor(texts, torch.stack(clips)), expected)


def test_text_only(processor, hf_processor):
    texts = ["hello there", "general kenobi, you are a bold one"]
    assert_same_as_hf(processor(texts), hf_processor(texts, return_tensors="pt"))


@pytest.mark.parametrize(
    "texts, num_clips, message",
    [
        ([f"{AUDIO} and {AUDIO}"], 1, r"the prompts contain 2 <\|audio\|> placeholders but 1 audio clips were given"),
        ([f"{AUDIO} a", f"{AUDIO} b"], 3, r"contain 2 <\|audio\|> placeholders but 3 audio clips"),
        (["no placeholder"], 1, r"contain 0 <\|audio\|> placeholders but 1 audio clips"),
        ([f"{AUDIO} a", f"{AUDIO} b"], 0, r"contain 2 <\|audio\|> placeholders but no audio was given"),
    ],
)
def test_placeholder_and_clip_counts_must_match(processor, hf_processor, texts, num_clips, message):
    audio = [_noise(5_000, i) for i in range(num_clips)] or None
    with pytest.raises(ValueError, match=message):
        processor(texts, audio)
    # HF as a cross-check where its validation is known to hold: 4.57-5.14 do not validate (silent or IndexError), and
    # 5.17 (the GPU image) was seen passing these silently or raising StopIteration; 5.23 and 5.24 raise ValueError
    if Version(transformers.__version__) >= Version("5.23"):
        with pytest.raises(ValueError):
            hf_processor(texts, audio, return_tensors="pt")


def test_truncation_that_cuts_audio_tokens_raises(processor):
    with pytest.raises(ValueError, match=r"audio tokens per prompt after tokenization \[5\] differ .* \[12\]"):
        processor(f"{AUDIO}", _noise(16_000), truncation=True, max_length=5)


@pytest.mark.parametrize("text", [42, [], [f"{AUDIO}", 3], None])
def test_text_must_be_strings(processor, text):
    with pytest.raises(TypeError, match=r"text must be a string or a non-empty list of strings"):
        processor(text, _noise(5_000))


def test_audio_token_must_be_one_token(tokenizer_dir):
    with pytest.raises(ValueError, match=r"audio token '<audio>' is not a single token of the tokenizer"):
        GraniteSpeechProcessor(GraniteSpeechFeatureExtractor(), _tokenizer(tokenizer_dir), audio_token="<audio>")


def test_from_pretrained_reads_hf_saved_processor(tmp_path, hf_processor):
    hf_processor.save_pretrained(tmp_path)
    ours = GraniteSpeechProcessor.from_pretrained(tmp_path)
    texts = [f"{USER}{AUDIO}transcribe", f"{USER}{AUDIO}"]
    clips = [_noise(16_000, 1), _noise(6_000, 2)]
    assert_same_as_hf(ours(texts, clips), hf_processor(texts, clips, return_tensors="pt"))


def test_from_pretrained_reads_hub_layout(tmp_path, tokenizer_dir, hf_processor):
    """Hub checkpoints: tokenizer files + preprocessor_config.json, no processor_config.json."""
    _tokenizer(tokenizer_dir).save_pretrained(tmp_path)
    hf_processor.audio_processor.save_pretrained(tmp_path)
    assert not (tmp_path / "processor_config.json").exists()
    ours = GraniteSpeechProcessor.from_pretrained(tmp_path)
    clips = [_noise(30_000, 3)]
    assert_same_as_hf(ours(f"{AUDIO}hi", clips), hf_processor(f"{AUDIO}hi", clips, return_tensors="pt"))
