"""GraniteSpeechFeatureExtractor: bit-exact with HF's (fp32, CPU), same inputs accepted, bad inputs rejected.

No model: the extractor runs on the CPU in fp32 whatever --model/--device/--dtype say (`fixed:no-model/cpu/float32`
in the test ids)."""

import json

import numpy as np
import pytest
import torch

from granite_speech.features import GraniteSpeechFeatureConfig, GraniteSpeechFeatureExtractor

import transformers  # noqa: E402  (a hard dependency: no importorskip escape hatch)

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_extractor():
    torch.set_num_threads(1)
    return transformers.GraniteSpeechFeatureExtractor()


@pytest.fixture(scope="module")
def extractor():
    return GraniteSpeechFeatureExtractor()


def _noise(num_samples: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(num_samples, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype)


def assert_same_as_hf(ours: dict, hf) -> None:
    """Exact equality of every output (max |diff| == 0.0)."""
    assert set(ours) == {"input_features", "input_features_mask", "audio_embed_sizes"}
    assert ours["input_features"].dtype == hf["input_features"].dtype == torch.float32
    assert ours["input_features"].shape == hf["input_features"].shape
    max_diff = (ours["input_features"] - hf["input_features"]).abs().max().item()
    assert max_diff == 0.0, f"max |diff| = {max_diff}"
    assert torch.equal(ours["input_features"], hf["input_features"])
    assert ours["input_features_mask"].dtype == torch.bool
    assert torch.equal(ours["input_features_mask"], hf["input_features_mask"])
    assert ours["audio_embed_sizes"] == list(hf["audio_embed_sizes"])


@pytest.mark.parametrize(
    "num_samples",
    [
        257,  # shortest clip: 2 mel frames -> 1 encoder frame
        16_000,  # 1 s: 101 mel frames (odd, last dropped) -> 50 encoder frames
        16_160,  # 102 mel frames (even, nothing dropped)
        16_001,
        33_333,
        48_000,
        480_000,  # 30 s
    ],
)
def test_single_clip_bit_exact(extractor, hf_extractor, num_samples):
    audio = _noise(num_samples, seed=num_samples)
    assert_same_as_hf(extractor(audio), hf_extractor(audio))


def test_padded_batch_of_different_lengths_bit_exact(extractor, hf_extractor):
    clips = [_noise(n, seed=i) for i, n in enumerate([16_000, 8_000, 33_333, 257])]
    ours = extractor(clips)
    assert_same_as_hf(ours, hf_extractor(clips))
    # the mask really differs per clip (a batch with equal rows would hide a broadcasting bug)
    assert ours["input_features_mask"].sum(-1).tolist() == hf_extractor._get_num_audio_features(
        [16_000, 8_000, 33_333, 257]
    )
    assert len(set(ours["audio_embed_sizes"])) == 4


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: _noise(20_000).numpy(), id="ndarray-float32"),
        pytest.param(lambda: _noise(20_000).double().numpy(), id="ndarray-float64"),
        pytest.param(lambda: [_noise(20_000, 1).numpy(), _noise(7_000, 2).double().numpy()], id="list-of-ndarray"),
        pytest.param(lambda: torch.stack([_noise(9_000, 1), _noise(9_000, 2)]).numpy(), id="ndarray-2d-batch"),
        pytest.param(lambda: torch.stack([_noise(9_000, 1), _noise(9_000, 2)]), id="tensor-2d-batch"),
        pytest.param(lambda: _noise(20_000, dtype=torch.float16), id="fp16"),
        pytest.param(lambda: _noise(20_000, dtype=torch.bfloat16), id="bf16"),
        pytest.param(lambda: _noise(20_000, dtype=torch.float64), id="fp64"),
        pytest.param(lambda: [_noise(20_000, 1, torch.float16), _noise(5_000, 2, torch.float16)], id="list-of-fp16"),
        pytest.param(lambda: [_noise(20_000, 1).unsqueeze(0), _noise(5_000, 2).unsqueeze(0)], id="list-of-1xN"),
        pytest.param(lambda: (_noise(20_000, 1), _noise(5_000, 2)), id="tuple-of-tensors"),
    ],
)
def test_accepted_input_types_bit_exact(extractor, hf_extractor, make_input):
    assert_same_as_hf(extractor(make_input()), hf_extractor(make_input()))


def test_stated_sampling_rate_16k_is_accepted(extractor, hf_extractor):
    audio = _noise(16_000)
    assert_same_as_hf(extractor(audio, sampling_rate=16_000), hf_extractor(audio))


def test_non_default_config_matches_hf_with_same_kwargs(hf_extractor):
    kwargs = dict(n_mels=64, n_fft=400, win_length=320, hop_length=128, projector_window_size=10,
                  projector_downsample_rate=2)
    hf = transformers.GraniteSpeechFeatureExtractor(**kwargs)
    clips = [_noise(12_345, 1), _noise(3_000, 2)]
    assert_same_as_hf(GraniteSpeechFeatureExtractor(**kwargs)(clips), hf(clips))
    # HF's own json (melspec_kwargs nested) read back gives the same extractor
    assert_same_as_hf(GraniteSpeechFeatureExtractor.from_dict(hf.to_dict())(clips), hf(clips))


def test_from_pretrained_reads_hf_saved_folders(tmp_path, hf_extractor, extractor):
    clips = [_noise(10_000, 1), _noise(30_000, 2)]
    expected = hf_extractor(clips)
    # feature extractor alone -> preprocessor_config.json (the Hub checkpoints' file)
    hf_extractor.save_pretrained(tmp_path / "extractor")
    assert (tmp_path / "extractor" / "preprocessor_config.json").is_file()
    assert_same_as_hf(GraniteSpeechFeatureExtractor.from_pretrained(tmp_path / "extractor")(clips), expected)
    # transformers 5.x processor save -> nested in processor_config.json
    nested = {"audio_processor": hf_extractor.to_dict(), "audio_token": "<|audio|>"}
    (tmp_path / "processor").mkdir()
    (tmp_path / "processor" / "processor_config.json").write_text(json.dumps(nested))
    assert_same_as_hf(GraniteSpeechFeatureExtractor.from_pretrained(tmp_path / "processor")(clips), expected)
    with pytest.raises(FileNotFoundError, match=r"expected preprocessor_config.json, or processor_config.json"):
        GraniteSpeechFeatureExtractor.from_pretrained(tmp_path / "missing")


def test_from_pretrained_honours_nested_melspec_kwargs(tmp_path):
    """A json stating n_mels=64 gives 64 mels (HF's own from_pretrained rebuilds melspec_kwargs from defaults)."""
    hf64 = transformers.GraniteSpeechFeatureExtractor(n_mels=64)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf64.to_dict()))
    clips = [_noise(10_000, 1)]
    assert_same_as_hf(GraniteSpeechFeatureExtractor.from_pretrained(tmp_path)(clips), hf64(clips))


@pytest.mark.parametrize(
    "make_input, kwargs, error, message",
    [
        (lambda: torch.zeros(0), {}, ValueError, r"audio\[0\] has 0 samples; expected at least 257"),
        (lambda: _noise(256), {}, ValueError, r"audio\[0\] has 256 samples; expected at least 257"),
        (lambda: [_noise(4_000), _noise(100)], {}, ValueError, r"audio\[1\] has 100 samples; expected at least 257"),
        (lambda: [], {}, ValueError, r"audio is an empty list; expected one or more clips"),
        (lambda: _noise(4_000).index_fill(0, torch.tensor([7]), float("nan")), {}, ValueError,
         r"audio\[0\] contains 1 NaN/Inf samples; expected finite"),
        (lambda: [_noise(4_000), np.full(4_000, np.inf, dtype=np.float32)], {}, ValueError,
         r"audio\[1\] contains 4000 NaN/Inf samples"),
        (lambda: [torch.stack([_noise(4_000, 1), _noise(4_000, 2)])], {}, ValueError,
         r"audio\[0\] has shape \[2, 4000\]; expected one mono clip, \[N\] or \[1, N\]"),
        (lambda: _noise(8_000).view(1, 2, 4_000), {}, ValueError,
         r"audio tensor has shape \[1, 2, 4000\]; expected a mono clip \[N\] or a collated batch"),
        (lambda: torch.tensor(0.5), {}, ValueError, r"audio tensor has shape \[\]"),
        (lambda: (_noise(4_000) * 32767).to(torch.int16), {}, ValueError,
         r"dtype torch.int16; expected floating point samples"),
        (lambda: np.zeros(4_000, dtype=np.int32), {}, ValueError, r"numpy dtype int32; expected floating point"),
        (lambda: [np.zeros(4_000, dtype=np.float32), np.zeros(4_000, dtype=bool)], {}, ValueError,
         r"audio\[1\] has numpy dtype bool"),
        (lambda: [0.1] * 4_000, {}, TypeError, r"audio\[0\] is a float; expected a torch.Tensor or numpy array"),
        (lambda: "clip.wav", {}, TypeError, r"audio of type str is not supported"),
        (lambda: _noise(4_000), {"sampling_rate": 8_000}, ValueError,
         r"audio sampled at 8000 Hz, but this extractor expects 16000 Hz"),
    ],
)
def test_rejects_bad_audio(extractor, make_input, kwargs, error, message):
    with pytest.raises(error, match=message):
        extractor(make_input(), **kwargs)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"projector_window_size": 15, "projector_downsample_rate": 4}, r"window_size \(15\) must be a multiple"),
        ({"n_mels": 80, "melspec_kwargs": {"n_mels": 64}}, r"gives n_mels=80 but melspec_kwargs gives 64"),
        ({"melspec_kwargs": {"f_max": 4000}}, r"unsupported melspec_kwargs \['f_max'\]"),
        ({"feature_size": 64}, r"unsupported feature_size \(must equal n_mels\): got 64"),
        ({"padding_value": 1.0}, r"unsupported padding_value"),
        ({"padding_side": "left"}, r"unsupported padding_side"),
        ({"feature_extractor_type": "WhisperFeatureExtractor"}, r"unsupported feature_extractor_type"),
        ({"chunk_length": 30}, r"unknown feature extractor config keys \['chunk_length'\]"),
        ({"hop_length": 0}, r"hop_length must be a positive int, got 0"),
        ({"win_length": 600}, r"win_length \(600\) must be <= n_fft \(512\)"),
    ],
)
def test_rejects_bad_config(config, message):
    with pytest.raises(ValueError, match=message):
        GraniteSpeechFeatureExtractor.from_dict(config)


def test_config_defaults_are_hfs():
    hf_json = transformers.GraniteSpeechFeatureExtractor().to_dict()
    assert GraniteSpeechFeatureConfig.from_dict(hf_json) == GraniteSpeechFeatureConfig()
    ours_json = GraniteSpeechFeatureConfig().to_dict()
    shared_keys = set(ours_json) & set(hf_json)  # 4.57 writes fewer keys than 5.x
    assert {"melspec_kwargs", "projector_window_size", "projector_downsample_rate", "sampling_rate"} <= shared_keys
    assert {k: hf_json[k] for k in shared_keys} == {k: ours_json[k] for k in shared_keys}


def test_numpy_long_double(extractor, hf_extractor):
    """np.longdouble is float128 on x86-64 Linux (torch cannot hold it: a clear TypeError) and float64 elsewhere
    (accepted like any float64 array); either way the test runs, no skip."""
    audio = _noise(4_000).double().numpy().astype(np.longdouble)
    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(TypeError, match=r"audio has numpy dtype float128, which torch cannot hold"):
            extractor(audio)
    else:
        assert_same_as_hf(extractor(audio), hf_extractor(audio.astype(np.float64)))
