"""The exit-code contract of both command lines, and bad input through the API.

    0 parity holds (compare) / nothing grew (diff) / done (transcribe)
    1 parity fails (compare) / a probe grew or regressed (diff)
    2 usage or input error: one line `error: ...`, no traceback, and no model loaded
    3 internal error: a traceback and a request to report it

The bad-input table runs each CLI in process (`main(argv)` returns the exit code) with every model loader replaced by
a tripwire, so a check that runs after a model load fails the test. The API cases assert the exception type the CLIs
turn into exit 2 (UsageError / AudioInputError / CheckpointFormatError / FileNotFoundError, all caught before any
weight is read) and its message. A few cases run the real entry points in a subprocess.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest

from parity.granite.fixtures.paths import CONFIGS_DIR

import transformers  # noqa: E402

PLUS_IN_TRANSFORMERS = hasattr(transformers, "GraniteSpeechPlusForConditionalGeneration")
import soundfile
import torch
from safetensors.torch import load_file

import granite_speech  # noqa: F401  (registers the architecture for get_model)
from granite_speech.audio import AudioInputError, read_audio
from granite_speech.checkpoint.files import CheckpointFormatError, check_checkpoint_folder
from granite_speech.cli_errors import UsageError
from parity.granite.fixtures import SPEECH_DIR, build_checkpoint
from parity.granite.launches import launch_fixture, launch_logged

pytestmark = pytest.mark.runs_at("tiny", device="cpu", dtype="float32")  # the CLI's contract on the tiny fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP = SPEECH_DIR / "9002-102-0000.flac"
HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- assets
def _wav(path: Path, samples: np.ndarray, rate: int = 16000, subtype: Optional[str] = None) -> Path:
    soundfile.write(str(path), samples.astype(np.float32), rate, subtype=subtype)
    return path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_shard(folder: Path, key: str, edit) -> None:
    """Edit the tensors of the shard holding `key` (the index is left as it is)."""
    from safetensors.torch import save_file

    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _pickle_only(src: Path, dst: Path) -> Path:
    """The checkpoint with its weights as pytorch_model.bin + adapter_model.bin (what transformers wrote before
    safetensors): every loader must refuse it before reading a byte of pickle."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    torch.save(tensors, dst / "pytorch_model.bin")
    torch.save(load_file(str(src / "adapter_model.safetensors")), dst / "adapter_model.bin")
    return dst


class Assets:
    """Bad (and a few good) inputs, made once per module under a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        tiny = build_checkpoint("tiny")
        self.good = tiny
        noise = np.random.default_rng(0).normal(0, 0.1, 32000)
        audio = root / "audio"
        audio.mkdir()
        self.missing_audio = audio / "missing.flac"
        self.folder_audio = audio / "a-folder.wav"
        self.folder_audio.mkdir()
        self.text_audio = audio / "notes.wav"
        self.text_audio.write_text("this is not audio\n")
        self.empty_file = audio / "empty.wav"
        self.empty_file.write_bytes(b"")
        self.zero_wav = _wav(audio / "zero.wav", np.zeros((0, 1)))
        self.short_wav = _wav(audio / "short.wav", noise[:100])
        self.short_44k = _wav(audio / "short-44k.wav", noise[:600], rate=44100)  # 217 samples at 16 kHz
        nan = noise[:16000].copy()
        nan[[5, 900]] = np.nan
        self.nan_wav = _wav(audio / "nan.wav", nan, subtype="FLOAT")
        inf = noise[:16000].copy()
        inf[7] = np.inf
        self.inf_wav = _wav(audio / "inf.wav", inf, subtype="FLOAT")
        self.two_seconds = _wav(audio / "two-seconds.wav", noise)
        self.one_second = _wav(audio / "one-second.wav", noise[:16000])
        self.stereo_44k = _wav(audio / "stereo-44k.wav", np.stack([noise, 0.5 * noise], axis=1), rate=44100)
        self.not_a_folder = audio / "file.txt"
        self.not_a_folder.write_text("x")
        self.fifo = audio / "pipe.wav"  # reading it would block until a writer comes: forever
        os.mkfifo(self.fifo)
        self.non_utf8_clip = Path(os.fsdecode(os.fsencode(str(audio)) + b"/clip-\xff.flac"))
        shutil.copy(CLIP, self.non_utf8_clip)
        self.loud_wav = _wav(audio / "loud.wav", noise[:16000] * 1e30, subtype="FLOAT")
        self.loud_edge_wav = _wav(audio / "loud-edge.wav", np.clip(noise[:16000] * 1e4, -999, 999), subtype="FLOAT")

        ckpt = root / "checkpoints"
        ckpt.mkdir()
        self.missing_ckpt = ckpt / "no-such-checkpoint"
        self.config_only = ckpt / "config-only"
        self.config_only.mkdir()
        shutil.copy(tiny / "config.json", self.config_only)
        self.pickle_only = _pickle_only(tiny, ckpt / "pickle-only")
        self.truncated = self._copy("truncated")
        shard = self.truncated / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
        self.missing_shard = self._copy("missing-shard")
        (self.missing_shard / "model-00002-of-00002.safetensors").unlink()
        self.no_tokenizer = self._copy("no-tokenizer")
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"):
            (self.no_tokenizer / name).unlink(missing_ok=True)
        self.no_preprocessor = self._copy("no-preprocessor")
        (self.no_preprocessor / "preprocessor_config.json").unlink()
        self.bad_json = self._copy("bad-json")
        (self.bad_json / "config.json").write_text("{ not json")
        self.inconsistent = self._copy("inconsistent")
        _edit_json(self.inconsistent / "config.json", lambda c: c.update(window_size=16))
        self.ia3 = self._copy("ia3")
        _edit_json(self.ia3 / "adapter_config.json", lambda c: c.update(peft_type="IA3"))
        self.adapter_config_only = self._copy("adapter-config-only")
        (self.adapter_config_only / "adapter_model.safetensors").unlink()
        self._bad_processor_files()
        self._bad_tensors()
        self.non_utf8_ckpt = Path(os.fsdecode(os.fsencode(str(ckpt)) + b"/ckpt-\xfe"))  # a name POSIX allows
        shutil.copytree(os.fsencode(str(tiny)), os.fsencode(str(self.non_utf8_ckpt)))
        self.adapter_pickle = self._copy("adapter-pickle")
        adapter = self.adapter_pickle / "adapter_model.safetensors"
        torch.save(load_file(str(adapter)), self.adapter_pickle / "adapter_model.bin")
        adapter.unlink()

        reports = root / "reports"
        reports.mkdir()
        self.not_json = reports / "notes.json"
        self.not_json.write_text("not json at all")
        self.not_a_report = reports / "other.json"
        self.not_a_report.write_text(json.dumps({"schema": "something-else/1"}))
        self.minimal_report = reports / "minimal.json"  # enough to be read as a report
        self.minimal_report.write_text(json.dumps({"schema": "parity-report/2", "summary": {}, "sections": []}))
        # complete enough for a diff but for one field each (a hand-edited or truncated report): exit 2, not a KeyError
        probe = {"name": "logits", "propagated": {"status": "pass", "metrics": {"max_abs": 0.0}}}
        whole = {"schema": "parity-report/2", "summary": {"verdict": "pass"},
                 "sections": [{"title": "clip", "summary": {"verdict": "pass"}, "result": {"probes": [probe]}}]}
        self.complete_report = reports / "complete.json"
        self.complete_report.write_text(json.dumps(whole))
        self.no_section_verdict = reports / "no-section-verdict.json"
        self.no_section_verdict.write_text(json.dumps({**whole, "sections": [
            {"title": "clip", "summary": {}, "result": {"probes": [probe]}}]}))
        self.no_probe_status = reports / "no-probe-status.json"
        self.no_probe_status.write_text(json.dumps({**whole, "sections": [
            {"title": "clip", "summary": {"verdict": "pass"}, "result": {"probes": [{"name": "logits",
                                                                                     "propagated": {}}]}}]}))
        self.out = root / "out"
        self.read_only = root / "read-only"
        self.read_only.mkdir()
        self.read_only.chmod(0o555)
        self.full_folder = root / "full"
        self.full_folder.mkdir()
        (self.full_folder / "keep.txt").write_text("x")
        captures = root / "captures"
        self.captures_empty = captures / "empty"
        self.captures_empty.mkdir(parents=True)
        self.captures_garbage = captures / "garbage"
        self.captures_garbage.mkdir()
        (self.captures_garbage / "hf_captures.safetensors").write_bytes(b"\x00" * 64)
        self.captures_fms = captures / "fms-side"
        from parity.capture import Captures

        fms = Captures("fms")
        fms.put("encoder.input_linear", torch.zeros(2, 3))
        fms.save(self.captures_fms / "hf_captures.safetensors")

    def _bad_processor_files(self):
        self.tokenizer_not_json = self._copy("tokenizer-not-json")
        (self.tokenizer_not_json / "tokenizer.json").write_text("{ not json")
        self.tokenizer_unreadable = self._copy("tokenizer-unreadable")
        (self.tokenizer_unreadable / "tokenizer.json").chmod(0)
        for name, edit in (("rate-text", lambda c: c.update(sampling_rate="16000")),
                           ("rate-zero", lambda c: c.update(sampling_rate=0))):
            setattr(self, name.replace("-", "_"), self._copy(name))
            _edit_json(getattr(self, name.replace("-", "_")) / "preprocessor_config.json", edit)
        self.preprocessor_list = self._copy("preprocessor-list")
        (self.preprocessor_list / "preprocessor_config.json").write_text("[16000]")

    def _bad_tensors(self):
        """Checkpoints whose config.json and tensors disagree: every one is refused from the headers alone."""
        self.config_text_number = self._copy("config-text-number")
        _edit_json(self.config_text_number / "config.json", lambda c: c["text_config"].update(hidden_size="64"))
        self.layers_negative = self._copy("layers-negative")
        _edit_json(self.layers_negative / "config.json", lambda c: c["text_config"].update(num_hidden_layers=-1))
        self.shape_mismatch = self._copy("shape-mismatch")
        _edit_json(self.shape_mismatch / "config.json",
                   lambda c: c["text_config"].update(intermediate_size=2 * c["text_config"]["intermediate_size"]))
        self.other_member = self._copy("other-member")  # the tiny 4.1-plus config over 3.3 weights
        shutil.copy(CONFIGS_DIR / "tiny-plus.json", self.other_member / "config.json")
        missing = "language_model.model.layers.0.self_attn.k_proj.weight"
        self.missing_tensor = self._copy("missing-tensor")
        _edit_shard(self.missing_tensor, missing, lambda t: t.pop(missing))
        self.int_weights = self._copy("int-weights")
        integer = "encoder.input_linear.weight"
        _edit_shard(self.int_weights, integer, lambda t: t.update({integer: t[integer].to(torch.int8)}))

    def _copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.good, self.root / "checkpoints" / name))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("bad-inputs"))


class ModelLoaded(BaseException):
    """A model (or the fixture checkpoint) was loaded: a BaseException, so the CLIs' `except Exception` cannot
    turn it into an exit code."""


@pytest.fixture
def no_models(monkeypatch):
    """Every loader the CLIs reach replaced by a tripwire: bad input must be refused before any of them. The modules
    that import a loader by name are imported first and patched too: imported for the first time under the
    tripwire, one would keep it for the rest of the session."""
    import granite_speech
    import granite_speech.checkpoint as checkpoint
    import granite_speech.checkpoint.loading as loading
    import parity.granite.fixtures as fixtures
    import parity.granite.hf as hf
    import parity.granite.models as models

    def tripwire(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded before the input was refused: {args} {kwargs}")

    from fms.utils import serialization

    for module, name in ((granite_speech, "load_model"), (checkpoint, "load_model"), (loading, "load_model"),
                         (hf, "load_hf_model"), (hf, "hf_from_folder"), (models, "load_hf_model"),
                         (models, "hf_from_folder"), (fixtures, "build_checkpoint"),
                         (serialization, "load_state_dict_into_model")):
        monkeypatch.setattr(module, name, tripwire)
    monkeypatch.setattr(torch, "load", tripwire)


def _run(cli: str, argv: List[str]) -> int:
    if cli in ("transcribe", "speech"):
        from granite_speech.__main__ import main

        return main(["transcribe", *argv] if cli == "transcribe" else argv)
    from parity.granite.cli import main

    return main([cli, *argv] if cli in ("compare", "diff") else argv)


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    cli: str  # transcribe | compare | diff | top-level ("parity" / "speech": no subcommand)
    argv: Callable[[Assets], List[str]]
    code: int
    message: str  # regex searched in the one `error:` line
    skip: Optional[str] = None


def _t(a: Assets, *extra, checkpoint=None, clips=None) -> List[str]:
    return ["--checkpoint", str(checkpoint or a.good), *map(str, clips or [CLIP]), *map(str, extra)]


def _c(a: Assets, *extra) -> List[str]:
    return [*map(str, extra)]


CASES = [
    # ---- transcribe: checkpoint folder
    Case("t-checkpoint-missing", "transcribe", lambda a: _t(a, checkpoint=a.missing_ckpt), 2,
         r"--checkpoint: checkpoint folder \S*no-such-checkpoint does not exist"),
    Case("t-checkpoint-is-a-file", "transcribe", lambda a: _t(a, checkpoint=a.not_a_folder), 2,
         r"checkpoint folder \S*file\.txt is a file; expected a Hugging Face checkpoint folder"),
    Case("t-checkpoint-config-only", "transcribe", lambda a: _t(a, checkpoint=a.config_only), 2,
         r"config-only holds no \*\.safetensors files \(only safetensors are loaded, never pickle\)"),
    Case("t-checkpoint-pickle-only", "transcribe", lambda a: _t(a, checkpoint=a.pickle_only), 2,
         r"pickle-only holds only pickle weights \(adapter_model\.bin, pytorch_model\.bin\); Granite Speech loads "
         r"safetensors only, never pickle"),
    Case("t-checkpoint-truncated-shard", "transcribe", lambda a: _t(a, checkpoint=a.truncated), 2,
         r"model-00001-of-00002\.safetensors in \S*truncated is truncated or corrupt"),
    Case("t-checkpoint-missing-shard", "transcribe", lambda a: _t(a, checkpoint=a.missing_shard), 2,
         r"shard\(s\) \['model-00002-of-00002\.safetensors'\] listed in \S*index\.json are missing"),
    Case("t-checkpoint-no-tokenizer", "transcribe", lambda a: _t(a, checkpoint=a.no_tokenizer), 2,
         r"no-tokenizer has no tokenizer \(expected tokenizer_config\.json with tokenizer\.json"),
    Case("t-checkpoint-no-preprocessor", "transcribe", lambda a: _t(a, checkpoint=a.no_preprocessor), 2,
         r"no-preprocessor has no preprocessor_config\.json"),
    Case("t-checkpoint-config-not-json", "transcribe", lambda a: _t(a, checkpoint=a.bad_json), 2,
         r"bad-json/config\.json is not valid JSON"),
    Case("t-checkpoint-config-inconsistent", "transcribe", lambda a: _t(a, checkpoint=a.inconsistent), 2,
         r"--checkpoint: \S+inconsistent/config\.json: window_size \(16\) must be a multiple of downsample_rate \(5\)"),
    Case("t-adapter-not-lora", "transcribe", lambda a: _t(a, checkpoint=a.ia3), 2,
         r"adapter_config\.json: only LoRA adapters are supported"),
    Case("t-adapter-config-without-weights", "transcribe", lambda a: _t(a, checkpoint=a.adapter_config_only), 2,
         r"has adapter_config\.json but no adapter_model\.safetensors"),
    Case("t-adapter-pickle-only", "transcribe", lambda a: _t(a, checkpoint=a.adapter_pickle), 2,
         r"the adapter of \S*adapter-pickle holds only pickle weights \(adapter_model\.bin\)"),
    # ---- transcribe: checkpoint files the processor and the loader read (issue #24: tracebacks or late errors)
    Case("t-checkpoint-path-not-utf8", "transcribe", lambda a: _t(a, checkpoint=a.non_utf8_ckpt), 2,
         r"--checkpoint \S+/ckpt-\\xfe: the path is not valid UTF-8 \(needed by safetensors and the tokenizer\); "
         r"rename \(or link\) it to a UTF-8 name"),
    Case("t-tokenizer-not-json", "transcribe", lambda a: _t(a, checkpoint=a.tokenizer_not_json), 2,
         r"--checkpoint: \S+tokenizer-not-json/tokenizer\.json is not valid JSON"),
    Case("t-tokenizer-unreadable", "transcribe", lambda a: _t(a, checkpoint=a.tokenizer_unreadable), 2,
         r"\S+tokenizer-unreadable/tokenizer\.json cannot be read \(Permission denied\)",
         skip="running as root: chmod 000 does not stop root reading" if os.geteuid() == 0 else None),
    Case("t-preprocessor-rate-text", "transcribe", lambda a: _t(a, checkpoint=a.rate_text), 2,
         r"rate-text/preprocessor_config\.json: feature extractor sampling_rate must be a positive int, got '16000'"),
    Case("t-preprocessor-rate-zero", "transcribe", lambda a: _t(a, checkpoint=a.rate_zero), 2,
         r"rate-zero/preprocessor_config\.json: feature extractor sampling_rate must be a positive int, got 0"),
    Case("t-preprocessor-a-list", "transcribe", lambda a: _t(a, checkpoint=a.preprocessor_list), 2,
         r"preprocessor-list/preprocessor_config\.json holds a JSON list; expected a JSON object"),
    Case("t-config-text-for-a-number", "transcribe", lambda a: _t(a, checkpoint=a.config_text_number), 2,
         r"config-text-number/config\.json: (.*'hidden_size'.* expected int, got str \(value: '64'\)"  # 5.x's check
         r"|text_config\.hidden_size='64' is not supported .* a whole number >= 1)"),  # the config audit's, on 4.57
    Case("t-config-layers-negative", "transcribe", lambda a: _t(a, checkpoint=a.layers_negative), 2,
         r"layers-negative/config\.json: text_config\.num_hidden_layers=-1 is not supported .* supported: a whole "
         r"number >= 1"),
    Case("t-tensor-shape-mismatch", "transcribe", lambda a: _t(a, checkpoint=a.shape_mismatch), 2,
         r"shape-mismatch does not fit its config\.json: shape mismatch .*\.layers\.0\.ff_sub_layer\.w2\.weight: "
         r"checkpoint \[\d+, \d+\], model \[\d+, \d+\]"),
    Case("t-tensor-missing", "transcribe", lambda a: _t(a, checkpoint=a.missing_tensor), 2,
         r"missing-tensor does not fit its config\.json: .*layers\.0\.attn\.in_proj\.key\.weight'\] missing"),
    Case("t-config-of-another-member", "transcribe", lambda a: _t(a, checkpoint=a.other_member), 2,
         r"other-member does not fit its config\.json: (shape mismatch|checkpoint does not match the model)"
         if PLUS_IN_TRANSFORMERS else r"other-member.*granite_speech_plus"),  # 4.57 has no plus classes
    Case("t-tensor-integer-dtype", "transcribe", lambda a: _t(a, checkpoint=a.int_weights), 2,
         r"int-weights holds weights that cannot be loaded: 1 weight tensor\(s\) are not floating point: "
         r"encoder\.input_linear\.weight \(I8, in model-\S+\.safetensors\); expected F16, BF16, F32, F64"),
    Case("c-checkpoint-tensor-missing", "compare", lambda a: _c(a, "--checkpoint", a.missing_tensor), 2,
         r"missing-tensor does not fit its config\.json: .*in_proj\.key\.weight'\] missing"),
    Case("c-checkpoint-path-not-utf8", "compare", lambda a: _c(a, "--checkpoint", a.non_utf8_ckpt), 2,
         r"--checkpoint \S+/ckpt-\\xfe: the path is not valid UTF-8 \(needed by safetensors"),
    Case("c-preprocessor-rate-text", "compare", lambda a: _c(a, "--checkpoint", a.rate_text), 2,
         r"preprocessor_config\.json: feature extractor sampling_rate must be a positive int, got '16000'"),
    Case("t-max-new-tokens-over-the-context", "transcribe", lambda a: _t(a, "--max-new-tokens", "100000000000"), 2,
         r"--max-new-tokens 100000000000 is over this model's context: expected at most 4096 "
         r"\(text_config\.max_position_embeddings of \S+config\.json\)"),
    # ---- transcribe: audio
    Case("t-audio-missing", "transcribe", lambda a: _t(a, clips=[a.missing_audio]), 2,
         r"no such audio file: \S*missing\.flac"),
    Case("t-audio-is-a-folder", "transcribe", lambda a: _t(a, clips=[a.folder_audio]), 2,
         r"a-folder\.wav is a folder; expected an audio file"),
    Case("t-audio-text-file", "transcribe", lambda a: _t(a, clips=[a.text_audio]), 2,
         r"notes\.wav is not a readable audio file \(Format not recognised\.\); expected WAV, FLAC"),
    Case("t-audio-empty-file", "transcribe", lambda a: _t(a, clips=[a.empty_file]), 2,
         r"empty\.wav is not a readable audio file"),
    Case("t-audio-zero-length", "transcribe", lambda a: _t(a, clips=[a.zero_wav]), 2,
         r"zero\.wav holds no audio samples; expected at least 257 samples at 16000 Hz"),
    Case("t-audio-shorter-than-a-frame", "transcribe", lambda a: _t(a, clips=[a.short_wav]), 2,
         r"short\.wav is too short: 100 samples at 16000 Hz \(6\.2 ms\); expected at least 257 samples"),
    Case("t-audio-short-after-resampling", "transcribe", lambda a: _t(a, clips=[a.short_44k]), 2,
         r"short-44k\.wav is too short: 218 samples at 16000 Hz"),
    Case("t-audio-nan", "transcribe", lambda a: _t(a, clips=[a.nan_wav]), 2,
         r"nan\.wav contains 2 NaN/Inf samples; expected finite samples"),
    Case("t-audio-inf", "transcribe", lambda a: _t(a, clips=[a.inf_wav]), 2,
         r"inf\.wav contains 1 NaN/Inf samples"),
    Case("t-audio-too-long", "transcribe", lambda a: _t(a, "--max-audio-seconds", "1.5", clips=[a.two_seconds]), 2,
         r"two-seconds\.wav is 2\.0 s long, over the 1\.5 s limit; split it, or raise the limit with "
         r"--max-audio-seconds"),
    Case("t-audio-named-pipe", "transcribe", lambda a: _t(a, clips=[a.fifo]), 2,
         r"pipe\.wav is a named pipe \(FIFO\), not a regular file; expected an audio file"),
    Case("c-audio-named-pipe", "compare", lambda a: _c(a, "--audio", a.fifo), 2,
         r"pipe\.wav is a named pipe \(FIFO\), not a regular file"),
    Case("c-audio-name-not-utf8", "compare", lambda a: _c(a, "--audio", a.non_utf8_clip), 2,
         r"--audio \S+/clip-\\xff\.flac: the path is not valid UTF-8 \(needed by the HF reference's audio "
         r"loading \(transformers load_audio\)\)"),
    Case("t-audio-amplitude-1e30", "transcribe", lambda a: _t(a, clips=[a.loud_wav]), 2,
         r"loud\.wav has samples of amplitude [0-9.]+e\+(29|30), beyond \+-1000; expected samples in \[-1, 1\]"),
    Case("t-audio-bad-second-clip", "transcribe", lambda a: _t(a, clips=[CLIP, a.text_audio]), 2,
         r"notes\.wav is not a readable audio file"),
    # ---- transcribe: options
    Case("t-device-gpu", "transcribe", lambda a: _t(a, "--device", "gpu"), 2,
         r"--device 'gpu' is not a torch device; expected cpu, cuda or cuda:N"),
    Case("t-device-cuda-without-gpu", "transcribe", lambda a: _t(a, "--device", "cuda"), 2,
         r"--device cuda: torch \S+ sees no CUDA device", skip="a CUDA device is present" if HAS_CUDA else None),
    Case("t-device-cuda-index", "transcribe", lambda a: _t(a, "--device", "cuda:99"), 2,
         r"--device cuda:99: (torch \S+ sees no CUDA device|only \d+ CUDA device\(s\) visible)"),
    Case("t-device-meta", "transcribe", lambda a: _t(a, "--device", "meta"), 2,
         r"--device meta: device type 'meta' is not supported; expected cpu, cuda or cuda:N"),
    Case("t-dtype-float64", "transcribe", lambda a: _t(a, "--dtype", "float64"), 2,
         r"argument --dtype: invalid choice: 'float64'"),
    Case("t-max-new-tokens-zero", "transcribe", lambda a: _t(a, "--max-new-tokens", "0"), 2,
         r"argument --max-new-tokens: expected a whole number >= 1, got 0"),
    Case("t-max-new-tokens-text", "transcribe", lambda a: _t(a, "--max-new-tokens", "many"), 2,
         r"argument --max-new-tokens: expected a whole number >= 1, got 'many'"),
    Case("t-max-audio-seconds-negative", "transcribe", lambda a: _t(a, "--max-audio-seconds", "-5"), 2,
         r"argument --max-audio-seconds: expected a number of seconds > 0, got -5"),
    Case("t-prompt-without-placeholder", "transcribe", lambda a: _t(a, "--prompt", "transcribe this"), 2,
         r"--prompt must contain <\|audio\|> exactly once \(where the clip goes\), found it 0 times"),
    Case("t-prompt-two-placeholders", "transcribe", lambda a: _t(a, "--prompt", "<|audio|> and <|audio|>"), 2,
         r"found it 2 times"),
    Case("t-no-clips", "transcribe", lambda a: ["--checkpoint", str(a.good)], 2,
         r"the following arguments are required: CLIP"),
    Case("t-no-checkpoint", "transcribe", lambda a: [str(CLIP)], 2,
         r"the following arguments are required: --checkpoint"),
    Case("t-unknown-option", "transcribe", lambda a: _t(a, "--beam-size", "4"), 2,
         r"unrecognized arguments: --beam-size 4"),
    Case("speech-no-command", "speech", lambda a: [], 2, r"the following arguments are required: COMMAND"),
    # ---- compare
    Case("c-atol-negative", "compare", lambda a: _c(a, "--atol", "-1"), 2,
         r"argument --atol: expected a finite number >= 0, got -1"),
    Case("c-rtol-nan", "compare", lambda a: _c(a, "--rtol", "nan"), 2,
         r"argument --rtol: expected a finite number >= 0, got nan"),
    Case("c-atol-text", "compare", lambda a: _c(a, "--atol", "tight"), 2,
         r"argument --atol: expected a finite number >= 0, got 'tight'"),
    Case("c-device-gpu", "compare", lambda a: _c(a, "--device", "gpu"), 2, r"--device 'gpu' is not a torch device"),
    Case("c-device-cuda-without-gpu", "compare", lambda a: _c(a, "--device", "cuda"), 2,
         r"--device cuda: torch \S+ sees no CUDA device \(torch\.cuda\.is_available\(\) is False\); use --device cpu",
         skip="a CUDA device is present" if HAS_CUDA else None),
    Case("c-dtype-typo", "compare", lambda a: _c(a, "--dtype", "fp32"), 2, r"argument --dtype: invalid choice: 'fp32'"),
    Case("c-model-unknown", "compare", lambda a: _c(a, "--model", "3b"), 2, r"argument --model: invalid choice: '3b'"),
    Case("c-mode-typo", "compare", lambda a: _c(a, "--mode", "teacher"), 2, r"argument --mode: invalid choice"),
    Case("c-phases-typo", "compare", lambda a: _c(a, "--phases", "three"), 2, r"argument --phases: invalid choice"),
    Case("c-seed-negative", "compare", lambda a: _c(a, "--seed", "-1"), 2,
         r"argument --seed: expected a whole number >= 0, got -1"),
    Case("c-audio-text-file", "compare", lambda a: _c(a, "--audio", a.text_audio), 2,
         r"notes\.wav is not a readable audio file \(Format not recognised\.\)"),
    Case("c-audio-zero-length", "compare", lambda a: _c(a, "--audio", a.zero_wav), 2,
         r"zero\.wav holds no audio samples"),
    Case("c-audio-missing", "compare", lambda a: _c(a, "--audio", a.missing_audio), 2, r"no such audio file"),
    Case("c-audio-nan", "compare", lambda a: _c(a, "--audio", a.nan_wav), 2, r"contains 2 NaN/Inf samples"),
    Case("c-audio-too-long", "compare", lambda a: _c(a, "--audio", a.two_seconds, "--max-audio-seconds", "1"), 2,
         r"is 2\.0 s long, over the 1 s limit"),
    Case("c-audio-no-files", "compare", lambda a: _c(a, "--audio"), 2,
         r"argument --audio: expected at least one argument"),
    Case("c-case-names-no-input", "compare", lambda a: _c(a, "--case", "bf16", "--case", "no such input"), 2,
         r"--case: no default case matches 'no such input'; the cases are \['clip 201 frames"),
    Case("c-case-with-audio", "compare", lambda a: _c(a, "--case", "bf16", "--audio", a.two_seconds), 2,
         r"--case picks among the default inputs and --audio replaces them"),
    Case("c-case-of-another-member", "compare", lambda a: _c(a, "--model", "tiny-5", "--case", "bf16"), 2,
         r"--case: no default case matches 'bf16'; the cases are \['clip 201 frames \(odd"),
    Case("c-case-not-on-this-checkpoint", "compare",
         lambda a: _c(a, "--model", "tiny-4.0", "--case", "LoRA audio_only mode"), 2,
         r"--case LoRA audio_only mode: names only inputs of the separate LoRA adapter .*has no adapter files"),
    Case("c-new-tokens-zero", "compare", lambda a: _c(a, "--new-tokens", "0"), 2,
         r"argument --new-tokens: .*expected a whole number >= 1"),
    Case("c-prompt-without-placeholder", "compare", lambda a: _c(a, "--prompt", "hello"), 2,
         r"--prompt must contain <\|audio\|> exactly once"),
    Case("c-report-is-a-folder", "compare", lambda a: _c(a, "--report", a.root), 2,
         r"--report \S+ is a folder; expected a file path such as \S+/report\.html"),
    Case("c-json-is-a-folder", "compare", lambda a: _c(a, "--json", a.root), 2,
         r"--json \S+ is a folder; expected a file path such as \S+/report\.json"),
    Case("c-report-under-a-file", "compare", lambda a: _c(a, "--report", a.not_a_folder / "r.html"), 2,
         r"--report \S+: \S*file\.txt is a file, so the folder \S+ cannot be made"),
    Case("c-report-name-too-long", "compare", lambda a: _c(a, "--report", a.out / ("r" * 300 + ".html")), 2,
         r"--report \S+/r{300}\.html cannot be written \(File name too long\)|the name r+\.\.\. is 305 bytes"),
    Case("c-json-on-a-virtual-file-system", "compare", lambda a: _c(a, "--json", "/proc/granite-speech/r.json"), 2,
         r"--json /proc/granite-speech/r\.json cannot be written \(",
         skip=None if Path("/proc/self").is_dir() else "no /proc here"),
    Case("c-json-in-a-read-only-folder", "compare", lambda a: _c(a, "--json", a.read_only / "sub" / "r.json"), 2,
         r"--json \S+/read-only/sub/r\.json: cannot write in \S+/read-only \(permission denied\)",
         skip="running as root: a mode-555 folder is writable for root" if os.geteuid() == 0 else None),
    Case("c-json-a-named-pipe", "compare", lambda a: _c(a, "--json", a.fifo), 2,
         r"--json \S+/pipe\.wav is a named pipe or socket; expected a regular file path such as out/report\.json"),
    Case("c-report-same-as-json", "compare", lambda a: _c(a, "--report", a.out / "r", "--json", a.out / "r"), 2,
         r"--report and --json are both \S+; give them different paths"),
    Case("c-checkpoint-missing", "compare", lambda a: _c(a, "--checkpoint", a.missing_ckpt), 2,
         r"--checkpoint: checkpoint folder \S+ does not exist"),
    Case("c-checkpoint-pickle-only", "compare", lambda a: _c(a, "--checkpoint", a.pickle_only), 2,
         r"holds only pickle weights .*safetensors only, never pickle"),
    Case("c-checkpoint-truncated", "compare", lambda a: _c(a, "--checkpoint", a.truncated), 2,
         r"is truncated or corrupt"),
    Case("c-checkpoint-and-model", "compare", lambda a: _c(a, "--checkpoint", a.good, "--model", "tiny"), 2,
         r"--model picks a seeded random fixture and --checkpoint a real folder; pass one of them"),
    Case("c-save-captures-is-a-file", "compare", lambda a: _c(a, "--save-captures", a.not_a_folder), 2,
         r"--save-captures \S+ is a file; expected a folder \(new or empty\)"),
    Case("c-save-captures-not-empty", "compare", lambda a: _c(a, "--save-captures", a.full_folder), 2,
         r"--save-captures \S+ is not empty; expected a new or empty folder"),
    Case("c-reference-captures-missing", "compare", lambda a: _c(a, "--reference-captures", a.root / "nope"), 2,
         r"--reference-captures \S+ does not exist; expected a folder written by --save-captures"),
    Case("c-reference-captures-empty", "compare", lambda a: _c(a, "--reference-captures", a.captures_empty), 2,
         r"--reference-captures \S+ has no hf_captures\.safetensors"),
    Case("c-reference-captures-garbage", "compare", lambda a: _c(a, "--reference-captures", a.captures_garbage), 2,
         r"hf_captures\.safetensors is truncated or not safetensors"),
    Case("c-reference-captures-wrong-side", "compare", lambda a: _c(a, "--reference-captures", a.captures_fms), 2,
         r"holds the 'fms' side's captures; expected the HF reference's"),
    Case("c-unknown-option", "compare", lambda a: _c(a, "--tolerance", "1e-3"), 2,
         r"unrecognized arguments: --tolerance"),
    Case("parity-unknown-command", "parity", lambda a: ["comapre"], 2, r"argument COMMAND: invalid choice: 'comapre'"),
    # ---- diff
    Case("d-old-missing", "diff", lambda a: _c(a, a.root / "old.json", a.not_json), 2,
         r"OLD \S+old\.json does not exist; expected a parity report JSON"),
    Case("d-old-not-json", "diff", lambda a: _c(a, a.not_json, a.not_json), 2,
         r"OLD \S+notes\.json is not a parity report JSON \(Expecting value"),
    Case("d-old-not-a-report", "diff", lambda a: _c(a, a.not_a_report, a.minimal_report), 2,
         r"OLD \S+other\.json is not a parity report JSON \(.*schema 'something-else/1'"),
    Case("d-new-not-a-report", "diff", lambda a: _c(a, a.minimal_report, a.not_a_report), 2,
         r"NEW \S+other\.json is not a parity report JSON \(.*schema 'something-else/1'"),
    Case("d-report-overwrites-old", "diff", lambda a: _c(a, a.minimal_report, a.minimal_report, "--report",
                                                          a.minimal_report), 2,
         r"--report and OLD are both \S+minimal\.json; give them different paths"),
    Case("d-json-overwrites-old", "diff", lambda a: _c(a, a.complete_report, a.no_probe_status, "--json",
                                                       a.complete_report), 2,
         r"--json and OLD are both \S+complete\.json; give them different paths"),
    Case("d-old-missing-section-verdict", "diff", lambda a: _c(a, a.no_section_verdict, a.complete_report), 2,
         r"OLD \S+no-section-verdict\.json is not a complete parity report JSON: field sections\[0\]\.summary\."
         r"verdict is missing"),
    Case("d-new-missing-probe-status", "diff", lambda a: _c(a, a.complete_report, a.no_probe_status), 2,
         r"NEW \S+no-probe-status\.json is not a complete parity report JSON: field sections\[0\]\.result\."
         r"probes\[0\]\.propagated\.status is missing"),
    Case("d-report-is-a-folder", "diff", lambda a: _c(a, a.minimal_report, a.minimal_report, "--report", a.root), 2,
         r"--report \S+ is a folder; expected a file path such as \S+/diff\.html"),
    Case("d-growth-below-one", "diff", lambda a: _c(a, a.not_json, a.not_json, "--growth", "0.5"), 2,
         r"argument --growth: expected a finite factor >= 1"),
    Case("d-growth-infinite", "diff", lambda a: _c(a, a.not_json, a.not_json, "--growth", "inf"), 2,
         r"argument --growth: expected a finite factor >= 1"),
    Case("d-missing-new", "diff", lambda a: _c(a, a.not_json), 2, r"the following arguments are required: NEW\.json"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
                                  for c in CASES])
def test_bad_input_exit_code_and_message(case, assets, no_models, capsys):
    code = _run(case.cli, case.argv(assets))
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}, expected {case.code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and err.rstrip().splitlines()[-1] == error_lines[0], err
    assert re.search(case.message, error_lines[0]), f"{case.message!r} not in {error_lines[0]!r}"
    assert out == "", out  # nothing on stdout: no verdict, no transcript


def test_the_table_is_big_enough():
    assert len(CASES) >= 40


# ---------------------------------------------------------------------------------------------- 0 / 1 / 3
def test_internal_error_exits_3_with_traceback_and_a_report_request(assets, monkeypatch, capsys):
    import parity.granite.cli as cli

    def broken(run, verbosity=0):
        raise RuntimeError("a bug in the run")

    monkeypatch.setattr(cli, "run_compare", broken)
    assert cli.main(["compare", "--checkpoint", str(assets.good)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the run" in err
    assert re.search(r"internal error: granite-speech-parity failed unexpectedly .* please report it", err)


def test_transcribe_internal_error_exits_3(assets, monkeypatch, capsys):
    import granite_speech.__main__ as speech

    monkeypatch.setattr(speech, "run_transcription", lambda job: {}["a bug"])
    assert speech.main(["transcribe", "--checkpoint", str(assets.good), str(CLIP)]) == 3
    err = capsys.readouterr().err
    assert "KeyError: 'a bug'" in err and "please report it" in err


COMPARE_RUNS = (("pass", ["--save-captures", "hf"]),
                ("fail", ["-v", "--atol", "0", "--rtol", "0", "--reference-captures", "hf",
                          "--case", "clip 201 frames"]))
# the two runs in turn (the failing one reads what the passing one saved), each in an interpreter of its own
RUN_IN_TURN = """
import json, subprocess, sys
root, runs = sys.argv[1], json.loads(sys.argv[2])
codes = {}
for name, argv in runs:
    with open(f"{root}/{name}.out", "w") as out, open(f"{root}/{name}.err", "w") as err:
        codes[name] = subprocess.run([sys.executable, "-m", "parity.granite", *argv], stdout=out, stderr=err,
                                     cwd=root).returncode
with open(f"{root}/codes.json", "w") as file:
    json.dump(codes, file)
"""


def _launch_compares(folder: Path):
    runs = [(name, ["compare", "--report", str(folder / f"{name}.html"), "--json", str(folder / f"{name}.json"),
                    *[str(folder / a) if a == "hf" else a for a in extra]]) for name, extra in COMPARE_RUNS]
    # one thread: it runs beside both workers and the other launches, where more threads than cores only spin
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return launch_logged([sys.executable, "-c", RUN_IN_TURN, str(folder), json.dumps(runs)], folder, env=env)


EARLY_LAUNCHES = {"compare_launch": _launch_compares}  # started when collection ends (see the plugin)


compare_launch = launch_fixture("compare_launch")


@pytest.fixture(scope="module")
def compare_reports(compare_launch):
    """One passing and one failing compare run on the tiny fixture (the failing one: zero tolerances on one of the
    default inputs, against the HF side the passing one saved, so HF runs once), each in its own process as users
    run it, so stdout and stderr are what a terminal or a CI log shows (library progress bars included): (folder,
    exit codes, stdouts, stderrs). The failing run is -v. Launched when collection ends, beside the other tests."""
    proc, root = compare_launch
    assert proc.returncode == 0 and (root / "codes.json").is_file(), proc.stderr[-3000:]
    codes = json.loads((root / "codes.json").read_text())
    outs, errs = ({name: (root / f"{name}.{stream}").read_text() for name in codes} for stream in ("out", "err"))
    return root, codes, outs, errs


def test_compare_exits_0_when_parity_holds_and_1_when_it_fails(compare_reports):
    root, codes, _, errs = compare_reports
    assert codes == {"pass": 0, "fail": 1}, errs
    assert all((root / f"{n}.{ext}").is_file() for n in ("pass", "fail") for ext in ("html", "json"))


def test_compare_runs_transcribe_with_both_decoders_against_hfs_recipe(compare_reports):
    root, _, _, _ = compare_reports
    report = json.loads((root / "pass.json").read_text())
    [section] = [s for s in report["sections"] if " · transcribe: " in s["title"]]
    probes = {p["name"]: p for p in section["result"]["probes"]}
    assert set(probes) == {"transcribe.eager.text", "transcribe.fast.text"}
    assert all(p["propagated"]["status"] == "pass" and p["propagated"]["metrics"]["numel"] > 0
               for p in probes.values())
    extra = section["extra"]
    # not degenerate: three clips, three different non-empty transcripts, equal on every side
    assert len(extra["hf_text"]) == 3 and extra["rows_differ"] and all(t.strip() for t in extra["hf_text"])
    assert extra["eager_text"] == extra["fast_text"] == extra["hf_text"]


def test_compare_in_bf16_passes_a_correct_port_with_default_flags(tmp_path):
    """`compare --dtype bfloat16` on the CPU passes a correct port under the default (sharp) rules: 16-bit gates
    from measured floors per row, the
    upcast audit in every model and generation section, exact transcripts from the float32 pair (in 16 bits a
    greedy near-tie may flip a token of a correct port, which the generation sections judge instead)."""
    import contextlib
    import io

    from parity.granite.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["compare", "--dtype", "bfloat16", "--json", str(tmp_path / "bf16.json")])
    report = json.loads((tmp_path / "bf16.json").read_text())
    assert code == 0, [(s["title"], s["summary"]["verdict"]) for s in report["sections"]]
    [section] = [s for s in report["sections"] if " · transcribe: " in s["title"]]
    assert section["extra"]["dtype"].startswith("float32 in a bfloat16 run")
    audited = [s["title"] for s in report["sections"] if "upcast_audit" in s["extra"]]
    assert any(t.endswith(" · model") for t in audited) and any("generation" in t for t in audited)


def test_compare_prints_the_verdict_then_where_reports_went(compare_reports):
    root, _, outs, _ = compare_reports
    for name, verdict in (("pass", "PASS: worst probe at "), ("fail", "FAIL: first divergence ")):
        lines = outs[name].splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(verdict))
        assert lines[at + 1:at + 3] == [f"report: {root / (name + '.html')}", f"json: {root / (name + '.json')}"]


# the library output the quiet default must not show: transformers' "Loading weights" bars and any tqdm bar
LIBRARY_CHATTER = re.compile(r"Loading weights|\d+it/s|\d+/\d+ \[\d\d:\d\d|%\|")


def test_default_compare_output_is_one_line_per_case_then_the_verdict(compare_reports):
    """Quiet by default: the passing run printed 289 lines before (transformers' loading bars, per-probe tables of
    27 sections); now one line per input case (with its time), the verdict line and the two report paths."""
    from parity.granite.cases import default_cases
    from parity.report import headline

    root, _, outs, errs = compare_reports
    out, err = outs["pass"].splitlines(), errs["pass"].splitlines()
    assert out == [headline(json.loads((root / "pass.json").read_text())), f"report: {root / 'pass.html'}",
                   f"json: {root / 'pass.json'}", f"captures: {root / 'hf'}"], outs["pass"]
    assert not LIBRARY_CHATTER.search(outs["pass"] + errs["pass"]), errs["pass"]
    steps = [m.group(1) for m in map(re.compile(r"^  (.+)  \d+\.\d s$").match, err) if m]
    assert steps == ["checkpoint: seeded tiny (built or reused)"] + [c.name for c in default_cases()], err
    notes = [line for line in err if not re.match(r"^  (.+)  \d+\.\d s$", line)]
    assert notes == [], err  # the built-in stereo clip is read without a note
    assert len(out) + len(err) <= len(default_cases()) + 7


def test_the_built_in_stereo_clip_is_read_without_a_note(compare_reports):
    """The built-in stereo clip's down-mix / resample note read like a warning about the user's file."""
    _, _, _, errs = compare_reports
    assert "down-mixed" not in errs["pass"] and "resampling" not in errs["pass"], errs["pass"]


def test_verbose_compare_adds_the_per_probe_tables_and_progress(compare_reports):
    _, _, outs, errs = compare_reports
    assert "PARITY FAIL" in outs["fail"] and re.search(r"worst \d+ of \d+ probes by error/tolerance", outs["fail"])
    assert re.search(r"^\[\s*\d+\.\ds\] case: ", errs["fail"], re.M), errs["fail"]  # every progress message
    assert outs["fail"].splitlines()[-3].startswith("FAIL: first divergence ")


def test_quiet_libraries_silences_transformers_and_restores_it():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from parity.granite.console import quiet_libraries

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    with pytest.raises(RuntimeError):  # restored also when the run raises
        with quiet_libraries():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
            raise RuntimeError("boom")
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()
    with quiet_libraries(enabled=False):  # -vv: untouched
        assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_progress_writes_a_line_per_finished_step():
    from parity.granite.console import StepProgress

    log = io.StringIO()
    steps = StepProgress(0, stream=log)
    for message in ("case: clip A", "transcribe section not run: memory", "case: batch B"):
        steps.message(message)
    assert re.fullmatch(r"  clip A  \d+\.\d s\n", log.getvalue())  # B still runs; other messages only under -v
    steps.finish()
    steps.finish()  # idempotent: no step runs
    assert re.fullmatch(r"  clip A  \d+\.\d s\n  batch B  \d+\.\d s\n", log.getvalue())
    tty = _Terminal()
    live = StepProgress(0, stream=tty)
    live.message("case: clip A")
    assert tty.getvalue() == "  … clip A"  # the running step, replaced in place when it finishes
    live.finish()
    assert re.fullmatch(r"  … clip A\r\x1b\[K  clip A  \d+\.\d s\n", tty.getvalue())
    stopped = _Terminal()
    with pytest.raises(KeyboardInterrupt), StepProgress(0, stream=stopped) as broken:
        broken.message("case: clip A")
        raise KeyboardInterrupt  # the error then printed starts on a line of its own, after where it stopped
    assert re.fullmatch(r"  … clip A\r\x1b\[K  clip A  stopped after \d+\.\d s\n", stopped.getvalue())
    verbose = io.StringIO()
    loud = StepProgress(1, stream=verbose)
    loud.message("case: clip A")
    loud.message("transcribe section not run: memory")
    loud.finish()
    assert re.fullmatch(r"\[\s*\d+\.\ds\] case: clip A\n\[\s*\d+\.\ds\] transcribe section not run: memory\n",
                        verbose.getvalue())


def test_diff_exits_0_when_nothing_grew_and_1_on_regression(compare_reports, capsys):
    from parity.granite.cli import main

    root, _, _, _ = compare_reports
    assert main(["diff", str(root / "pass.json"), str(root / "pass.json"), "--json", str(root / "same.json")]) == 0
    assert json.loads((root / "same.json").read_text())["summary"]["verdict"] == "ok"
    capsys.readouterr()
    assert main(["diff", str(root / "pass.json"), str(root / "fail.json"), "--report", str(root / "d.html")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out.upper() and f"report: {root / 'd.html'}" in out and (root / "d.html").is_file()


# ---------------------------------------------------------------------------------------------- help and version
@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["diff", "--help"]], ids=" ".join)
def test_parity_help_documents_every_option_and_the_exit_codes(argv, capsys):
    from parity.granite.cli import build_parser, main

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and re.search(r"^  2  usage or input error", out, re.M) and "  3  internal" in out
    _assert_every_option_has_help(build_parser())


def test_speech_help_documents_every_option_and_the_exit_codes(capsys):
    from granite_speech.__main__ import build_parser, main

    assert main(["transcribe", "--help"]) == 0
    assert "exit codes:" in capsys.readouterr().out
    _assert_every_option_has_help(build_parser())


def _assert_every_option_has_help(parser):
    import argparse

    def walk(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action.choices.values():
                    yield from walk(choice)
            elif not isinstance(action, argparse._HelpAction):
                yield p.prog, action

    undocumented = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, a in walk(parser) if not a.help]
    assert undocumented == []


@pytest.mark.parametrize("module", ["parity.granite", "granite_speech"])
def test_version(module):
    result = subprocess.run([sys.executable, "-m", module, "--version"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"granite-speech(-parity)? \(granite-speech-fms \S+; torch \S+, transformers \S+, "
                        r"ibm-fms \S+\)\n", result.stdout), result.stdout


def test_real_entry_point_bad_input_is_one_line(assets):
    """Through the interpreter, as CI runs it: exit 2, stderr is one line, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "parity.granite", "compare", "--audio", str(assets.text_audio)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize(
    "path, kwargs, message",
    [
        pytest.param("missing_audio", {}, r"no such audio file", id="missing"),
        pytest.param("folder_audio", {}, r"is a folder; expected an audio file", id="folder"),
        pytest.param("text_audio", {}, r"is not a readable audio file \(Format not recognised\.\)", id="text"),
        pytest.param("zero_wav", {}, r"holds no audio samples", id="zero-length"),
        pytest.param("short_wav", {}, r"is too short: 100 samples", id="too-short"),
        pytest.param("nan_wav", {}, r"contains 2 NaN/Inf samples", id="nan"),
        pytest.param("two_seconds", {"max_seconds": 1.0}, r"is 2\.0 s long, over the 1 s limit", id="too-long"),
        pytest.param("fifo", {}, r"is a named pipe \(FIFO\), not a regular file", id="named-pipe"),
        pytest.param("loud_wav", {}, r"has samples of amplitude \S+, beyond \+-1000", id="amplitude-1e30"),
    ],
)
def test_read_audio_refuses(assets, path, kwargs, message):
    with pytest.raises(AudioInputError, match=message) as excinfo:
        read_audio(getattr(assets, path), 16000, **kwargs)
    assert isinstance(excinfo.value, ValueError) and "\n" not in str(excinfo.value)


def test_read_audio_accepts_loud_audio_within_the_bound(assets):
    """The control of the amplitude bound: float samples up to +-999 (clipping headroom of a float file) load."""
    audio = read_audio(assets.loud_edge_wav, 16000)
    assert 990 < float(audio.abs().max()) <= 999


def test_read_audio_reads_a_file_name_that_is_not_utf8(assets, tmp_path):
    """POSIX file names are bytes: one that is not UTF-8 is read (through its bytes), and named with escapes."""
    name = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/clip-\xff.wav"))
    shutil.copy(assets.one_second, name)
    notes = []
    audio = read_audio(name, 8000, notify=notes.append)
    torch.testing.assert_close(audio, read_audio(assets.one_second, 8000, notify=lambda _: None), rtol=0, atol=0)
    assert notes == [f"{tmp_path}/clip-\\xff.wav: resampling 16000 Hz -> 8000 Hz"]


@pytest.mark.parametrize("max_seconds", [-1, 0, float("nan"), "600"])
def test_read_audio_refuses_a_limit_that_is_not_a_positive_number(assets, max_seconds):
    with pytest.raises(ValueError, match="max_seconds must be a number of seconds > 0"):
        read_audio(assets.two_seconds, 16000, max_seconds=max_seconds)


def test_read_audio_down_mixes_and_resamples_and_says_so(assets):
    notes = []
    audio = read_audio(assets.stereo_44k, 16000, notify=notes.append)
    assert audio.dim() == 1 and audio.dtype == torch.float32 and abs(audio.numel() - 32000 * 16000 // 44100) <= 1
    assert notes == [f"{assets.stereo_44k}: 2 channels down-mixed to mono (mean of the channels)",
                     f"{assets.stereo_44k}: resampling 44100 Hz -> 16000 Hz"]
    # exactly what HF's own audio loading gives (soundfile + mean + soxr HQ, as librosa.load)
    from parity.granite.hf import hf_load_audio

    expected = hf_load_audio(assets.stereo_44k, 16000)
    torch.testing.assert_close(audio, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"checkpoint": "missing_ckpt"}, r"checkpoint: checkpoint folder \S+ does not exist", id="checkpoint"),
        pytest.param({"device": "gpu"}, r"device 'gpu' is not a torch device", id="device"),
        pytest.param({"max_new_tokens": 0}, r"max_new_tokens must be a whole number >= 1, got 0", id="max-new-tokens"),
        pytest.param({"instruction": "no placeholder"}, r"must contain <\|audio\|> exactly once", id="prompt"),
        pytest.param({"clips": []}, r"no audio clips given", id="no-clips"),
        pytest.param({"dtype": torch.float64}, r"dtype 'float64' is not supported", id="dtype"),
        pytest.param({"clips": ["text_audio"]}, r"is not a readable audio file", id="audio"),
        pytest.param({"max_new_tokens": 10**11}, r"max_new_tokens 100000000000 is over this model's context: "
                     r"expected at most 4096", id="max-new-tokens-over-the-context"),
        pytest.param({"clips": ["fifo"]}, r"is a named pipe", id="named-pipe"),
    ],
)
def test_transcribe_api_refuses_before_loading(assets, no_models, kwargs, message):
    from granite_speech.__main__ import transcribe

    args = {"checkpoint": assets.good, "clips": [CLIP], **kwargs}
    if isinstance(args["checkpoint"], str):
        args["checkpoint"] = getattr(assets, args["checkpoint"])
    args["clips"] = [getattr(assets, c) if isinstance(c, str) else c for c in args["clips"]]
    with pytest.raises(UsageError, match=message):
        transcribe(args.pop("checkpoint"), args.pop("clips"), **args)


# ---------------------------------------------------------------------------------------------- never pickle
def _fms_variant(folder):
    from fms.models import get_model

    return get_model("granite_speech", "tiny", model_path=str(folder), source="hf")


PICKLE_ENTRY_POINTS = {
    "check_checkpoint_folder": lambda a: check_checkpoint_folder(a.pickle_only),
    "load_model": lambda a: __import__("granite_speech.checkpoint.loading", fromlist=["x"]).load_model(a.pickle_only),
    "get_model-hf_pretrained": lambda a: __import__("fms.models", fromlist=["x"]).get_model(
        "hf_pretrained", model_path=str(a.pickle_only)),
    "get_model-variant-folder": lambda a: _fms_variant(a.pickle_only),
    "get_model-variant-bin-file": lambda a: _fms_variant(a.pickle_only / "pytorch_model.bin"),
    "get_model-variant-bin-glob": lambda a: _fms_variant(f"{a.pickle_only}/*.bin"),
}


@pytest.mark.parametrize("entry", list(PICKLE_ENTRY_POINTS))
def test_pickle_only_checkpoint_is_refused_before_torch_load(assets, monkeypatch, entry):
    def tripwire(*args, **kwargs):
        raise ModelLoaded("torch.load was called: a pickle file was read")

    monkeypatch.setattr(torch, "load", tripwire)
    with pytest.raises(CheckpointFormatError, match=r"holds only pickle weights \((adapter_model\.bin, )?"
                                                    r"pytorch_model\.bin\); Granite Speech loads safetensors only"):
        PICKLE_ENTRY_POINTS[entry](assets)


def test_hf_reference_refuses_a_pickle_only_checkpoint(assets, monkeypatch):
    from parity.granite.hf import load_hf_model

    def tripwire(*args, **kwargs):
        raise ModelLoaded("torch.load was called: a pickle file was read")

    monkeypatch.setattr(torch, "load", tripwire)
    with pytest.raises(CheckpointFormatError, match=r"holds only pickle weights.*safetensors only"):
        load_hf_model(assets.pickle_only)


def test_fms_guard_leaves_other_architectures_alone(assets):
    # the guard wraps FMS's resolver for granite_speech only: a llama variant with no path resolves as before
    import fms.models as fms_models

    resolver = fms_models.__dict__["__maybe_infer_model_variant"]
    assert resolver._granite_speech_guard
    assert resolver("llama", "micro", None, None)[:2] == ("llama", "micro")


def test_variant_entry_point_still_loads_safetensors(assets):
    model = _fms_variant(assets.good)
    assert sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------------------------------------- pytest plugin
def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # the repository first, then whatever the caller's PYTHONPATH holds (a GPU runner's packages may live there)
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "parity.granite.plugin", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_plugin_refuses_a_pickle_only_checkpoint(assets, tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    result = _pytest(tmp_path, "test_nothing.py", "--checkpoint", str(assets.pickle_only))
    assert result.returncode == 4, result.stdout + result.stderr  # pytest's usage-error code
    assert re.search(r"--checkpoint \S+pickle-only: \S+ holds only pickle weights .*never pickle", result.stderr)


def test_plugin_says_where_reports_went_and_warns_when_none_was_written(tmp_path):
    (tmp_path / "test_writes.py").write_text(textwrap.dedent("""
        import parity.report

        def fake_writer(report, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("report")
            return path

        # before the fixture imports them: a subprocess of its own, so patching the module is harmless
        parity.report.write_html = parity.report.write_json = fake_writer

        def test_writes_teacher_forced_html(write_parity_report):
            write_parity_report({}, "teacher-forced")
    """))
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    html, js = tmp_path / "out" / "r.html", tmp_path / "out" / "r.json"
    wrote = _pytest(tmp_path, "test_writes.py", "--parity-report", str(html))
    assert wrote.returncode == 0, wrote.stdout + wrote.stderr
    assert f"--parity-report (teacher-forced): {tmp_path / 'out' / 'r.teacher-forced.html'}" in wrote.stdout
    silent = _pytest(tmp_path, "test_nothing.py", "--parity-report", str(html), "--parity-json", str(js))
    assert silent.returncode == 0, silent.stdout + silent.stderr
    for option, path in (("--parity-report", html), ("--parity-json", js)):
        assert f"warning: {option} {path} was given but no test wrote a report" in silent.stdout, silent.stdout


def test_repeated_audio_options_add_clips_and_drop_none():
    """`--audio a.wav --audio b.wav` kept only b.wav (argparse's default store): every clip given is compared."""
    from parity.granite.cli import build_parser

    args = build_parser().parse_args(["compare", "--audio", "a.wav", "--audio", "b.wav", "c.wav"])
    assert args.audio == [Path("a.wav"), Path("b.wav"), Path("c.wav")]
    assert build_parser().parse_args(["compare"]).audio == []


def test_an_output_that_is_a_symlink_to_another_path_of_the_run_is_refused(tmp_path, capsys):
    """`--json` linked to `--report` overwrote the HTML; `diff --json` linked to the baseline overwrote the baseline."""
    from parity.granite.cli import main

    (tmp_path / "r.html").write_text("")
    (tmp_path / "j.json").symlink_to(tmp_path / "r.html")
    assert main(["compare", "--report", str(tmp_path / "r.html"), "--json", str(tmp_path / "j.json")]) == 2
    assert "--report and --json are both" in capsys.readouterr().err
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "out.json").symlink_to(tmp_path / "old.json")
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "old.json"), "--json",
                 str(tmp_path / "out.json")]) == 2
    assert (tmp_path / "old.json").read_text() == "{}"


@pytest.mark.parametrize("bad", ["abc", "-1", "0", "nan"])
def test_a_bad_fixture_cache_bound_is_a_usage_error_before_any_build(bad, monkeypatch, capsys):
    """GRANITE_SPEECH_FIXTURE_CACHE_MAX_GIB=abc was a traceback (exit 3) once the fixture was built."""
    from parity.granite.cli import main
    from parity.granite.fixtures import CACHE_MAX_ENV

    monkeypatch.setenv(CACHE_MAX_ENV, bad)
    assert main(["compare"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {CACHE_MAX_ENV} must be a positive number") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- issue #24, item 3
def test_transcripts_and_names_stay_one_line_per_clip(assets, tmp_path, monkeypatch, capsys):
    """A transcript holding a newline (or a tab, or a backslash) broke `clip<TAB>transcript`, one line per clip; a
    clip name that is not UTF-8 was a traceback on print (exit 3). Both are escaped (backslash escapes)."""
    import granite_speech.__main__ as speech

    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/clip-\xff.flac"))
    shutil.copy(CLIP, odd)
    monkeypatch.setattr(speech, "run_transcription", lambda job: ["one\ntwo", "a\\n is\ttwo\rchars"])
    assert speech.main(["transcribe", "--checkpoint", str(assets.good), str(odd), str(CLIP)]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path}/clip-\\xff.flac\tone\\ntwo\n{CLIP}\ta\\\\n is\\ttwo\\rchars\n"


def test_a_fixture_cache_that_is_a_file_is_refused_before_any_build(assets, no_models, monkeypatch, capsys):
    from parity.granite.cli import main
    from parity.granite.fixtures import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(assets.not_a_folder))
    assert main(["compare", "--json", str(assets.out / "c.json"), "--report", str(assets.out / "c.html")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {CACHE_ENV}={assets.not_a_folder} is a file; expected a folder (new or existing) for the "
                   f"seeded fixture checkpoints\n")


def test_a_damaged_cached_fixture_is_named_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """A cached fixture whose shard was truncated after it was built (a full disk): the shard is named and the fix
    said, before either model loads (was: a traceback, exit 3)."""
    import granite_speech.checkpoint.loading as loading
    import parity.granite.hf as hf
    from fms.utils import serialization

    from parity.granite.cli import main
    from parity.granite.fixtures import CACHE_ENV

    cached = build_checkpoint("tiny")
    copy = Path(shutil.copytree(cached, tmp_path / "cache" / cached.name))
    shard = copy / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def tripwire(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the damaged fixture was named")

    for module, name in ((loading, "load_model"), (hf, "load_hf_model"), (serialization, "load_state_dict_into_model")):
        monkeypatch.setattr(module, name, tripwire)
    assert main(["compare", "--json", str(tmp_path / "c.json"), "--report", str(tmp_path / "c.html")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: the cached fixture checkpoint {copy} is damaged: {shard.name} in {copy} is "
                            f"truncated or corrupt"), error
    assert error.endswith("delete that folder and run again (it is rebuilt)"), error


def test_nan_weights_are_named_at_load_not_an_empty_transcript(assets, tmp_path, capsys):
    """NaN in a weight gave exit 0 and an 'empty transcript' warning: the tensor is named at load (exit 2)."""
    from granite_speech.__main__ import main

    folder = Path(shutil.copytree(assets.good, tmp_path / "nan-weights"))
    _edit_shard(folder, "encoder.input_linear.weight",
                lambda t: t["encoder.input_linear.weight"].__setitem__((1, 2), float("nan")))
    assert main(["transcribe", "--checkpoint", str(folder), str(CLIP)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines()[-1] == (
        f"error: checkpoint {folder} holds weights that cannot be used: tensor encoder.input_linear.weight (FMS name) "
        f"holds 1 NaN/Inf value(s), the first at index [1, 2]; expected finite weights (is the checkpoint damaged, or "
        f"saved from a diverged run?)")


def test_compare_case_runs_only_the_named_inputs_and_says_so(tmp_path, capsys):
    """`--case TEXT` runs the default inputs whose names contain TEXT, and the terminal says the verdict covers part
    of them (the report's meta keeps the command line and the inputs that ran)."""
    from parity.granite.cli import main as parity_main

    code = parity_main(["compare", "--case", "LoRA audio_only", "--report", str(tmp_path / "r.html"),
                        "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 0 and "--case: 1 of the 7 default inputs" in err, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert {s["title"].split(" · ")[0] for s in report["sections"]} == {
        "LoRA audio_only mode (on window and tiny block)"}
    assert {row["case"] for row in report["meta"]["inputs"]} == {"LoRA audio_only mode (on window and tiny block)"}
