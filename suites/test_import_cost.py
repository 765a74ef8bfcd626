"""Start-up cost: `import granite_speech` imports neither FMS's HF registry (`fms.models.hf`, which imports
transformers' modeling code: about 2 s of every fresh interpreter, and the CLI's error paths exit before any model
loads) nor transformers; its HF architectures are registered all the same, on FMS's first import of that registry,
or at once when FMS imported it first. Each case runs in a fresh interpreter: this session has imported both."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from parity.granite.fixtures import build_checkpoint
from parity.granite.launches import launch_fixture, launch_logged

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # file handling: the tiny fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
HF_ARCHITECTURES = {
    "GraniteSpeechForConditionalGeneration": "granite_speech",
    "GraniteSpeechPlusForConditionalGeneration": "granite_speech_plus",
    "GraniteSpeech5ForCTC": "granite_speech5",
}

# argv: the tiny checkpoint, a copy whose adapter_config.json the config audit refuses, the expected registrations
_CHECKS = """
from fms.models import get_model
from fms.models.hf.config_utils import _FMS_MODEL_CONFIG_REGISTRY
from granite_speech.checkpoint import UnsupportedConfigError
from granite_speech.config import from_pretrained_folder

expected = json.loads(sys.argv[3])
registered = {hf: _FMS_MODEL_CONFIG_REGISTRY.map_hf_to_fms_arch(hf) for hf in expected}
assert registered == expected, registered
model = get_model("hf_pretrained", model_path=sys.argv[1])
assert type(model).__name__ == "GraniteSpeech" and model.config == from_pretrained_folder(sys.argv[1]), model.config
try:  # the config audit still runs in the param builder, before any weight is read
    get_model("hf_pretrained", model_path=sys.argv[2])
    raise AssertionError("the refused adapter_config.json loaded")
except UnsupportedConfigError as err:
    assert "peft_type" in str(err), err
print("ok")
"""
GRANITE_SPEECH_FIRST = """
import json, sys
import granite_speech
heavy = sorted(name for name in ("fms.models.hf", "transformers") if name in sys.modules)
assert not heavy, f"import granite_speech imported {heavy}"
""" + _CHECKS
FMS_HF_FIRST = """
import json, sys
import fms.models.hf
import granite_speech
""" + _CHECKS


def _launch(code: str, folder: Path):
    tiny = build_checkpoint("tiny")
    refused = Path(shutil.copytree(tiny, folder / "refused"))
    adapter = json.loads((refused / "adapter_config.json").read_text())
    (refused / "adapter_config.json").write_text(json.dumps({**adapter, "peft_type": "IA3"}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread: the suite's workers hold both cores
    return launch_logged([sys.executable, "-c", code, str(tiny), str(refused), json.dumps(HF_ARCHITECTURES)], folder,
                         cwd=REPO_ROOT, env=env)


EARLY_LAUNCHES = {  # started when collection ends (see the plugin)
    "granite_speech_first": lambda folder: _launch(GRANITE_SPEECH_FIRST, folder),
    "fms_hf_first": lambda folder: _launch(FMS_HF_FIRST, folder),
}


granite_speech_first = launch_fixture("granite_speech_first")
fms_hf_first = launch_fixture("fms_hf_first")


def test_import_leaves_fms_hf_unimported_and_hf_pretrained_loads(granite_speech_first):
    done, _ = granite_speech_first
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_fms_hf_imported_first_still_registers(fms_hf_first):
    done, _ = fms_hf_first
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
