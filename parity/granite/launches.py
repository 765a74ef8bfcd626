"""Launched early: a test that only waits for a subprocess (torchrun ranks, the mutation runner, a fresh interpreter)
has it started when collection ends, so that it runs beside the in-process tests instead of after them.

A test module offers its launches as EARLY_LAUNCHES = {fixture name: start(folder) -> subprocess.Popen}, each
started through `launch_logged` (output to files in `folder`: a pipe nobody reads would stall it), and defines the
fixture of that name with `name = launch_fixture("name")`: it returns `early_launch(request)`, which starts the
launch then if it was not started yet. A launch starts early
only when a selected test uses its fixture.

Under pytest-xdist every worker collects every test: the workers of a run share one folder per launch, the first
to create it (an atomic mkdir) starts the launch, and every worker reads the exit status the launch writes there
itself when it ends. So a launch runs once per run, whichever worker its test lands on.

A session that stops early (-x, Ctrl-C) ends the launches nobody waited for; so does a SIGTERM (a cancelled CI job,
`timeout`), which would otherwise end the session at once and leave them running in their own process groups.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

EARLY_LAUNCHES = "EARLY_LAUNCHES"
EARLY_LAUNCH_TIMEOUT_S = 900
INTERRUPTED = 2  # pytest.ExitCode.INTERRUPTED
_LAUNCHED = pytest.StashKey[dict]()  # (module, name) -> [Popen or None (another worker's), folder, result or None]
_EXIT = pytest.StashKey[int]()
_STARTED_HERE: list = []  # the Popen of every launch this process started (what a SIGTERM ends)


def share_under_xdist(config) -> None:
    """On an xdist controller, fix the run's id before the workers start, so that it names the launches' folder."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex


def _run_folder(config) -> Optional[Path]:
    """The folder an xdist run's launches share; None outside xdist (each launch gets a folder of its own)."""
    uid = getattr(config, "workerinput", {}).get("testrunuid") or getattr(config.option, "testrunuid", None)
    return Path(tempfile.gettempdir()) / f"parity-early-{uid}" if uid else None


def start_wanted(session) -> None:
    wanted = {(item.module, name) for item in session.items
              for name in getattr(getattr(item, "module", None), EARLY_LAUNCHES, ()) if name in item.fixturenames}
    for module, name in sorted(wanted, key=lambda pair: (pair[0].__name__, pair[1])):
        try:
            _launch(session.config, module, name)
        except Exception:  # noqa: BLE001  (the fixture's own `early_launch` starts it again and reports the error)
            pass


def run_waiting_modules_last(items: list) -> None:
    """The test modules that wait for a launch run after every other module (order kept within each group): their
    launches then have the whole run to finish, and no worker sits idle waiting for one while other files queue."""
    items[:] = sorted(items, key=lambda item: hasattr(getattr(item, "module", None), EARLY_LAUNCHES))


def _launch(config, module, name: str) -> list:
    launched = config.stash.setdefault(_LAUNCHED, {})
    key = (module.__name__, name)
    if key not in launched:
        shared = _run_folder(config)
        if shared is None:
            folder = Path(tempfile.mkdtemp(prefix=f"early-{name}-"))
        else:
            folder = shared / f"{module.__name__}.{name}"
            shared.mkdir(parents=True, exist_ok=True)
            try:
                folder.mkdir()
            except FileExistsError:  # another worker of the run started it
                launched[key] = [None, folder, None]
                return launched[key]
        launched[key] = [getattr(module, EARLY_LAUNCHES)[name](folder), folder, None]
        _STARTED_HERE.append(launched[key][0])
        _end_launches_on_sigterm()
    return launched[key]


def _end_launches_on_sigterm() -> None:
    """SIGTERM (a cancelled CI job, `timeout`) would end this process at once and leave its launches, which run in
    sessions of their own, running on beside whatever comes next (torchrun ranks, compares, for minutes): the
    handler ends them first, then raises KeyboardInterrupt so that the session ends as interrupted (an xdist worker's
    own teardown cannot be relied on then: its channel to the controller may be gone). A handler someone else set is
    left alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _end_and_interrupt)


def _end_and_interrupt(signum, frame):
    for proc in _STARTED_HERE:
        if proc.poll() is None:
            _end(proc)
    raise KeyboardInterrupt(f"signal {signum}")


def early_launch(request) -> tuple:
    """(subprocess.CompletedProcess with its stdout and stderr, its folder) of the launch named like the requesting
    fixture, in its module's EARLY_LAUNCHES."""
    entry = _launch(request.config, request.module, request.fixturename)
    proc, folder, done = entry
    if done is None:
        code = _wait_for_exit(folder, proc)
        out, err = ((folder / stream).read_text() for stream in ("stdout", "stderr"))
        entry[2] = done = subprocess.CompletedProcess(json.loads((folder / "argv").read_text()), code, out, err)
    return done, folder


def launch_fixture(name: str):
    """The module-scoped fixture `name` of an EARLY_LAUNCHES entry: (CompletedProcess, folder) of its launch."""

    @pytest.fixture(scope="module", name=name)
    def fixture(request):
        return early_launch(request)

    return fixture


def _wait_for_exit(folder: Path, proc: Optional[subprocess.Popen]) -> int:
    """The launch's exit status, from the file it writes when it ends (another worker's launch has no Popen here)."""
    if proc is not None:
        proc.wait(timeout=EARLY_LAUNCH_TIMEOUT_S)
    deadline = time.monotonic() + EARLY_LAUNCH_TIMEOUT_S
    while not (folder / "exit").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the early launch in {folder} wrote no exit status in {EARLY_LAUNCH_TIMEOUT_S} s")
        time.sleep(0.2)
    return int((folder / "exit").read_text())


def launch_logged(argv, folder: Path, **kwargs) -> subprocess.Popen:
    """Popen of `argv` with stdout and stderr in files of `folder` and its exit status written to `folder/exit` when
    it ends, in a process group of its own (so that the session can end it and its children if it stops before a
    test waited for it)."""
    (folder / "argv").write_text(json.dumps([str(a) for a in argv]))
    record = '"$@"; echo $? > "$0/exit.part" && mv "$0/exit.part" "$0/exit"'
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        return subprocess.Popen(["/bin/sh", "-c", record, str(folder), *map(str, argv)], stdout=out, stderr=err,
                                text=True, start_new_session=True, **kwargs)


def note_exit(config, exitstatus: int) -> None:
    config.stash[_EXIT] = int(exitstatus)


def finish(config) -> None:
    """End the launches a stopped session never waited for; under xdist a launch another worker may still wait for
    runs to its end (unless the run was interrupted), and the controller removes the shared folder."""
    shared = _run_folder(config)
    for proc, folder, _ in config.stash.get(_LAUNCHED, {}).values():
        if proc is not None and proc.poll() is None:
            if shared is not None and config.stash.get(_EXIT, INTERRUPTED) != INTERRUPTED:
                proc.wait(timeout=EARLY_LAUNCH_TIMEOUT_S)
            else:
                _end(proc)
        if shared is None:
            shutil.rmtree(folder, ignore_errors=True)
    if shared is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(shared, ignore_errors=True)


def _end(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
