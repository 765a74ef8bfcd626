"""`compare --save-captures DIR` / `--reference-captures DIR`: the saved reference carries a fingerprint (checkpoint,
inputs per section, dtypes, the dtype HF's float64 floors were made from, versions), and a reference that does not
belong to the run is a usage error (exit 2, one line naming what differs), never a parity verdict about the port.

One reference is saved once per module (the tiny fixture, one bundled clip, floors on, 2 new tokens); each test
reads it, or a copy of it edited to stand for another run's.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parity.granite.fixtures import SPEECH_DIR, build_checkpoint
from parity.store import (FINGERPRINT_KEY, REFERENCE_FILE, ReferenceMismatch, ReferenceStore, checkpoint_fingerprint,
                          read_fingerprint)

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # the store's fingerprints on the tiny fixture

CLIP = SPEECH_DIR / "9001-101-0000.flac"
OTHER_CLIP = SPEECH_DIR / "9003-103-0000.flac"
MODEL_SET = "given audio (1 clip) · model"


class ModelLoaded(BaseException):
    """A model was loaded where none may be: a BaseException, so no `except Exception` turns it into an exit code."""


def _compare(root: Path, name: str, *extra) -> int:
    from parity.granite.cli import main

    return main(["compare", "--floors", "on", "--new-tokens", "2", "--json", str(root / f"{name}.json"),
                 "--report", str(root / f"{name}.html"), *map(str, extra)])


def _trip(monkeypatch, *loaders: str) -> None:
    """The pipeline's model loaders named in `loaders` replaced by a tripwire, in each module that calls them:
    `Models` (parity.granite.models) and the two-phase model section (parity.granite.pipeline)."""
    import parity.granite.models as models
    import parity.granite.pipeline as pipeline

    def tripwire(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded: {args}")

    for loader in loaders:
        for module in (models, pipeline):
            monkeypatch.setattr(module, loader, tripwire)


def _edited_reference(saved: Path, folder: Path, edit) -> Path:
    """A copy of the saved reference whose safetensors metadata went through `edit(metadata) -> metadata`."""
    source = saved / REFERENCE_FILE
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    folder.mkdir()
    save_file(load_file(str(source)), str(folder / REFERENCE_FILE), metadata=edit(metadata))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root, the reference folder, the saving run's exit code)."""
    root = tmp_path_factory.mktemp("reference-store")
    code = _compare(root, "save", "--audio", CLIP, "--save-captures", root / "reference")
    return root, root / "reference", code


def test_the_same_run_passes_against_its_reference_with_the_formula_check_and_no_hf(saved, monkeypatch):
    root, reference, code = saved
    assert code == 0
    _trip(monkeypatch, "load_hf_family_model")  # the reference stands in for HF: HF is never loaded here
    assert _compare(root, "same", "--audio", CLIP, "--reference-captures", reference) == 0
    report = json.loads((root / "same.json").read_text())
    [model] = [s for s in report["sections"] if s["title"] == MODEL_SET]
    assert model["extra"]["floors"] == "read with the reference"
    assert model["extra"]["float64"].startswith("FMS and HF in float64 on the same inputs"), model["extra"]
    assert not model["extra"].get("not_run")


def test_the_fingerprint_records_checkpoint_inputs_dtypes_and_versions(saved):
    _, reference, _ = saved
    record = read_fingerprint(reference / REFERENCE_FILE)
    assert record["checkpoint"] == checkpoint_fingerprint(build_checkpoint("tiny"))
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["transformers"]
    sets = record["sets"]
    assert set(sets) == {MODEL_SET, f"{MODEL_SET} #floors", "given audio (1 clip) · HF generate",
                         "given audio (1 clip) · HF generate #floors"}
    assert {"input_ids", "attention_mask", "input_features", "input_features_mask"} <= set(sets[MODEL_SET]["inputs"])
    assert "float32" in sets[MODEL_SET]["dtypes"] and sets[f"{MODEL_SET} #floors"]["dtypes"] == ["float64"]
    assert sets[f"{MODEL_SET} #floors"]["made_from"] == "float32" and "made_from" not in sets[MODEL_SET]
    assert sets["given audio (1 clip) · HF generate"]["inputs"]["new_tokens"]["dtype"] == "int64"


def test_floors_made_from_16_bit_weights_say_so_instead_of_checking_formulas(saved, tmp_path):
    root, reference, _ = saved

    def bf16_floors(metadata):
        record = json.loads(metadata[FINGERPRINT_KEY])
        record["sets"][f"{MODEL_SET} #floors"]["made_from"] = "bfloat16"
        return {**metadata, FINGERPRINT_KEY: json.dumps(record)}

    edited = _edited_reference(reference, tmp_path / "bf16-floors", bf16_floors)
    assert _compare(tmp_path, "bf16", "--audio", CLIP, "--reference-captures", edited) == 0
    report = json.loads((tmp_path / "bf16.json").read_text())
    [model] = [s for s in report["sections"] if s["title"] == MODEL_SET]
    assert model["extra"]["float64"] == "not run: HF's float64 copy was made from bfloat16 weights"


def test_a_reference_of_other_audio_exits_2_naming_the_inputs(saved, monkeypatch, capsys):
    root, reference, _ = saved
    _trip(monkeypatch, "load_hf_family_model", "load_fms_family_model")  # refused before any model loads
    assert _compare(root, "other-audio", "--audio", OTHER_CLIP, "--reference-captures", reference) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"the inputs of section '{MODEL_SET}' differ" in line
    assert "input_features is float32[1, 45, 160] here, float32[1, 16, 160] in the reference" in line
    assert not (root / "other-audio.json").exists()


def _one_tensor_changed(folder: Path, copy: Path) -> Path:
    """A copy of the checkpoint with one tensor's values changed; names, dtypes, shapes and sizes stay the same."""
    shutil.copytree(folder, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(shard), metadata=metadata)
    return copy


def test_a_reference_of_another_checkpoint_exits_2_naming_the_checkpoint(saved, tmp_path, monkeypatch, capsys):
    root, reference, _ = saved
    changed = _one_tensor_changed(build_checkpoint("tiny"), tmp_path / "changed")
    _trip(monkeypatch, "load_hf_family_model", "load_fms_family_model")
    assert _compare(root, "other-checkpoint", "--checkpoint", changed, "--audio", CLIP,
                    "--reference-captures", reference) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "the checkpoint differs" in line and str(changed) in line


def test_a_reference_without_a_fingerprint_exits_2(saved, tmp_path, monkeypatch, capsys):
    root, reference, _ = saved
    unfingerprinted = _edited_reference(reference, tmp_path / "old", lambda m: {k: v for k, v in m.items()
                                                                                 if k != FINGERPRINT_KEY})
    _trip(monkeypatch, "load_hf_family_model", "load_fms_family_model")
    assert _compare(root, "old", "--audio", CLIP, "--reference-captures", unfingerprinted) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "--reference-captures" in line and "saved by an older harness without fingerprints" in line


def test_float_inputs_match_across_last_bit_rounding_and_differ_beyond(tmp_path):
    """The same audio featurised on another CPU may differ in its last bits: still the reference's inputs."""
    from parity.capture import Captures

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    features = torch.linspace(-3.0, 2.0, 480).reshape(1, 3, 160)
    ids = torch.arange(7).reshape(1, 7)
    store = ReferenceStore(save=tmp_path / "saved", checkpoint=tmp_path / "checkpoint")
    captures = Captures("hf")
    captures.put("encoder.input_linear", torch.zeros(2))
    store.put("case · model", captures, {"input_ids": ids, "input_features": features})
    store.finish()
    read = ReferenceStore(read=tmp_path / "saved", checkpoint=tmp_path / "checkpoint")
    last_bit = torch.nextafter(features, torch.full_like(features, 10.0))
    assert read.get("case · model", {"input_ids": ids, "input_features": last_bit}) is not None
    for inputs, differs in (({"input_ids": ids, "input_features": features * 1.01}, "input_features holds other"),
                            ({"input_ids": ids + 1, "input_features": features}, "input_ids holds other"),
                            ({"input_ids": ids, "input_features": features.half()}, "float16[1, 3, 160] here")):
        with pytest.raises(ReferenceMismatch, match=re.escape(differs)):
            read.get("case · model", inputs)


def test_a_propagated_reference_read_teacher_forced_exits_2_naming_the_mode(saved, capsys):
    """A reference recorded with --mode propagated holds no inputs to re-run FMS's modules on: the reference does
    not fit the run (exit 2, saying which mode), not an internal error (it was exit 3)."""
    root, _, _ = saved
    propagated = root / "propagated-reference"
    assert _compare(root, "save-propagated", "--audio", CLIP, "--mode", "propagated", "--save-captures",
                    propagated) == 0
    capsys.readouterr()
    assert _compare(root, "read-teacher-forced", "--audio", CLIP, "--reference-captures", propagated) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "recorded propagated" in line and "--mode teacher-forced" in line
