"""Which tests a session runs (parity.granite.plugin): a test marked `runs_at` with a fixed size, device and dtype
repeats the CPU gate (`pytest suites/ --model tiny`) exactly at any other options, so there it is deselected with
its reason; a test that follows --model/--device/--dtype, or whose fixed size runs on the session's device, stays.

Checked on stand-in configs, so the GPU gate's selection (--model 2b --device cuda) is proven on a machine
without a GPU. Also how a session's early launches start once per run and end with it (`parity.granite.launches`).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.granite.plugin import (
    CPU_GATE_OPTIONS,
    cpu_gate_repeat_reason,
    deselect_cpu_gate_repeats,
    family_variants_for,
    is_cpu_gate,
)

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")

GPU_GATE = {"--model": "2b", "--device": "cuda", "--dtype": "float32"}


class Config:
    """A stand-in pytest config: options, a stash and the pytest_deselected hook."""

    def __init__(self, **options):
        self.options = {**CPU_GATE_OPTIONS, "--keep-cpu-gate-tests": False, **options}
        self.stash, self.deselected = {}, []
        self.hook = self

    def getoption(self, name, default=None):
        return self.options.get(name, default)

    def pytest_deselected(self, items):
        self.deselected.extend(items)


class Item:
    def __init__(self, nodeid, *args, fixturenames=(), **kwargs):
        self.nodeid, self.fixturenames, self.members = nodeid, fixturenames, kwargs.pop("members", None)
        self.marker = None if args in (("unmarked",), ()) else pytest.mark.runs_at(*args, **kwargs).mark

    def get_closest_marker(self, name):
        return self.marker if name == "runs_at" else self.members if name == "family_members" else None


def _items():
    return [
        Item("suites/test_a.py::fixed_cpu", "toy", device="cpu", dtype="float32"),
        Item("suites/test_a.py::fixed_cpu_bf16", "toy", device="cpu", dtype="bfloat16"),
        Item("suites/test_b.py::fixed_size_session_device", "tiny-untied", dtype="float32"),
        Item("suites/test_b.py::session", "session"),
        Item("suites/test_c.py::unmarked", "unmarked"),
        Item("suites/test_family_d.py::member", fixturenames=("family_variant",)),  # follows --model's member
    ]


def _options(session: dict) -> dict:
    return {**session, "--device": session.get("--device", "cpu")}


@pytest.mark.parametrize("options, kept", [
    ({}, ["fixed_cpu", "fixed_cpu_bf16", "fixed_size_session_device", "session", "unmarked", "member"]),
    # a 3.3 variant is no family member: the family suites' tests are left out
    (GPU_GATE, ["fixed_size_session_device", "session", "unmarked"]),
    ({"--model": "2b"}, ["session", "unmarked"]),  # real size on the CPU: the tiny-untied test repeats the gate
    ({"--device": "cuda"}, ["fixed_size_session_device", "session", "unmarked", "member"]),
    ({"--model": "tiny", "--dtype": "bfloat16"}, ["session", "unmarked", "member"]),  # fp32 on the CPU: the gate's
    # a family member: the 3.3 session model's tests are left out (the family suites run the member)
    ({"--model": "4.1-2b-plus", "--device": "cuda"}, ["fixed_size_session_device", "unmarked", "member"]),
    ({"--model": "4.1-2b-plus", "--checkpoint": "/models/plus"}, ["session", "unmarked", "member"]),
    ({**GPU_GATE, "--keep-cpu-gate-tests": True}, ["fixed_cpu", "fixed_cpu_bf16", "fixed_size_session_device",
                                                    "session", "unmarked"]),
], ids=["cpu-gate", "gpu-gate", "2b-on-cpu", "tiny-on-cuda", "tiny-bf16", "plus-on-cuda", "plus-checkpoint",
        "kept-on-request"])
def test_deselection_keeps_what_depends_on_the_options(options, kept):
    config, items = Config(**_options(options)), _items()
    deselect_cpu_gate_repeats(config, items)
    assert [item.nodeid.split("::")[1] for item in items] == kept
    left_out = config.stash[next(iter(config.stash))]
    assert sorted(nodeid for nodeids in left_out.values() for nodeid in nodeids) == sorted(
        item.nodeid for item in config.deselected)
    assert len(config.deselected) + len(kept) == len(_items())


def test_the_reason_names_the_scope_and_the_gate():
    reason = cpu_gate_repeat_reason(Config(**GPU_GATE), Item("x", "toy", device="cpu", dtype="float32").marker)
    assert "fixed:toy/cpu/float32" in reason and "pytest suites/ --model tiny" in reason
    assert "not coverage of these options" in reason
    assert cpu_gate_repeat_reason(Config(**GPU_GATE), Item("x", "session").marker) is None
    assert cpu_gate_repeat_reason(Config(**GPU_GATE), None) is None


def test_a_family_member_leaves_out_the_session_models_tests_and_says_why():
    from parity.granite.plugin import family_member_reason

    config = Config(**{"--model": "5.0-470m", "--device": "cuda"})
    reason = family_member_reason(config, Item("x", "session").marker)
    assert "--model 5.0-470m is a family member" in reason and "test_family_" in reason
    assert family_member_reason(config, Item("x", "tiny-untied", dtype="float32").marker) is None
    assert family_member_reason(Config(**GPU_GATE), Item("x", "session").marker) is None


def test_a_model_no_family_suite_runs_at_leaves_it_out_and_says_why():
    """Under --model 2b the family suites have no member to run: deselected with the reason, not listed as skips of
    an empty parameter set."""
    from parity.granite.plugin import no_family_member_reason

    family = Item("x", fixturenames=("family_variant",))
    reason = no_family_member_reason(Config(**GPU_GATE), family)
    assert "--model 2b is none of them" in reason and "--model tiny" in reason
    assert no_family_member_reason(Config(), family) is None
    assert no_family_member_reason(Config(**GPU_GATE), Item("x", "session")) is None
    plus_only = Item("x", fixturenames=("family_variant",), members=pytest.mark.family_members(
        "tiny-plus", "4.1-2b-plus").mark)
    assert "runs at tiny-plus or 4.1-2b-plus, and --model 5.0-470m" in no_family_member_reason(
        Config(**{"--model": "5.0-470m"}), plus_only)
    assert no_family_member_reason(Config(**{"--model": "4.1-2b-plus"}), plus_only) is None


def test_the_cpu_gate_is_tiny_on_the_cpu_in_fp32_without_a_checkpoint():
    assert is_cpu_gate(Config())
    assert not is_cpu_gate(Config(**{"--checkpoint": "/models/granite-speech-3.3-2b"}))
    assert not is_cpu_gate(Config(**{"--dtype": "float16"}))
    assert not is_cpu_gate(Config(**GPU_GATE))


@pytest.mark.parametrize("model, members", [
    ("tiny", ("tiny-4.0", "tiny-plus", "tiny-5")),
    ("4.1-2b-plus", ("4.1-2b-plus",)),
    ("2b", ()),
])
def test_family_members_follow_the_model_option(model, members):
    assert family_variants_for(model) == members


REPO_ROOT = Path(__file__).resolve().parents[1]


def _worker(uid: str):
    """A stand-in config of one pytest-xdist worker of the run `uid`."""
    from types import SimpleNamespace

    return SimpleNamespace(stash=pytest.Stash(), option=SimpleNamespace(testrunuid=None),
                           workerinput={"testrunuid": uid})


@pytest.mark.parametrize("code", [0, 3])
def test_an_early_launch_runs_once_for_every_worker_of_an_xdist_run(code):
    """Every xdist worker collects every test and so asks for every launch: the first starts it, the others read
    its output and exit status from the folder the run's workers share; the controller removes that folder."""
    import sys
    import uuid
    from types import ModuleType, SimpleNamespace

    from parity.granite import launches

    module, starts = ModuleType("a_suite"), []

    def start(folder):
        starts.append(folder)
        return launches.launch_logged([sys.executable, "-c", f"print('ran'); raise SystemExit({code})"], folder)

    module.EARLY_LAUNCHES = {"job": start}
    uid = uuid.uuid4().hex
    workers = [_worker(uid) for _ in range(2)]
    session = SimpleNamespace(config=workers[1], items=[SimpleNamespace(module=module, fixturenames=["job"])])
    launches.start_wanted(session)  # the second worker's collection ends first
    results = [launches.early_launch(SimpleNamespace(config=w, module=module, fixturename="job")) for w in workers]
    assert len(starts) == 1, "one launch for the run"
    for done, folder in results:
        assert (done.returncode, done.stdout, folder) == (code, "ran\n", starts[0])
        assert done.args[-1].endswith(f"raise SystemExit({code})")
    for worker in workers:
        launches.note_exit(worker, 0)
        launches.finish(worker)
    assert starts[0].is_dir(), "a worker leaves the shared folder to the controller"
    controller = SimpleNamespace(stash=pytest.Stash(), option=SimpleNamespace(testrunuid=uid, numprocesses=2))
    launches.finish(controller)
    assert not starts[0].parent.exists()


SLEEPING_SUITE = '''
import sys, time
from pathlib import Path
from parity.granite.launches import launch_fixture, launch_logged

MARKS = Path({marks!r})


def _start(folder):
    return launch_logged([sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
                          "time.sleep(300)", str(MARKS / "launch.pid")], folder)


EARLY_LAUNCHES = {{"sleeper": _start}}
sleeper = launch_fixture("sleeper")


def test_runs_while_the_launch_does():
    (MARKS / "test.started").write_text("")
    time.sleep(300)


def test_waits_for_the_launch(sleeper):
    pass
'''


def _ended(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (a container's init may not reap)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds:g} s"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads a process's state from /proc (Linux)")
@pytest.mark.parametrize("workers", [["-p", "no:xdist"], ["-n", "1"]], ids=["one-process", "xdist"])
def test_a_terminated_session_ends_its_early_launches(tmp_path, workers):
    """SIGTERM to a pytest session's process group (a cancelled CI job, `timeout`) ends its early launches too: they
    run in sessions of their own, which the signal does not reach, and would otherwise run on for minutes after the
    session is gone."""
    suite = tmp_path / "test_sleeping.py"
    suite.write_text(SLEEPING_SUITE.format(marks=str(tmp_path)))
    nested = subprocess.Popen([sys.executable, "-m", "pytest", str(suite), "-p", "parity.granite.plugin", "-q",
                               "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *workers], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        _wait_for(tmp_path / "test.started")
        _wait_for(tmp_path / "launch.pid")
        pid = int((tmp_path / "launch.pid").read_text())
        assert not _ended(pid)
        os.killpg(nested.pid, signal.SIGTERM)  # as `timeout` and CI runners signal: the whole group
        out, _ = nested.communicate(timeout=60)
    finally:
        nested.kill()
    deadline = time.monotonic() + 10
    while not _ended(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    outlived = not _ended(pid)
    if outlived:
        os.kill(pid, signal.SIGKILL)
    assert not outlived, f"the launch (pid {pid}) outlived its session:\n{out[-2000:]}"
    assert nested.returncode != 0, out[-2000:]
