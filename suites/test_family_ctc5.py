"""granite-speech-5.0-470m-turboctc (HF `granite_speech5`) in FMS against HF transformers.

The member follows --model / --device / --dtype (`family_variant`, see the plugin): the CPU gate (--model tiny) runs
the tiny version (configs/tiny-5.json) on the CPU in fp32, `--model 5.0-470m --device cuda` the member at its real
dimensions; either is the seeded family fixture (HF's own classes, `save_pretrained`), loaded through
`get_model("hf_pretrained")`. Inputs are the real feature extractor's output for a padded batch of two committed
clips of different lengths. Compared (tiny fp32: atol = rtol = 1e-4; otherwise the tolerance table): every encoder
block output, the self-conditioning term, the encoder output, the CTC logits (valid frames only: the model masks
padding, padded positions are undefined on both sides), and exactly: the greedy ids, the CTC-collapsed ids and the
decoded text. The features (vs HF's extractor, exactly), configs and the loading guards are size-independent
(`fixed:...` in the test id: the CPU gate runs them).
"""


import pytest
import torch

import transformers  # noqa: E402  (a hard dependency: a broken install fails, never skips)
if not hasattr(transformers, "GraniteSpeech5ForCTC"):
    pytest.skip(f"transformers {transformers.__version__} has no granite_speech5", allow_module_level=True)

from fms.models import get_model, list_variants

import granite_speech  # noqa: F401
import granite_speech.ctc5 as ctc5
from granite_speech.features5 import (
    GraniteSpeech5FeatureConfig,
    GraniteSpeech5FeatureExtractor,
    GraniteSpeech5Processor,
)
from parity.granite.fixtures.family import (
    build_family_checkpoint,
    capture_outputs,
    frame_masks,
    hf_config,
    load_family_config,
    read_clip,
)
from parity.testing import assert_parity
from parity.tolerances import EXACT, Tolerance

TOL = Tolerance(1e-4, 1e-4, why="family parity suites: fp32 atol = rtol = 1e-4")  # the fixed-size tests'
CLIPS = ("9002-102-0001", "9001-101-0001")  # 399 mel frames (odd) and 242 (even): 200 and 121 encoder frames
VARIANT = {"tiny-5": "tiny", "5.0-470m": "5.0-470m"}  # family fixture -> ctc5.VARIANTS name
FIXED = pytest.mark.runs_at("tiny-5", device="cpu", dtype="float32")  # features, configs, own tiny builds
pytestmark = pytest.mark.family_members(*VARIANT)  # the member of the other tests


@pytest.fixture(scope="module")
def clips():
    return [torch.from_numpy(read_clip(name)) for name in CLIPS]


@pytest.fixture(scope="module")
def hf_extractor():
    return transformers.GraniteSpeech5FeatureExtractor()


@pytest.fixture(scope="module")
def fms_extractor():
    return GraniteSpeech5FeatureExtractor()


@pytest.fixture(scope="module")
def hf_model(family_hf_model):
    return family_hf_model


@pytest.fixture(scope="module")
def fms_model(family_fms_model):
    return family_fms_model


@pytest.fixture(scope="module")
def features(clips, fms_extractor):
    """The padded batch's features on the CPU in fp32 (for the fixed-size tests)."""
    return fms_extractor(clips, sampling_rate=16000)


@pytest.fixture(scope="module")
def batch(features, device, dtype):
    return {"input_features": features["input_features"].to(device, dtype),
            "attention_mask": features["attention_mask"].to(device)}


def _record(record_property):
    return lambda name, value: record_property(name, value)


def _judge(name, reference, candidate, dtype, device, tolerance, record_property=None, **kwargs):
    assert_parity(name, reference, candidate, dtype=dtype, device=device, tolerance=tolerance,
                  record=None if record_property is None else _record(record_property), **kwargs)


# ---------------------------------------------------------------------------------------------- features
@FIXED
@pytest.mark.parametrize("which", ["batch", "odd_alone", "even_alone"])
def test_features_equal_hf(which, clips, hf_extractor, fms_extractor, record_property):
    picked = {"batch": clips, "odd_alone": clips[:1], "even_alone": clips[1:]}[which]
    hf = hf_extractor([c.numpy() for c in picked], sampling_rate=16000, return_tensors="pt")
    fms = fms_extractor(picked, sampling_rate=16000)
    assert fms["input_features"].shape == hf["input_features"].shape
    assert fms["input_features"].dtype == hf["input_features"].dtype == torch.float32
    assert_parity(f"features_{which}", hf["input_features"], fms["input_features"], dtype=torch.float32,
                  device="cpu", tolerance=EXACT, record=_record(record_property))
    assert torch.equal(fms["attention_mask"], hf["attention_mask"])


@FIXED
def test_batch_masks_are_the_clip_lengths(features):
    assert features["input_features"].shape == (2, 200, 320)
    assert features["attention_mask"].sum(-1).tolist() == [200, 121]


@FIXED
@pytest.mark.parametrize("kwargs", [
    {"padding": "max_length", "max_length": 70000},
    {"padding": "max_length", "max_length": 50000, "truncation": True},
    {"pad_to_multiple_of": 4000},
])
def test_features_padding_options_equal_hf(kwargs, clips, hf_extractor, fms_extractor):
    hf = hf_extractor([c.numpy() for c in clips], sampling_rate=16000, return_tensors="pt", **kwargs)
    fms = fms_extractor(clips, sampling_rate=16000, **kwargs)
    assert torch.equal(fms["input_features"], hf["input_features"])
    assert torch.equal(fms["attention_mask"], hf["attention_mask"])


@FIXED
def test_features_read_hf_saved_config(tmp_path, clips):
    hf = transformers.GraniteSpeech5FeatureExtractor(num_mel_bins=64, logmel_floor_db=6.0, delta_win_length=5)
    hf.save_pretrained(str(tmp_path))
    fms = GraniteSpeech5FeatureExtractor.from_pretrained(tmp_path)
    assert fms.config == GraniteSpeech5FeatureConfig(num_mel_bins=64, logmel_floor_db=6.0, delta_win_length=5)
    expected = hf([clips[1].numpy()], sampling_rate=16000, return_tensors="pt")["input_features"]
    assert expected.shape[-1] == fms.config.feature_size == 256
    assert torch.equal(fms([clips[1]])["input_features"], expected)


@FIXED
def test_features_refuse_bad_audio(fms_extractor):
    with pytest.raises(ValueError, match="float"):
        fms_extractor([torch.zeros(4000, dtype=torch.int16)])
    with pytest.raises(ValueError, match="at least"):
        fms_extractor([torch.zeros(100)])
    with pytest.raises(ValueError, match="Hz"):
        fms_extractor([torch.zeros(4000)], sampling_rate=8000)


# ---------------------------------------------------------------------------------------------- configs
@FIXED
@pytest.mark.parametrize("name, variant", [("tiny-5", "tiny"), ("5.0-470m", "5.0-470m")])
def test_fixture_configs_load_in_hf_and_equal_the_variants(name, variant):
    config = hf_config(name)  # HF's own class
    assert type(config).__name__ == "GraniteSpeech5CTCConfig"
    assert ctc5.from_hf_config(config) == ctc5.VARIANTS[variant]
    assert ctc5.from_hf_config(load_family_config(name)) == ctc5.VARIANTS[variant]  # the json dict, too


@FIXED
def test_470m_size_matches_the_published_count():
    with torch.device("meta"):
        hf = transformers.GraniteSpeech5ForCTC(hf_config("5.0-470m"))
        fms = ctc5.GraniteSpeech5ForCTC(ctc5.VARIANTS["5.0-470m"])
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied head counted once
    fms_count = sum(p.numel() for n, p in fms.named_parameters() if not n.startswith("head."))
    assert hf_count == fms_count == 472_928_256  # "473 M params"


@FIXED
def test_registered_names():
    assert list_variants("granite_speech5") == ["5.0-470m", "tiny"]


# ---------------------------------------------------------------------------------------------- model
def test_loads_every_tensor_and_ties_the_head(family_variant, hf_model, fms_model):
    assert type(fms_model).__name__ == "GraniteSpeech5ForCTC"
    assert fms_model.config == ctc5.VARIANTS[VARIANT[family_variant]]
    assert fms_model.head.weight is fms_model.encoder.ctc_out.weight
    bn_hf = hf_model.encoder.layers[1].conv.norm
    bn_fms = fms_model.encoder.layers[1].conv.batch_norm
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn_fms, name), getattr(bn_hf, name)), name


@torch.no_grad()
def test_encoder_layers_logits_and_decoding(hf_model, fms_model, batch, dtype, device, family_tolerance,
                                            record_property):
    features, mask = batch["input_features"], batch["attention_mask"]
    cfg = fms_model.config
    n = cfg.nlayers
    hf_paths = [f"encoder.layers.{i}" for i in range(n)] + ["encoder.input_linear", "encoder.out_mid"]
    fms_paths = [f"encoder.layers.{i}" for i in range(n)] + ["encoder.input_linear", "encoder.ctc_out_mid"]
    with capture_outputs(hf_model, hf_paths) as hf_out:
        hf_result = hf_model(input_features=features, attention_mask=mask)
    with capture_outputs(fms_model, fms_paths) as fms_out:
        fms_logits = fms_model(features, mask)
    masks = frame_masks(mask, cfg.subsample_layers, n)

    def judge(name, hf_value, fms_value, valid, **kwargs):
        _judge(name, hf_value, fms_value, dtype, device, family_tolerance, record_property, valid=valid, **kwargs)

    # the input projection: padded frames are zeroed after it, not inside it
    judge("input_linear", hf_out["encoder.input_linear"], fms_out["encoder.input_linear"], mask.bool())
    for i in range(n):
        assert hf_out[f"encoder.layers.{i}"].shape == fms_out[f"encoder.layers.{i}"].shape
        judge(f"encoder_layer_{i}", hf_out[f"encoder.layers.{i}"], fms_out[f"encoder.layers.{i}"], masks[i])
    judge("ctc_self_conditioning", hf_out["encoder.out_mid"], fms_out["encoder.ctc_out_mid"],
          masks[cfg.nlayers // 2 - 1])
    out_mask = fms_model.output_mask(mask, fms_logits.shape[1])
    assert torch.equal(out_mask, masks[-1])
    assert out_mask.sum(-1).tolist() == [50, 30]
    judge("ctc_logits", hf_result.logits, fms_logits, out_mask, tolerance_class="logits")

    # greedy decoding: HF generate's per-frame ids (padding = blank), then the CTC collapse
    hf_ids = hf_model.generate(input_features=features, attention_mask=mask)
    fms_ids = fms_model.generate(features, mask)
    record_property("distinct_greedy_ids", len(set(hf_ids.flatten().tolist())))
    assert torch.equal(fms_ids, hf_ids), f"FMS {fms_ids.tolist()} != HF {hf_ids.tolist()}"
    collapsed = fms_model.ctc_decode(features, mask)
    blank = cfg.blank_id
    expected = []
    for row in hf_ids.tolist():
        merged = [t for k, t in enumerate(row) if k == 0 or t != row[k - 1]]
        expected.append([t for t in merged if t != blank])
    assert collapsed == expected
    assert all(len(ids) > 0 for ids in collapsed)


@torch.no_grad()
def test_valid_frames_do_not_depend_on_padding(fms_model, clips, fms_extractor, device, dtype, family_tolerance):
    """The masking contract: the shorter clip alone gives its frames of the padded batch (HF masks the same way)."""
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
             for k, v in fms_extractor(clips).items()}
    alone = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
             for k, v in fms_extractor(clips[1:]).items()}
    frames = int(alone["attention_mask"].sum())
    # this clip's STFT never reaches its end padding, so its valid features are the same in and out of the batch
    assert torch.equal(batch["input_features"][1, :frames], alone["input_features"][0, :frames])
    logits_batch = fms_model(batch["input_features"], batch["attention_mask"])[1]
    logits_alone = fms_model(alone["input_features"], alone["attention_mask"])[0]
    valid = int(fms_model.output_mask(alone["attention_mask"]).sum())
    if dtype == torch.float32:  # one model, two batch sizes: only fp32 reassociation apart
        torch.testing.assert_close(logits_batch[:valid], logits_alone[:valid], atol=1e-5, rtol=1e-5)
    else:  # 16 bits round each batch shape's kernels their own way: the table's bound
        _judge("logits_batched_vs_alone", logits_alone[:valid], logits_batch[:valid], dtype, device, None,
               tolerance_class="logits")


@torch.no_grad()
def test_unmasked_input_equals_hf(hf_model, fms_model, batch, dtype, device, family_tolerance, record_property):
    features = batch["input_features"][:1, :130]  # 130 frames: 65 -> 32 after subsampling, partial blocks
    _judge("ctc_logits_no_mask", hf_model(input_features=features).logits, fms_model(features), dtype, device,
           family_tolerance, record_property, tolerance_class="logits")


def test_transcribe_and_processor_decode_equal_hf(hf_model, fms_model, clips, device, dtype):
    """Text through a CTC tokenizer (HF `ParakeetTokenizer`): FMS processor vs HF processor on HF's greedy ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|blank|>": 0, **{f"w{i}": i for i in range(1, fms_model.config.src_vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|blank|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = transformers.ParakeetTokenizer(tokenizer_object=backend, pad_token="<|blank|>")
    hf_processor = transformers.GraniteSpeech5Processor(
        feature_extractor=transformers.GraniteSpeech5FeatureExtractor(), tokenizer=tokenizer
    )
    processor = GraniteSpeech5Processor(GraniteSpeech5FeatureExtractor(), tokenizer)
    inputs = hf_processor([c.numpy() for c in clips], sampling_rate=16000)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    with torch.no_grad():
        hf_ids = hf_model.generate(**inputs).cpu()
    expected = hf_processor.batch_decode(hf_ids, skip_special_tokens=True)
    assert processor.batch_decode(hf_ids) == expected
    assert ctc5.transcribe(fms_model, processor, clips) == expected
    # [a, blank, a] is two tokens: decoding collapsed ids must not collapse them again
    assert processor.decode_collapsed([[5, 5]]) == ["w5 w5"]


# ---------------------------------------------------------------------------------------------- loading paths
@FIXED
def test_untied_head(tmp_path, features):
    batch = features
    hf, folder = build_family_checkpoint("tiny-5", tmp_path, seed=11, tie_word_embeddings=False)
    fms = get_model("hf_pretrained", model_path=str(folder))
    assert not fms.config.tie_heads and fms.head.weight is not fms.encoder.ctc_out.weight
    with torch.no_grad():
        hf_logits = hf(input_features=batch["input_features"], attention_mask=batch["attention_mask"]).logits
        fms_logits = fms(batch["input_features"], batch["attention_mask"])
    valid = fms.output_mask(batch["attention_mask"], fms_logits.shape[1])
    assert_parity("ctc_logits_untied", hf_logits, fms_logits, dtype=torch.float32, tolerance=TOL, valid=valid)


def test_unfused_weights(family_checkpoint, fms_model, batch, device, dtype):
    model = get_model("hf_pretrained", model_path=str(family_checkpoint), fused_weights=False, device_type=device.type,
                      data_type=dtype).to(device).eval()
    assert type(model.encoder.layers[0].attn.in_proj).__name__ == "UnfusedQKV"
    with torch.no_grad():
        unfused = model(batch["input_features"], batch["attention_mask"])
        fused = fms_model(batch["input_features"], batch["attention_mask"])
    valid = fms_model.output_mask(batch["attention_mask"], fused.shape[1])
    exact = 1e-5 if dtype == torch.float32 else None  # the same weights, split or fused: reassociation apart
    torch.testing.assert_close(unfused[valid], fused[valid], atol=exact, rtol=exact)


def test_named_variant_with_hf_source(family_variant, family_checkpoint, fms_model, batch, device, dtype):
    model = get_model("granite_speech5", VARIANT[family_variant], model_path=str(family_checkpoint), source="hf",
                      device_type=device.type, data_type=dtype).to(device).eval()
    with torch.no_grad():
        assert torch.equal(model(batch["input_features"], batch["attention_mask"]),
                           fms_model(batch["input_features"], batch["attention_mask"]))


def test_batch_norm_stays_fp32_in_bf16(family_checkpoint):
    from parity.granite.models import load_hf_family_model

    hf = load_hf_family_model(family_checkpoint, torch.float32, "cpu")  # the stored statistics, unrounded
    model = get_model("hf_pretrained", model_path=str(family_checkpoint), data_type=torch.bfloat16)
    bn = model.encoder.layers[0].conv.batch_norm
    assert model.encoder.input_linear.weight.dtype == torch.bfloat16
    assert bn.running_var.dtype == bn.weight.dtype == torch.float32
    assert torch.equal(bn.running_var, hf.encoder.layers[0].conv.norm.running_var)  # not rounded through bf16


@FIXED
def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from granite_speech.checkpoint.coverage import CheckpointCoverageError

    _, folder = build_family_checkpoint("tiny-5", tmp_path, seed=1)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layers.2.self_attn.rel_pos_emb.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointCoverageError, match="rel_pos_emb"):
        get_model("hf_pretrained", model_path=str(folder))


@FIXED
def test_pickle_weights_are_refused_before_reading(tmp_path):
    """The safetensors-only guard covers this architecture on both loading paths."""
    import shutil

    from granite_speech.checkpoint.files import CheckpointFormatError

    shutil.copy(build_family_checkpoint("tiny-5") / "config.json", tmp_path / "config.json")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="pickle"):
        get_model("granite_speech5", "tiny", model_path=str(tmp_path), source="hf")
    with pytest.raises(CheckpointFormatError, match="pickle"):
        get_model("hf_pretrained", model_path=str(tmp_path))


def test_lora_regime_is_none(family_checkpoint):
    from granite_speech.family import lora_regime

    assert lora_regime(family_checkpoint)["regime"] == "none"
