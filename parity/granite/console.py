"""What `compare` shows on the terminal while it runs: one line per step as it finishes (with its time), the
libraries' own chatter (transformers' loading bars and logging warnings, huggingface_hub's bars, their Python
warnings) silenced while the run owns the terminal, and restored afterwards.

Verbosity: 0 (the default) shows the step lines; 1 (`-v`) the harness's own progress messages as they come; 2
(`-vv`) also lets the libraries speak. Errors never pass through here: they reach stderr as exceptions do.
"""

import contextlib
import sys
import time
import warnings
from typing import IO, Iterator, Optional

LIBRARIES = r"(transformers|huggingface_hub|peft|torch|torchaudio|fms)(\.|$)"  # whose Python warnings are chatter
CASE_PREFIX = "case: "  # how parity.granite.pipeline announces each input case it starts


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Silence transformers' progress bars and logging below errors, huggingface_hub's bars and the libraries'
    Python warnings for the duration; every setting is restored on exit, also when the body raises."""
    if not enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                 are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=LIBRARIES)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars:
            enable_progress_bars()


class StepProgress:
    """Turns the pipeline's progress messages into one line per finished step, `<step>  <seconds> s`: a step ends
    when the next one starts or at `finish()`. On a terminal the running step is shown and then replaced in place;
    elsewhere (a pipe, a CI log) only finished steps are written. `verbosity >= 1` writes every message as it comes,
    with the time since the start, instead (the output of the harness before it was quiet)."""

    def __init__(self, verbosity: int = 0, stream: Optional[IO[str]] = None, start: Optional[float] = None):
        self.verbosity = verbosity
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic() if start is None else start
        self.step: Optional[str] = None
        self.step_start = self.start
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def message(self, text: str) -> None:
        """A progress message: `case: <name>` starts a step; others are shown only under -v."""
        if self.verbosity >= 1:
            self._write(f"[{time.monotonic() - self.start:6.1f}s] {text}\n")
        elif text.startswith(CASE_PREFIX):
            self.begin(text[len(CASE_PREFIX):])

    def begin(self, step: str) -> None:
        """Close the running step (its line and time) and start `step`."""
        self.finish()
        self.step, self.step_start = step, time.monotonic()
        if self.live and self.verbosity == 0:
            self._write(f"  … {step}")

    def finish(self) -> None:
        """Write the running step's line with its time (nothing when no step runs)."""
        self._close("{:.1f} s")

    def stop(self) -> None:
        """The run ended inside the running step (an error follows): say where, on a line of its own."""
        self._close("stopped after {:.1f} s")

    def _close(self, timing: str) -> None:
        if self.step is not None and self.verbosity == 0:
            line = f"  {self.step}  {timing.format(time.monotonic() - self.step_start)}\n"
            self._write(("\r\x1b[K" if self.live else "") + line)
        self.step = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """The last step's line; when the body raised, the step it stopped in (before the error is shown)."""
        if kind is None:
            self.finish()
        else:
            self.stop()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
