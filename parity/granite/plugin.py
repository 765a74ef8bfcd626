"""pytest plugin: options, markers and session-scoped model fixtures shared by every suite.

The same test file runs at `--model tiny` on a laptop and at `--model 2b`/`8b` on a GPU runner: tests read the
variant, device, dtype and checkpoint from the fixtures below, never from constants. A test marked `runs_at` with a
fixed size, device and dtype runs in the CPU gate (`--model tiny`) only: elsewhere it would repeat it exactly, so it
is deselected and listed in the summary. Subprocesses a test only waits for are started when collection ends
(`EARLY_LAUNCHES`), so that they run beside the in-process tests.
"""

from pathlib import Path
from typing import Optional

import pytest
import torch

from granite_speech.config import VARIANTS
from parity.granite import launches
from parity.granite.fixtures.family import FAMILY_VARIANTS, TINY_FAMILY

MODEL_CHOICES = tuple(dict.fromkeys((*VARIANTS, *FAMILY_VARIANTS)))  # 3.3 variants, then the family members

MODES = ("propagated", "teacher-forced")
PHASES = ("auto", "one", "two")
REPORT_OPTIONS = ("--parity-report", "--parity-json")
_WRITTEN = pytest.StashKey[list]()  # (option, mode, path) of every report a test wrote this session


def pytest_addoption(parser):
    group = parser.getgroup("granite-speech parity")
    group.addoption("--model", choices=MODEL_CHOICES, default="tiny",
                    help="variant whose dimensions are tested: 3.3 (tiny, 2b, 8b) or a family member (4.0-1b, 4.1-2b, "
                         "4.1-2b-plus, 5.0-470m; tiny-4.0, tiny-plus, tiny-5): the family suites "
                         "(suites/test_family_*.py) run that member, or with tiny the tiny version of every one")
    group.addoption(
        "--checkpoint",
        default=None,
        help="a real local HF checkpoint folder (config.json, safetensors, adapter); default: seeded random weights "
        "of --model in the hub layout, built once and cached",
    )
    group.addoption("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    group.addoption("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.addoption("--parity-report", default=None,
                    help="write the layer-diff HTML report here (by suites/test_layers.py; a run of another mode gets "
                         "the mode in the name, e.g. X.teacher-forced.html); where reports went is printed at the end")
    group.addoption("--parity-json", default=None, help="write the layer-diff JSON report here (as --parity-report)")
    group.addoption("--parity-baseline", default=None, metavar="REPORT.json",
                    help="a report of an earlier run (--parity-json): fail when a probe's error grew more than "
                         "--parity-growth times against it, or a probe stopped passing")
    group.addoption("--parity-growth", type=float, default=10.0, help="growth factor for --parity-baseline")
    group.addoption("--parity-mode", default="propagated", choices=MODES,
                    help="what the layer suite compares (teacher-forced always runs beside it)")
    group.addoption("--parity-phases", default="auto", choices=PHASES,
                    help="memory schedule of the layer suite: both models at once, one at a time, or by size")
    group.addoption("--atol", type=float, default=None, help="override the tolerance table's atol")
    group.addoption("--rtol", type=float, default=None, help="override the tolerance table's rtol")
    group.addoption("--seed", type=int, default=0, help="seed of the random fixture weights and inputs")
    group.addoption("--keep-cpu-gate-tests", action="store_true",
                    help="also run, at other options than the CPU gate's, the tests that do not depend on "
                         "--model/--device/--dtype (runs_at a fixed size, device and dtype); by default they are "
                         "deselected there, since they would repeat the CPU gate (--model tiny) exactly")


def pytest_configure(config):
    # markers are declared in pyproject.toml; repeated here so the plugin works from any rootdir
    for line in (
        "gpu: needs a CUDA device",
        "slow: long-running at real dimensions",
        "benchmark: pytest-benchmark measurements",
    ):
        config.addinivalue_line("markers", line)
    config.stash[_WRITTEN] = []
    launches.share_under_xdist(config)
    given = config.getoption("--checkpoint", default=None)
    if given:
        check_checkpoint_option(given)


def check_checkpoint_option(given) -> Path:
    """`--checkpoint DIR` checked before any test runs (safetensors only, never pickle): pytest.UsageError naming
    what is wrong, so a bad folder stops the session at once instead of erroring every test."""
    from granite_speech.checkpoint.files import check_checkpoint_folder

    try:
        return check_checkpoint_folder(given)
    except (OSError, ValueError) as err:
        raise pytest.UsageError(f"--checkpoint {given}: {err}") from None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Where the parity reports went; a warning when --parity-report / --parity-json was given and none was written."""
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.write_sep("-", "parity reports")
        for option, mode, path in written:
            terminalreporter.write_line(f"{option} ({mode}): {path}")
    asked = [(option, config.getoption(option)) for option in REPORT_OPTIONS if config.getoption(option)]
    missing = [(option, value) for option, value in asked if not any(w[0] == option for w in written)]
    if missing:
        terminalreporter.write_sep("-", "parity reports")
        for option, value in missing:
            terminalreporter.write_line(
                f"warning: {option} {value} was given but no test wrote a report: the tests that write one "
                f"(those using the write_parity_report fixture, e.g. suites/test_layers.py) were not selected, were "
                f"skipped, or failed before writing", yellow=True)


def pytest_collection_modifyitems(config, items):
    deselect_cpu_gate_repeats(config, items)
    launches.run_waiting_modules_last(items)
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
        return check_checkpoint_option(given)
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
            pytestconfig.stash.setdefault(_WRITTEN, []).append((option, mode, written[-1]))
        baseline = pytestconfig.getoption("--parity-baseline")
        if baseline and mode == pytestconfig.getoption("--parity-mode"):
            from parity.report_diff import assert_no_growth

            assert_no_growth(baseline, report, growth=pytestconfig.getoption("--parity-growth"))
        return written

    return write


# --------------------------------------------------------------------------------------------------------------------
# Launched early (`parity.granite.launches`): subprocesses a test only waits for start when collection ends.


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        launches.start_wanted(session)


@pytest.hookimpl(specname="pytest_sessionfinish")
def pytest_sessionfinish_parity(session, exitstatus):
    launches.note_exit(session.config, exitstatus)
    if hasattr(session.config, "workeroutput"):  # an xdist worker: the controller's summary lists its reports
        session.config.workeroutput["parity_written"] = [
            (option, mode, str(path)) for option, mode, path in session.config.stash.get(_WRITTEN, [])]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: the reports a worker wrote, for the terminal summary."""
    written = getattr(node, "workeroutput", {}).get("parity_written", [])
    node.config.stash.setdefault(_WRITTEN, []).extend((o, m, Path(p)) for o, m, p in written)


@pytest.hookimpl(specname="pytest_unconfigure")
def pytest_unconfigure_early_launches(config):
    launches.finish(config)


# --------------------------------------------------------------------------------------------------------------------
# What runs where, in the test id. A test marked `runs_at(size, device=..., dtype=...)` gets one parameter of the
# autouse fixture `run_scope`, whose id says the size, device and dtype it really runs at, so `pytest --collect-only`
# shows it: `model:2b/cuda/float32` for a test that follows --model/--device/--dtype, `fixed:tiny-untied/cpu/float32`
# for one that runs at a fixed size (and, where so marked, a fixed device or dtype) whatever the options say.
#   pytestmark = pytest.mark.runs_at("session")                         # honours --model, --device and --dtype
#   pytestmark = pytest.mark.runs_at("tiny-untied", dtype="float32")    # fixed fixture, session device, fp32
#   pytestmark = pytest.mark.runs_at("toy", device="cpu", dtype="float32")
SESSION = "session"


class RunScope:
    """Where a test runs: `size` (a variant, a fixture name or 'toy'/'no-model'), `fixed` (False when the size is
    --model's), and the resolved torch device and dtype."""

    def __init__(self, size: str, fixed: bool, device: torch.device, dtype: torch.dtype):
        self.size, self.fixed, self.device, self.dtype = size, fixed, device, dtype

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{'fixed' if self.fixed else 'model'}:{self.size}/{self.device.type}/{dtype}"

    def __repr__(self) -> str:
        return f"RunScope({self.id})"


def _session_device(config) -> torch.device:
    return torch.device(config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_run_scope(config, size: str = SESSION, device: str = SESSION, dtype: str = SESSION) -> RunScope:
    fixed = size != SESSION
    return RunScope(
        size if fixed else config.getoption("--model"),
        fixed,
        _session_device(config) if device == SESSION else torch.device(device),
        getattr(torch, config.getoption("--dtype") if dtype == SESSION else dtype),
    )


# The CPU gate is `pytest suites/ --model tiny` on a machine without a GPU. A test whose RunScope is the same under
# this session's options as under the gate's (fixed size, and a device and dtype that are fixed or equal to the
# gate's) computes nothing the gate does not: at other options (--model 2b, --device cuda, ...) it is deselected,
# listed with its reason in the terminal summary and never counted as coverage of those options.
CPU_GATE_OPTIONS = {"--model": "tiny", "--device": "cpu", "--dtype": "float32", "--checkpoint": None}
_LEFT_OUT = pytest.StashKey[dict]()  # reason -> node ids of the tests deselected as repeats of the CPU gate


class _OptionsOf:
    """A stand-in config answering getoption from a dict (the CPU gate's options), for resolve_run_scope."""

    def __init__(self, options: dict):
        self.options = options

    def getoption(self, name, default=None):
        return self.options.get(name, default)


def is_cpu_gate(config) -> bool:
    return all(_option(config, name) == value for name, value in CPU_GATE_OPTIONS.items())


def _option(config, name):
    return _session_device(config).type if name == "--device" else config.getoption(name)


def cpu_gate_repeat_reason(config, marker) -> Optional[str]:
    """Why a test marked `marker` (runs_at, or None) is left out of this session, or None when it runs here: at
    options other than the CPU gate's, a test whose scope does not change with them repeats the gate exactly."""
    if marker is None or is_cpu_gate(config) or config.getoption("--keep-cpu-gate-tests", default=False):
        return None
    here = resolve_run_scope(config, *marker.args, **marker.kwargs)
    at_gate = resolve_run_scope(_OptionsOf(CPU_GATE_OPTIONS), *marker.args, **marker.kwargs)
    if not here.fixed or here.id != at_gate.id:
        return None
    return (f"runs at {here.id} whatever --model/--device/--dtype say: an exact repeat of the CPU gate "
            f"(pytest suites/ --model tiny), which runs it; not coverage of these options")


def family_member_reason(config, marker) -> Optional[str]:
    """Why a test on the session's 3.3 model is left out when --model names a family member (no --checkpoint): the
    3.3 suites' fixtures build 3.3 checkpoints only; the family suites (test_family_*) run that member."""
    model = config.getoption("--model")
    if marker is None or model not in FAMILY_VARIANTS or config.getoption("--checkpoint"):
        return None
    if (marker.args[0] if marker.args else marker.kwargs.get("size", "session")) != "session":
        return None
    return (f"runs on the session's 3.3 model, and --model {model} is a family member: its own suites "
            f"(suites/test_family_*.py) run it at these options")


def no_family_member_reason(config, item) -> Optional[str]:
    """Why a family-suite test (one taking `family_variant`) is left out: --model names no member it runs at (a 3.3
    variant, or another member than its suite's); pytest would otherwise list each as a skip of an empty set."""
    if "family_variant" not in getattr(item, "fixturenames", ()):
        return None
    model, narrowed = config.getoption("--model"), item.get_closest_marker("family_members")
    if _family_variants(model, narrowed):
        return None
    members = "a family member" if narrowed is None else f"{' or '.join(narrowed.args)}"
    return (f"runs at {members}, and --model {model} is none of them: --model tiny runs every member's tiny "
            f"version, --model <member> (4.1-2b-plus, 5.0-470m, ...) that member")


def deselect_cpu_gate_repeats(config, items) -> None:
    left_out, kept = {}, []
    for item in items:
        marker = item.get_closest_marker("runs_at")
        reason = (no_family_member_reason(config, item) or family_member_reason(config, marker)
                  or cpu_gate_repeat_reason(config, marker))
        if reason is None:
            kept.append(item)
        else:
            left_out.setdefault(reason, []).append(item)
    if left_out:
        config.hook.pytest_deselected(items=[item for group in left_out.values() for item in group])
        items[:] = kept
    config.stash[_LEFT_OUT] = {reason: [item.nodeid for item in group] for reason, group in left_out.items()}


@pytest.hookimpl(specname="pytest_terminal_summary")
def pytest_terminal_summary_cpu_gate(terminalreporter, config):  # a second one, kept apart from the reports'
    left_out = config.stash.get(_LEFT_OUT, {})
    if not left_out:
        return
    terminalreporter.write_sep("-", "deselected, each with its reason (--keep-cpu-gate-tests runs the CPU gate's "
                                    "repeats)")
    for reason, nodeids in sorted(left_out.items()):
        terminalreporter.write_line(f"{len(nodeids)} test(s): {reason}")
        terminalreporter.write_line("    " + ", ".join(sorted({nodeid.split("::")[0] for nodeid in nodeids})))


@pytest.hookimpl(specname="pytest_configure")
def pytest_configure_runs_at_marker(config):  # a second pytest_configure, kept apart from the first
    config.addinivalue_line(
        "markers",
        "runs_at(size, device='session', dtype='session'): the size/device/dtype a test runs at; 'session' follows "
        "--model/--device/--dtype, anything else is fixed (the test id says which: model:... or fixed:...)",
    )
    config.addinivalue_line(
        "markers", "family_members(*variants): the family members a test taking `family_variant` may run at")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("runs_at")
    if marker is None or "run_scope" not in metafunc.fixturenames:
        return
    scope = resolve_run_scope(metafunc.config, *marker.args, **marker.kwargs)
    metafunc.parametrize("run_scope", [scope], ids=[scope.id], indirect=True)


def marked_scope(request) -> RunScope:
    """The RunScope of the runs_at marker closest to a fixture's requesting node (for a module-scoped fixture: its
    module's `pytestmark`), for fixtures broader than the function-scoped `run_scope`."""
    marker = request.node.get_closest_marker("runs_at")
    if marker is None:
        raise ValueError(f"{request.node.nodeid} carries no runs_at marker")
    return resolve_run_scope(request.config, *marker.args, **marker.kwargs)


@pytest.fixture(scope="session")
def models_at(request):
    """`models_at(scope)` -> (checkpoint folder, HF model, FMS model) of a fixed-size RunScope: the session's own
    fixtures when the scope is the session's (no second load), else the seeded fixture of `scope.size`, loaded once
    per scope."""
    loaded = {}

    def get(scope: RunScope) -> tuple:
        session = resolve_run_scope(request.config)
        same = (scope.size, scope.device, scope.dtype) == (session.size, session.device, session.dtype)
        if same and not request.config.getoption("--checkpoint"):
            return tuple(request.getfixturevalue(name) for name in ("checkpoint_dir", "hf_model", "fms_model"))
        if scope.id not in loaded:
            from granite_speech.checkpoint import load_model
            from parity.granite.fixtures import build_checkpoint
            from parity.granite.hf import load_hf_model

            folder = build_checkpoint(scope.size, seed=request.config.getoption("--seed"))
            loaded[scope.id] = (folder, load_hf_model(folder, dtype=scope.dtype, device=str(scope.device)),
                                load_model(folder, dtype=scope.dtype, device=scope.device))
        return loaded[scope.id]

    return get


@pytest.fixture(autouse=True)
def run_scope(request):
    """The RunScope of a `runs_at`-marked test (None for unmarked tests)."""
    return getattr(request, "param", None)


# --------------------------------------------------------------------------------------------------------------------
# The family suites (suites/test_family_*.py): a test that takes `family_variant` runs once per family member --model
# selects: `--model tiny` (the CPU gate) -> the tiny version of every family architecture (TINY_FAMILY); a member's
# name (4.1-2b-plus, tiny-5, ...) -> that member alone; a 3.3 variant (2b, 8b) -> none (deselected, with the reason).
# A suite of one architecture narrows that with `pytest.mark.family_members("tiny-plus", "4.1-2b-plus")`.
def family_variants_for(model: str) -> tuple:
    if model == "tiny":
        return TINY_FAMILY
    return (model,) if model in FAMILY_VARIANTS else ()


def _family_variants(model: str, narrowed) -> tuple:
    """`family_variants_for(model)`, narrowed by a `family_members` marker when the test has one."""
    variants = family_variants_for(model)
    return variants if narrowed is None else tuple(v for v in variants if v in narrowed.args)


@pytest.hookimpl(specname="pytest_generate_tests")
def pytest_generate_tests_family(metafunc):  # a second pytest_generate_tests, kept apart from the first
    if "family_variant" in metafunc.fixturenames:
        variants = _family_variants(metafunc.config.getoption("--model"),
                                    metafunc.definition.get_closest_marker("family_members"))
        metafunc.parametrize("family_variant", variants, ids=[f"member:{v}" for v in variants], indirect=True,
                             scope="session")


@pytest.fixture(scope="session")
def family_variant(request) -> str:
    """The family member a test runs at (see `family_variants_for`): a `parity.granite.fixtures.family` variant."""
    return request.param


@pytest.fixture(scope="module")
def family_checkpoint(family_variant, device, seed):
    """The member's seeded checkpoint (HF's own classes and save_pretrained); real dimensions are drawn on the run's
    device. A member whose HF reference class this transformers line lacks (4.57) is skipped, saying so."""
    from parity.granite.fixtures.family import REAL_FAMILY, build_family_checkpoint

    where = device if family_variant in REAL_FAMILY else torch.device("cpu")
    try:
        return build_family_checkpoint(family_variant, seed=seed, device=where)
    except ImportError as err:
        if not str(err).startswith("transformers "):
            raise
        pytest.skip(f"no HF reference to compare with: {err}")


# fp32 at tiny dimensions: the family suites' own bound (atol = rtol = 1e-4); elsewhere (real dimensions, 16 bits)
# the tolerance table of --dtype / --device (None)
TINY_FAMILY_TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def family_tolerance(family_variant, dtype, tolerance_overrides):
    """The `tolerance` of the family suites' assert_parity calls: --atol / --rtol where given, 1e-4 at tiny
    dimensions in fp32, else None (the table)."""
    from parity.tolerances import Tolerance

    if tolerance_overrides:
        return Tolerance(tolerance_overrides.get("atol", TINY_FAMILY_TOLERANCE),
                         tolerance_overrides.get("rtol", TINY_FAMILY_TOLERANCE), why="--atol / --rtol")
    if family_variant in TINY_FAMILY and dtype == torch.float32:
        return Tolerance(TINY_FAMILY_TOLERANCE, TINY_FAMILY_TOLERANCE,
                         why="family parity suites: fp32 atol = rtol = 1e-4 at tiny dimensions")
    return None


@pytest.fixture(scope="module")
def family_hf_model(family_checkpoint, device, dtype):
    """HF's model of the member (its own class), on the session's device and dtype, loaded once per module."""
    from parity.granite.models import load_hf_family_model

    return load_hf_family_model(family_checkpoint, dtype, str(device))


@pytest.fixture(scope="module")
def family_fms_model(family_checkpoint, device, dtype):
    """The member's FMS model through get_model("hf_pretrained"), on the session's device and dtype."""
    from parity.granite.models import load_fms_family_model

    return load_fms_family_model(family_checkpoint, dtype, device)
