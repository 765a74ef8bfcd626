"""What the project's command lines share: the exit-code contract, one-line errors, the argument checks that need no
model, and `--version`.

Exit codes (both `granite-speech` and `granite-speech-parity`):

    0  success (for `compare`: parity holds; for `diff`: no probe grew or regressed)
    1  parity fails (`compare`), or the error grew / a probe regressed (`diff`); `transcribe` never exits 1
    2  usage or input error: one line `error: ...` on stderr saying what was wrong and what is expected, no traceback
    3  internal error: a traceback, then a line asking to report it

Every input check runs before any model loads, so a typo costs seconds, not a model load. The model package must
not import `parity`, so the parity CLI imports these helpers from here.
"""

import argparse
import math
import os
import re
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INCOMPLETE = 4

PACKAGE = "granite-speech-fms"
REPORT_BUGS_TO = "the granite-speech-fms issue tracker"

EXIT_CODES_HELP = """exit codes:
  0  success{ok}
  1  {failed}
  2  usage or input error (an option, path, audio file or checkpoint folder): one line
     'error: ...' on stderr saying what is wrong and what is expected, no traceback
  3  internal error: a traceback and a request to report it{incomplete}"""


class UsageError(ValueError):
    """Bad usage or input (an option, a path, an audio file, a checkpoint folder): exit code 2, one line message."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as `UsageError` (one line, exit 2), not printed with the usage block."""

    def error(self, message: str):  # noqa: D401  (argparse API)
        raise UsageError(f"{message} (see {self.prog} --help)")


def exit_codes_epilog(ok: str = "", failed: str = "not used", incomplete: str = "") -> str:
    return EXIT_CODES_HELP.format(ok=ok, failed=failed, incomplete=f"\n  4  {incomplete}" if incomplete else "")


def version_string(prog: str) -> str:
    """`PROG (granite-speech-fms X; torch Y, transformers Z, ibm-fms W)`, from the installed distributions'
    metadata (nothing heavy is imported)."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "ibm-fms"))
    return f"{prog} ({PACKAGE} {version(PACKAGE)}; {deps})"


def run_main(body: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]], prog: str) -> int:
    """Run a CLI body under the exit-code contract and return the exit code: UsageError -> 2 with one `error:`
    line, any other exception -> 3 with the traceback and a request to report it, Ctrl-C -> 130, --help /
    --version -> 0. The body returns 0 or 1 itself."""
    try:
        return int(body(argv) or 0)
    except SystemExit as stop:  # --help / --version
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except UsageError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001  (the contract: anything unforeseen is an internal error, exit 3)
        traceback.print_exc()
        print(
            f"internal error: {prog} failed unexpectedly (traceback above). This is a bug, not a problem with your "
            f"input: please report it to {REPORT_BUGS_TO} with the command line, the traceback and the output of "
            f"`{prog} --version`.",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERNAL


def one_line(err: BaseException) -> str:
    """The message of an error on one line (multi-line messages are joined with '; '). Bytes of a file name that
    are not UTF-8 (lone surrogates in Python's text) are shown as backslash escapes, so the line can be printed."""
    text = str(err).strip() or type(err).__name__
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "; ".join(re.sub(r"^\s*-\s+", "", part).strip() for part in text.splitlines() if part.strip())


def printable(text: str) -> str:
    """Text with non-UTF-8 file-name bytes (lone surrogates) as backslash escapes: safe to print on any stream."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------- argparse types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def _finite(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def tolerance(text: str) -> float:
    """A tolerance (atol / rtol): finite and >= 0."""
    value = _finite(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_seconds(text: str) -> float:
    value = _finite(text, "a number of seconds > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def growth_factor(text: str) -> float:
    value = _finite(text, "a finite factor >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a finite factor >= 1 (new/old max |diff|), got {text}")
    return value


# ---------------------------------------------------------------------------------------------- checks
def check_device(name, dtype=None, option: str = "--device"):
    """The torch.device for `--device NAME` (None: cuda when available, else cpu); UsageError when torch cannot use
    it here, or when `dtype` is bfloat16 on a CUDA device without bf16 support."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise UsageError(f"{option} {name!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{option} {name}: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is "
                f"False); use --device cpu, or check the driver and CUDA_VISIBLE_DEVICES"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{option} {name}: only {count} CUDA device(s) visible; expected cuda:0..cuda:{count - 1}")
        if dtype is not None and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use "
                             f"--dtype float32 or float16")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{option} {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"{option} {name}: device type {device.type!r} is not supported; expected cpu, cuda or cuda:N")
    return device


def check_dtype(name, option: str = "--dtype"):
    import torch

    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    dtype = getattr(torch, name, None) if name in ("float32", "bfloat16", "float16") else None
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{option} {name!r} is not supported; expected float32, bfloat16 or float16")
    return dtype


def _first_existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".").resolve()


def check_output_file(path, option: str, example: str) -> Path:
    """An output file path that can be written: not a folder, its folder creatable and writable, every name within
    the file system's length limit. Probed, not assumed (root passes permission bits, not a read-only or virtual
    file system): a temporary file is created and removed in the nearest existing folder. Nothing else is made."""
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise UsageError(f"{option} is empty; expected a file path such as {example}")
    try:
        return _check_output_file(path, option, example)
    except OSError as err:  # ENAMETOOLONG from a stat, EROFS / EACCES from the probe
        raise UsageError(f"{option} {printable(path)} cannot be written ({err.strerror or err}); expected a "
                         f"writable file path such as {example}") from None


def _check_output_file(path: Path, option: str, example: str) -> Path:
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; expected a file path such as {path / Path(example).name}")
    if path.exists():
        if path.is_fifo() or path.is_socket():  # opening it would block until a reader comes, or fail
            raise UsageError(f"{option} {path} is a named pipe or socket; expected a regular file path such as "
                             f"{example}")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path} exists and is not writable")
        with open(path, "ab"):  # appends nothing: opening for writing is the test (EROFS, EACCES as root)
            pass
        return path
    ancestor = _first_existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise UsageError(f"{option} {path}: {ancestor} is a file, so the folder {path.parent} cannot be made")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write in {ancestor} (permission denied)")
    _probe_names(path, ancestor, option)
    return path


def _probe_names(path: Path, ancestor: Path, option: str) -> None:
    """The names still to be created under `ancestor` fit the file system, and a file can be created there."""
    import tempfile

    limit = os.pathconf(ancestor, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    new_parts = path.relative_to(ancestor).parts if path.is_absolute() == ancestor.is_absolute() else path.parts
    for part in new_parts:
        if len(os.fsencode(part)) > limit:
            raise UsageError(f"{option} {printable(path)}: the name {printable(part)[:40]}... is "
                             f"{len(os.fsencode(part))} bytes, over this file system's limit of {limit}")
    with tempfile.TemporaryFile(dir=ancestor):  # a read-only or virtual file system refuses this
        pass


def check_output_folder(path, option: str) -> Path:
    """A folder to write into: new, or existing and empty (probed as check_output_file probes)."""
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option} {path} is a file; expected a folder (new or empty)")
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(f"{option} {path} is not empty; expected a new or empty folder (files there would mix)")
        ancestor = _first_existing_ancestor(path)
        if not ancestor.is_dir():
            raise UsageError(f"{option} {path}: {ancestor} is a file, so the folder cannot be made")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: cannot write in {ancestor} (permission denied)")
        _probe_names(path, ancestor, option)
    except OSError as err:
        raise UsageError(f"{option} {printable(path)} cannot be written ({err.strerror or err}); expected a "
                         f"writable folder (new or empty)") from None
    return path


def check_distinct_outputs(**paths: Optional[Path]) -> None:
    seen = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = Path(os.path.realpath(path))  # a symlink to another output (or to an input) is that file
        if key in seen:
            raise UsageError(f"{seen[key]} and {option} are both {path}; give them different paths")
        seen[key] = option


def check_prompt(prompt: str, audio_token: str = "<|audio|>") -> str:
    """A user instruction holding the audio placeholder exactly once (one clip per prompt)."""
    count = prompt.count(audio_token)
    if count != 1:
        raise UsageError(
            f"--prompt must contain {audio_token} exactly once (where the clip goes), found it {count} times in "
            f"{prompt!r}; e.g. '{audio_token}can you transcribe the speech into a written format?'"
        )
    return prompt


def check_model_folder(folder, option: str = "--checkpoint") -> Path:
    """A checkpoint folder the CLIs can run: weight files (safetensors only), config.json consistent with FMS's
    config rules, adapter config, tokenizer and feature-extractor files. UsageError naming what is wrong."""
    from granite_speech.checkpoint.files import check_checkpoint_folder, check_processor_files

    check_utf8_path(folder, option)
    try:
        folder = check_checkpoint_folder(folder)
        check_processor_files(folder)
        for name in ("config.json", "adapter_config.json", "preprocessor_config.json", "processor_config.json",
                     "tokenizer_config.json", "tokenizer.json"):
            _read_json_object(folder / name, required=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"{option}: {one_line(err)}") from err
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's type checks of config fields
    except ImportError:  # pragma: no cover  (older huggingface_hub: transformers 4.57 raises ValueError / TypeError)
        StrictDataclassError = ValueError
    try:
        from granite_speech.members import check_member_config

        check_member_config(folder)  # config.json (+ adapter_config.json) of its family member: checked, not loaded
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as err:  # malformed files
        message = one_line(err)
        where = "" if str(folder) in message else f"{folder / 'config.json'}: "
        raise UsageError(f"{option}: {where}{message}") from err
    check_feature_config(folder, option)
    try:  # the tensors' names, dtypes and shapes against the model of this config, from the safetensors headers
        _check_folder_before_loading(folder)
    except (OSError, ValueError) as err:  # CheckpointCoverageError, CheckpointDtypeError: ValueErrors
        from granite_speech.checkpoint.preflight import CheckpointDtypeError

        what = "holds weights that cannot be loaded" if isinstance(err, CheckpointDtypeError) else \
            "does not fit its config.json"
        raise UsageError(f"{option}: checkpoint {folder} {what}: {one_line(err)}") from err
    return folder


def check_utf8_path(path, option: str, reader: str = "safetensors and the tokenizer") -> None:
    """A path `reader` can open: safetensors, tokenizers and transformers' load_audio take UTF-8 paths only (POSIX
    file names may hold any bytes; Python keeps the others as lone surrogates)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{option} {printable(text)}: the path is not valid UTF-8 (needed by {reader}); rename (or "
                         f"link) it to a UTF-8 name") from None


def _read_json_object(path: Path, required: bool = True):
    """The JSON object of `path`; ValueError naming the file when it is unreadable, not JSON or not an object."""
    import json

    if not required and not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror})") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object ({{...}})")
    return data


def check_feature_config(folder: Path, option: str = "--checkpoint"):
    """The feature extractor's settings of the folder's family member (preprocessor_config.json), built as the
    processor will build them: the checked config (its `sampling_rate` a whole number > 0)."""
    from granite_speech.members import member_of_folder

    try:
        if member_of_folder(folder) == "granite_speech5_ctc":
            from granite_speech.features5 import GraniteSpeech5FeatureConfig as Config, read_feature_config
        else:
            from granite_speech.features import GraniteSpeechFeatureConfig as Config, read_feature_config
        data = read_feature_config(folder)
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}; expected a JSON object ({{...}})")
        return Config.from_dict(data)
    except (OSError, ValueError, TypeError) as err:
        message = one_line(err)
        where = "" if "preprocessor_config.json" in message else f"{folder / 'preprocessor_config.json'}: "
        raise UsageError(f"{option}: {where}{message}") from err


def adapter_warning(folder: Path, lora_mode: str = "merged") -> Optional[str]:
    """The warning for a folder without the modality LoRA adapter (None when it has one, or needs none: a config
    with `has_lora_adapter` false has the LoRA merged in its weights, as the 4.x releases; 5.0 has no LoRA)."""
    if (Path(folder) / "adapter_config.json").is_file():
        return None
    from granite_speech.family import lora_regime

    try:
        if lora_regime(folder, lora_mode)["regime"] in ("merged_in_checkpoint", "none") and _declares_no_adapter(
                folder):
            return None
    except (OSError, ValueError):
        pass  # an unreadable config.json is reported by the folder checks; warn as before
    return (
        f"warning: {folder} has no adapter_config.json / adapter_model.safetensors, so no modality LoRA is applied: "
        f"lora_mode {lora_mode!r} ran with LoRA rank 0 (the base language model alone). Released Granite Speech "
        f"checkpoints ship the adapter; without it transcripts are poor"
    )


def _declares_no_adapter(folder: Path) -> bool:
    """config.json says there is no separate adapter: `has_lora_adapter` false, or a CTC-only model (no text model)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("has_lora_adapter") is False or ("encoder_config" in config and "text_config" not in config)


def _check_folder_before_loading(folder: Path) -> None:
    """What `get_model("hf_pretrained", model_path=folder)` checks before it reads a weight (config audit, weight
    files, the safetensors header audit of `checkpoint.preflight`), run on its own: FMS's resolver step, as
    `checkpoint.files.install_fms_guard` wraps it."""
    import fms.models as fms_models

    import granite_speech  # noqa: F401  (registers every member's architecture, adapter and HF config mapping)
    from granite_speech.checkpoint.files import _INFER

    fms_models.__dict__[_INFER]("hf_pretrained", None, str(folder), None)
