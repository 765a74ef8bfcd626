"""A warm interpreter that forks the mutation runner's workers: torch and transformers are imported once, not once
per mutant (about 7 s of CPU each on a 2-core box, a third of a quick-case worker).

`Zygote(preload, env)` starts `python -c` on this file's server part, which imports the `preload` modules (third-party
only: the zygote must never import `granite_speech` or `parity`, or every fork would see the unmutated package) and
then forks one child per `run`. The child sets up what a fresh `python -m MODULE` in `cwd` with `env` would see
(sys.path led by the cwd and the PYTHONPATH entries, os.environ, sys.argv, stdout and stderr to files) and runs the
module as __main__; its exit status comes back like a subprocess's (negative: killed by that signal). The worker's
own isolation check (where `granite_speech` and `parity` were imported from) holds for a fork as for a subprocess.

This module is standard library only: the server runs it by source, before anything else is imported.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional, Sequence

# preloaded by the mutation runners' zygotes: what a compare worker (or a pytest run of the suites) imports before it
# touches the packages
WORKER_PRELOAD = ("torch", "torch._dynamo", "numpy", "safetensors.torch", "jinja2", "transformers",
                  "transformers.models.granite_speech.modeling_granite_speech",
                  "transformers.models.granite_speech.processing_granite_speech", "peft", "fms.models",
                  "fms.models.granite", "torchaudio", "soundfile", "pytest", "hypothesis")


# ---------------------------------------------------------------------------------------------------------------
# server: runs in the zygote process


def _child(request: dict) -> int:
    """In the forked child: become `python -m MODULE ARGS` in the request's cwd and environment."""
    import runpy
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    entries = [e for e in request["env"].get("PYTHONPATH", "").split(os.pathsep) if e]
    sys.path[:0] = [request["cwd"], *entries]  # `python -m` puts the cwd first, then PYTHONPATH
    sys.dont_write_bytecode = bool(request["env"].get("PYTHONDONTWRITEBYTECODE"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the zygote's request pipe is not the child's to read
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    module, *args = request["argv"]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an interpreter would: the traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve(preload: Sequence[str]) -> None:
    """Preload, say "ready", then fork a child per request line on stdin and report its pid and its exit status on
    stdout (one JSON line each); end when stdin closes and every child has ended."""
    import importlib
    import select
    import time

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a preloaded library prints goes to stderr, never into the replies
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional module (soundfile, torchaudio): the worker reports its absence itself
            pass
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    children: Dict[int, str] = {}
    pending, open_input = b"", True
    while open_input or children:
        if open_input and select.select([0], [], [], 0.1)[0]:
            chunk = os.read(0, 1 << 16)
            open_input = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child never returns into this loop, whatever happens in it
                    code = 1
                    try:
                        reply.close()
                        code = _child(request)
                    finally:
                        os._exit(code)
                children[pid] = request["id"]
                reply.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
        elif not open_input:
            time.sleep(0.1)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            reply.write(json.dumps({"id": children.pop(pid), "exit": os.waitstatus_to_exitcode(status)}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# client: the runner's side


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """The runner's handle: `run` is subprocess.run(["python", "-m", ...], cwd=, env=, timeout=) through a fork of
    the warm interpreter; safe to call from several threads at once. Close it (or use `with`) to end the zygote."""

    def __init__(self, preload: Sequence[str], env: Optional[dict] = None, start_timeout: float = 300.0):
        source = (f"import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                  f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__zygote__')"
                  f"['serve']({list(preload)!r})")
        self._proc = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=env, cwd=tempfile.gettempdir())
        self._lock = threading.Lock()
        self._next = 0
        self._replies: Dict[str, dict] = {}
        self._arrived = threading.Condition()
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(start_timeout) or self._proc.poll() is not None:
            self.close()
            raise ZygoteError(f"the zygote did not start (exit {self._proc.poll()}); see stderr above")

    def _read(self, ready: threading.Event) -> None:
        for line in self._proc.stdout:
            message = json.loads(line)
            if "ready" in message:
                ready.set()
                continue
            with self._arrived:
                self._replies.setdefault(message["id"], {}).update(message)
                self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    def _await(self, request_id: str, key: str, timeout: Optional[float]) -> Optional[dict]:
        with self._arrived:
            self._arrived.wait_for(lambda: key in self._replies.get(request_id, {}) or self._proc.poll() is not None,
                                   timeout)
            reply = self._replies.get(request_id, {})
            return reply if key in reply else None

    def run(self, argv: Sequence[str], *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """argv: ["-m", MODULE, *ARGS]. Output is collected through files in `cwd` (like capture_output=True);
        subprocess.TimeoutExpired after `timeout` seconds, the child killed."""
        if len(argv) < 2 or argv[0] != "-m":
            raise ValueError(f"the zygote runs modules only (['-m', MODULE, ...]), got {list(argv)[:3]}")
        with self._lock:
            self._next += 1
            request_id = str(self._next)
            outputs = {name: str(Path(cwd) / f".zygote-{request_id}.{name}") for name in ("stdout", "stderr")}
            request = {"id": request_id, "cwd": str(cwd), "env": env, "argv": list(argv[1:]), **outputs}
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        started = self._await(request_id, "pid", 60)
        if started is None:
            raise ZygoteError(f"the zygote (exit {self._proc.poll()}) did not start a child for {argv[1]}")
        ended = self._await(request_id, "exit", timeout)
        if ended is None and self._proc.poll() is not None:
            raise ZygoteError(f"the zygote ended (exit {self._proc.poll()}) while {argv[1]} ran")
        if ended is None:
            os.kill(started["pid"], signal.SIGKILL)
            self._await(request_id, "exit", 30)
            raise subprocess.TimeoutExpired(argv, timeout, stderr=Path(outputs["stderr"]).read_text(errors="replace"))
        out, err = (Path(outputs[name]).read_text(errors="replace") for name in ("stdout", "stderr"))
        for name in outputs.values():
            Path(name).unlink(missing_ok=True)
        return subprocess.CompletedProcess([sys.executable, *argv], ended["exit"], out, err)

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
