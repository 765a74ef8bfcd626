"""pytest plugin: options, markers and session-scoped model fixtures shared by every suite.

The same test file runs at `--model tiny` on a laptop and at `--model 2b`/`8b` on a GPU runner: tests read the
variant, device, dtype and checkpoint from the fixtures below, never from constants.
"""

from pathlib import Path

import pytest
import torch

from granite_speech.config import VARIANTS

MODES = ("propagated", "teacher-forced")
PHASES = ("auto", "one", "two")


def pytest_addoption(parser):
    group = parser.getgroup("granite-speech parity")
    group.addoption("--model", choices=tuple(VARIANTS), default="tiny", help="variant whose dimensions are tested")
    group.addoption(
        "--checkpoint",
        default=None,
        help="a real local HF checkpoint folder (config.json, safetensors, adapter); default: seeded random weights "
        "of --model in the hub layout, built once and cached",
    )
    group.addoption("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    group.addoption("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.addoption("--parity-report", default=None, help="write the layer-diff HTML report here")
    group.addoption("--parity-json", default=None, help="write the layer-diff JSON report here")
    group.addoption("--parity-mode", default="propagated", choices=MODES,
                    help="what the layer suite compares (teacher-forced always runs beside it)")
    group.addoption("--parity-phases", default="auto", choices=PHASES,
                    help="memory schedule of the layer suite: both models at once, one at a time, or by size")
    group.addoption("--atol", type=float, default=None, help="override the tolerance table's atol")
    group.addoption("--rtol", type=float, default=None, help="override the tolerance table's rtol")
    group.addoption("--seed", type=int, default=0, help="seed of the random fixture weights and inputs")


def pytest_configure(config):
    # markers are declared in pyproject.toml; repeated here so the plugin works from any rootdir
    for line in (
        "gpu: needs a CUDA device",
        "slow: long-running at real dimensions",
        "benchmark: pytest-benchmark measurements",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run on a GPU runner")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_variant(pytestconfig) -> str:
    return pytestconfig.getoption("--model")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(pytestconfig) -> torch.dtype:
    return getattr(torch, pytestconfig.getoption("--dtype"))


@pytest.fixture(scope="session")
def seed(pytestconfig) -> int:
    return pytestconfig.getoption("--seed")


@pytest.fixture(scope="session", autouse=True)
def _exact_fp32_matmuls():
    # TF32 would make fp32 parity at 1e-3 meaningless on Ampere+ GPUs
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a module: tiny ops are faster without threading overhead on small CI boxes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint_dir(pytestconfig, model_variant, seed) -> Path:
    given = pytestconfig.getoption("--checkpoint")
    if given:
        folder = Path(given).expanduser()
        if not (folder / "config.json").is_file():
            raise pytest.UsageError(f"--checkpoint {folder} has no config.json; pass a Hugging Face checkpoint folder")
        return folder
    from parity.granite.fixtures import build_checkpoint

    return build_checkpoint(model_variant, seed=seed)


@pytest.fixture(scope="session")
def hf_model(checkpoint_dir, device, dtype):
    from parity.granite.hf import load_hf_model

    return load_hf_model(checkpoint_dir, dtype=dtype, device=str(device))


@pytest.fixture(scope="session")
def fms_model(checkpoint_dir, device, dtype):
    from granite_speech.checkpoint import load_model

    return load_model(checkpoint_dir, dtype=dtype, device=device)


@pytest.fixture(scope="session")
def speech_dataset():
    # rows of the librispeech_asr_dummy schema; suites/test_fixtures.py proves them equal to load_speech_dataset()'s
    from parity.granite.fixtures import read_speech_rows

    return read_speech_rows()


@pytest.fixture(scope="session")
def hf_processor(checkpoint_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(checkpoint_dir))


@pytest.fixture(scope="session")
def tolerance_overrides(pytestconfig) -> dict:
    return {k: v for k in ("atol", "rtol") if (v := pytestconfig.getoption(f"--{k}")) is not None}


@pytest.fixture(scope="session")
def write_parity_report(pytestconfig):
    """Writes a run's report to --parity-report / --parity-json; runs of other modes get the mode in the name."""
    from parity.report import write_html, write_json

    def write(report: dict, mode: str) -> list:
        written = []
        for option, writer in (("--parity-report", write_html), ("--parity-json", write_json)):
            target = pytestconfig.getoption(option)
            if not target:
                continue
            path = Path(target)
            if mode != pytestconfig.getoption("--parity-mode"):
                path = path.with_name(f"{path.stem}.{mode}{path.suffix}")
            written.append(writer(report, path))
        return written

    return write
