"""The whole Granite Speech pipeline, FMS against HF, from the audio file to the generated tokens.

For each input case (`Case`) the report gets up to three kinds of sections:
- preprocessing: audio reading / down-mixing / resampling (FMS `read_audio` vs HF's `load_audio`), features, lengths
  and masks (FMS feature extractor vs HF's), prompt expansion (FMS processor vs HF's), each side's own;
- model: every probe of the Granite Speech table, each side fed by its own preprocessing (or, with
  `feed="hf"`, both fed HF's, which isolates the model), teacher-forced by default, decoder probes judged under the
  text validity mask, and each probe's noise floor measured by HF in float64 (for localisation);
- generation: greedy tokens and every step's logits of eager FMS `generate` and of the static-cache fast path,
  each against HF `generate` on HF's own inputs; the first step where they part is the first divergence.
The HF side always gets HF's own prompt construction (its tokenizer's chat template), processor, position ids and
generation settings; nothing the project computes is fed to it.

Every member of the family runs (`member_of(checkpoint)` reads config.json's model_type):
- granite_speech (3.3, and 4.0-1b / 4.1-2b with the LoRA merged in the weights) and granite_speech_plus
  (4.1-2b-plus): the cases above, each with its probe table (`parity.granite.probes_family.probes_for`) and its HF
  class; a checkpoint without adapter files runs only the LoRA regime it has (`family.lora_regime`, in the report);
- granite_speech5_ctc (5.0-470m, no LLM): a CTC pipeline (`ctc_cases`): preprocessing (audio, FMS
  `GraniteSpeech5FeatureExtractor` vs HF's: features and attention mask, exact), the model probes of the 5.0 table
  on valid frames only (one validity mask per frame rate), and a "generation" section: HF `generate`'s per-frame
  greedy ids, the CTC-collapsed ids and the decoded text against FMS `generate` / `ctc_decode` / its processor.
"""

import contextlib
import copy
import itertools
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from parity.capture import (ModelRun, available_bytes, capture_against, capture_model, capture_pair,
                            checkpoint_param_bytes, free_memory, pair_from_values, value_key)
from parity.diff import ParityResult, diff_captures, near_tie_flips
from parity.granite.hf import hf_from_folder, hf_load_audio, hf_logits_to_fms, load_hf_model, set_hf_adapter
from parity.granite.probes import AUDIO_PROBE_PREFIXES, HF_LAYOUT_ALIASES
from parity.granite.probes_family import CTC5, PLUS, SPEECH, masks_for, probes_for
from parity.granite.tp import tp_gather
from parity.precision import LOW_PRECISION, audit_ops, missing_upcasts
from parity.probes import Probe
from parity.store import ReferenceMismatch, ReferenceStore, checkpoint_fingerprint  # noqa: F401 (re-exported)
from parity.tolerances import dtype_name
from parity.verdict import Policy, not_run_record

AUDIO_TOKEN = "<|audio|>"
DEFAULT_INSTRUCTION = f"{AUDIO_TOKEN}can you transcribe the speech into a written format?"
SAMPLING_RATE = 16000
FEEDS = ("own", "hf")
FLOORS = ("auto", "on", "off")


@dataclass(frozen=True)
class Case:
    """One input of the default set: clips (bundled ids or file paths) or text-only instructions."""

    name: str
    clips: Tuple[str, ...] = ()
    instructions: Tuple[str, ...] = ()  # one per row; default: DEFAULT_INSTRUCTION per clip
    lora_mode: str = "merged"  # the FMS model's LoRA regime; HF's adapter is on exactly when audio is given
    generate: int = 0  # greedy new tokens to compare (0: no generation section)
    why: str = ""
    dtype: Optional[str] = None  # run this case in another dtype than the run's (e.g. bf16 as users run it)
    padding_side: str = "left"  # asked of both processors (generation needs left; the forward takes either)
    ends_apart: bool = False  # rows end at a stop token from HF's own path, at different steps (every loop, transcribe)

    def rows(self) -> Tuple[str, ...]:
        return self.instructions or (DEFAULT_INSTRUCTION,) * len(self.clips)


STEREO_44K = "stereo-44k:"  # clip prefix: the bundled clip re-written as a stereo 44.1 kHz wav (reading, resampling)


def default_cases() -> Tuple[Case, ...]:
    """Clips on and just past conformer-block and projector-window boundaries, a padded batch, a text-only prompt,
    both LoRA modes and a file that must be down-mixed and resampled."""
    return (
        Case("clip 201 frames (real block + 1)", ("9003-103-0001",),
             why="one full 200-frame attention block plus one frame; 13 windows + 6 frames"),
        Case("padded batch of 3 (window + 1, on window, tiny block + 1)",
             ("9001-101-0000", "9003-103-0000", "9001-101-0001"), generate=12, ends_apart=True,
             why="clips of 16, 45 and 121 encoder frames: text- and audio-padded, left-padded prompts; greedy rows end "
                 "at different steps (a stop token of HF's own path) in every decoding loop and in transcribe"),
        Case("text only, adapter off, right-padded", instructions=(
            "the quick brown fox", "a much longer prompt about the harbour and the boats that came in at dawn"),
             lora_mode="audio_only", padding_side="right",
             why="no audio: HF's adapter is off, FMS applies no LoRA (audio_only mode); padded on the right, the side "
                 "the tokenizer does not pad on by default"),
        Case("text only, generated (adapter off, left-padded)", instructions=(
            "name three boats", "write one sentence about the tide coming in over the sand"),
             lora_mode="audio_only", generate=4,
             why="a text prompt through every decoding loop: each must keep the adapter off in its prefill and every "
                 "decode step, as HF does without audio"),
        Case("LoRA audio_only mode (on window and tiny block)", ("9004-104-0000",), lora_mode="audio_only",
             generate=6, why="the LoRA kept separate and switched on by the audio, in the prefill and every decode "
                             "step"),
        Case("stereo 44.1 kHz file", (STEREO_44K + "9002-102-0000",),
             why="down-mixing and resampling to 16 kHz before the features"),
        Case("bf16 as users run it (padded batch of 2)", ("9002-102-0000", "9004-104-0001"), generate=8,
             dtype="bfloat16", why="FMS bf16 (eager and fast path) vs HF bf16, judged against HF's own bf16 "
                                   "rounding error (HF float64): a missing fp32 upcast shows here, not in fp32"),
    )


def ctc_cases() -> Tuple[Case, ...]:
    """The CTC (5.0) input set; every case decodes (`generate` > 0 turns the CTC decoding section on). Frame counts
    at the input rate (x1) -> after the two subsampling blocks (x2, x4): odd counts (a stride-2 block drops the
    trailing frame), padded rows at every rate, and one clip long enough for several attention blocks of the real
    model (context 128) at every rate."""
    return (
        Case("clip 201 frames (odd: 201 -> 100 -> 50)", ("9003-103-0001",), generate=1,
             why="an odd frame count at the input rate: the subsampling block drops the trailing frame"),
        Case("padded batch of 3 (16, 45, 121 frames)", ("9001-101-0000", "9003-103-0000", "9001-101-0001"),
             generate=1, why="rows padded at every frame rate: padded keys masked, padded frames zeroed before the "
                             "depthwise convs, masks halved (AND of pairs) after each subsampling block"),
        Case("clip 600 frames (600 -> 300 -> 150)", ("9004-104-0001",), generate=1,
             why="several attention blocks at every rate (the real model's context is 128 frames), a padded last "
                 "block at each"),
        Case("stereo 44.1 kHz file", (STEREO_44K + "9002-102-0000",), generate=1,
             why="down-mixing and resampling to 16 kHz before the features"),
    )


def select_cases(substrings: Sequence[str], cases: Sequence[Case]) -> Tuple[Case, ...]:
    """The `cases` whose names contain one of `substrings` (all of them for none); ValueError naming the cases when
    a substring matches none."""
    if not substrings:
        return tuple(cases)
    for sub in substrings:
        if not any(sub in c.name for c in cases):
            raise ValueError(f"no default case matches {sub!r}; the cases are {[c.name for c in cases]}")
    return tuple(c for c in cases if any(sub in c.name for sub in substrings))


# ---------------------------------------------------------------------------------------------------------------
# audio files


def _clip_path(clip: str, workdir: Path) -> Path:
    from parity.granite.fixtures import SPEECH_DIR

    if clip.startswith(STEREO_44K):
        import soundfile
        import torchaudio

        source = _clip_path(clip[len(STEREO_44K):], workdir)
        samples, rate = soundfile.read(str(source), dtype="float32")
        mono = torchaudio.functional.resample(torch.from_numpy(samples), rate, 44100)
        stereo = torch.stack([mono, 0.5 * mono + 0.01], dim=1).numpy()  # channels differ: a mean is needed
        target = workdir / f"{clip[len(STEREO_44K):]}-stereo-44k.wav"
        soundfile.write(str(target), stereo, 44100, subtype="FLOAT")
        return target
    bundled = SPEECH_DIR / f"{clip}.flac"
    return bundled if bundled.is_file() else Path(clip)


def _attempt(fn: Callable[[], Any]) -> Any:
    """The value, or the exception it raised (recorded on the probe instead of ending the run)."""
    try:
        return fn()
    except ReferenceMismatch:  # a reference saved from another run is the user's input error, not a finding
        raise
    except Exception as err:  # noqa: BLE001 - a failing stage is a finding, reported on its probe
        return err


# ---------------------------------------------------------------------------------------------------------------
# the run


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` lives on `device` ("cuda" means the current card: tensors say "cuda:0", and the two devices
    do not compare equal)."""
    if tensor.device.type != device.type:
        return False
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else None)
    return index is None or tensor.device.index in (index, None)


@dataclass
class Models:
    """The loaded models of a run (loaded once, shared by the cases); `dtype` is the one in use (`at(dtype)`)."""

    checkpoint: Path
    dtype: torch.dtype
    device: torch.device
    hf: Dict[torch.dtype, Any] = field(default_factory=dict)
    hf64_source: Dict[str, torch.dtype] = field(default_factory=dict)  # {"dtype": the one HF's fp64 copy came from}
    fms: Dict[Tuple[torch.dtype, str], Any] = field(default_factory=dict)  # (dtype, lora_mode) -> model
    hf_processor: Any = None
    fms_processor: Any = None
    fast_encoder: str = "eager"  # StaticGenerator(encoder=) of the fast path's generation section

    def at(self, dtype: torch.dtype) -> "Models":
        """The same store, working in `dtype` (models are shared, not copied)."""
        view = copy.copy(self)
        view.dtype = dtype
        return view

    @property
    def member(self) -> str:
        """The checkpoint's HF model_type (granite_speech, granite_speech_plus, granite_speech5_ctc)."""
        return member_of(self.checkpoint)

    def fms_model(self, lora_mode: str):
        if (self.dtype, lora_mode) not in self.fms:
            self.fms[self.dtype, lora_mode] = load_fms_family_model(self.checkpoint, self.dtype, self.device,
                                                                   lora_mode=lora_mode)
        return self.fms[self.dtype, lora_mode]

    def reference(self):
        if self.dtype not in self.hf:
            self.hf[self.dtype] = load_hf_family_model(self.checkpoint, self.dtype, str(self.device))
        return self.hf[self.dtype]

    def reference64(self):
        """HF in float64 made from the working dtype's model: a 16-bit case's floors then hold the same rounded
        weights both sides run, so they measure rounding in the activations only. One such copy at a time."""
        if self.hf64_source.get("dtype") != self.dtype:
            self.hf.pop(torch.float64, None)
            free_memory()
            self.hf[torch.float64] = copy.deepcopy(self.reference()).to(self.device, torch.float64)
            self.hf64_source["dtype"] = self.dtype
        return self.hf[torch.float64].to(self.device)

    def keep_only(self, fms_keys: set, hf_dtypes: set) -> None:
        """Free the working models outside `fms_keys` / `hf_dtypes` (HF's float64 copy stays): the models no later
        case uses, so that a 2b run's bf16 case finds room for its float64 copies without parking."""
        dropped = [k for k in self.fms if k not in fms_keys] + [d for d in self.hf
                                                               if d != torch.float64 and d not in hf_dtypes]
        for key in dropped:
            (self.fms if isinstance(key, tuple) else self.hf).pop(key)
        if dropped:
            free_memory()

    def working_models(self) -> list:
        """The loaded models of the working dtypes (every one but HF's float64 copy)."""
        return [model for dtype, model in self.hf.items() if dtype != torch.float64] + list(self.fms.values())

    def device_bytes(self, models: Optional[list] = None) -> int:
        """What `models` (the working models by default) hold on the run device."""
        return sum(t.numel() * t.element_size()
                   for model in (self.working_models() if models is None else models)
                   for t in itertools.chain(model.parameters(), model.buffers()) if on_device(t, self.device))

    def float64_bytes(self) -> int:
        """What the float64 work holds at once: HF's float64 copy (the floors) and FMS's audio path in float64 (the
        formula check, `audio_path_float64`). Counted on the loaded models, else (a run against saved references,
        where HF is never loaded) on the checkpoint's headers with FMS's copy as large as HF's."""
        fms = self.fms.get((self.dtype, "merged"))
        audio = _values(fms) - _values(*decoder_blocks(fms)) if fms is not None else self.values()
        return 8 * (self.values() + audio)

    def values(self) -> int:
        """How many values the model holds: counted on the loaded HF model, else (a run against saved references,
        where HF is never loaded) on the checkpoint's safetensors headers."""
        loaded = self.hf.get(self.dtype)
        return _values(loaded) if loaded is not None else checkpoint_param_bytes(self.checkpoint, torch.uint8)

    @contextlib.contextmanager
    def float64_room(self):
        """Room on a GPU for the float64 copies: where they would not fit beside the working models, the fewest of
        those (other dtypes' first, then the largest) wait in host memory meanwhile and come back after. Where they
        fit, HF's copy stays on the card for the whole run, made once per working dtype; else it waits in host
        memory between uses too."""
        if self.device.type != "cuda":
            yield
            return
        need, parked = self.float64_bytes(), []
        waiting = sorted((m for m in self.working_models() if self.device_bytes([m])),
                         key=lambda m: (self.dtype in {p.dtype for p in m.parameters()}, -self.device_bytes([m])))
        for model in waiting:
            if not _shortfall(self, need):
                break
            parked.append((model, self.device_bytes([model])))
            model.to("cpu")
            free_memory()
        try:
            yield
        finally:
            hf64 = self.hf.get(torch.float64)
            if parked and hf64 is not None and _shortfall(self, sum(size for _, size in parked), reuse=False):
                hf64.to("cpu")
                free_memory()
            for model, _ in parked:
                model.to(self.device)

    def processors(self):
        if self.hf_processor is None:
            from transformers import AutoProcessor

            self.hf_processor = AutoProcessor.from_pretrained(str(self.checkpoint))
            if self.member == CTC5:
                from granite_speech.features5 import GraniteSpeech5Processor

                self.fms_processor = GraniteSpeech5Processor.from_pretrained(self.checkpoint)
            else:
                from granite_speech.processor import GraniteSpeechProcessor

                self.fms_processor = GraniteSpeechProcessor.from_pretrained(self.checkpoint)
        return self.hf_processor, self.fms_processor


# ---------------------------------------------------------------------------------------------------------------
# family members


def read_config(checkpoint: Union[str, Path]) -> dict:
    import json

    return json.loads((Path(checkpoint) / "config.json").read_text())


def member_of(checkpoint: Union[str, Path]) -> str:
    """The HF model_type of a checkpoint folder; a ValueError for one outside the family."""
    model_type = read_config(checkpoint).get("model_type")
    if model_type not in (SPEECH, PLUS, CTC5):
        raise ValueError(f"{checkpoint} is model_type {model_type!r}, not a Granite Speech family member "
                         f"({SPEECH}, {PLUS}, {CTC5})")
    return model_type


_HF_CLASSES = {SPEECH: "GraniteSpeechForConditionalGeneration", PLUS: "GraniteSpeechPlusForConditionalGeneration",
               CTC5: "GraniteSpeech5ForCTC"}


def load_hf_family_model(folder: Union[str, Path], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The HF reference of any family member in eval mode (3.3: `load_hf_model`, with its adapter checks)."""
    member = member_of(folder)
    if member == SPEECH:
        return load_hf_model(folder, dtype, device)
    import transformers

    klass = getattr(transformers, _HF_CLASSES[member], None)
    if klass is None:
        raise ImportError(f"transformers {transformers.__version__} has no {_HF_CLASSES[member]}")
    return hf_from_folder(klass, folder, dtype, device)


def load_fms_family_model(folder: Union[str, Path], dtype: torch.dtype, device: Union[str, torch.device],
                          lora_mode: str = "merged"):
    """The FMS model of any family member, through `get_model("hf_pretrained")` (5.0 has no LoRA mode)."""
    if member_of(folder) == CTC5:
        import granite_speech  # noqa: F401  (registers the family)
        from fms.models import get_model

        from granite_speech.checkpoint.files import check_checkpoint_folder

        folder = check_checkpoint_folder(folder)
        device = torch.device(device)
        return get_model("hf_pretrained", model_path=str(folder), device_type=device.type,
                         data_type=dtype).to(device).eval()
    from granite_speech.checkpoint import load_model

    return load_model(folder, dtype, device, lora_mode=lora_mode)


def _set_adapter(model, enabled: bool) -> None:
    """HF's modality LoRA on exactly when audio is given -- where the checkpoint has one (a merged-LoRA checkpoint
    has none to switch: its LoRA is in the weights)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        set_hf_adapter(model, enabled)


def regime_of(checkpoint: Union[str, Path], lora_mode: str = "merged") -> dict:
    from granite_speech.family import lora_regime

    return lora_regime(checkpoint, lora_mode)


def cases_for(checkpoint: Union[str, Path], cases: Optional[Sequence[Case]] = None) -> Tuple[Case, ...]:
    """The input set of a checkpoint: `default_cases()` (3.3, plus) or `ctc_cases()` (5.0) unless given; on a
    checkpoint with no adapter files (the LoRA merged in the weights, or none) the cases that exercise the separate
    adapter (lora_mode audio_only) run in the one regime there is (merged), and the one that would repeat an
    audio case is left out."""
    member = member_of(checkpoint)
    if cases is None or (member == CTC5 and tuple(cases) == default_cases()):  # the LLM input set means "default"
        cases = ctc_cases() if member == CTC5 else default_cases()
    if member == CTC5:  # no prompt, no LoRA: clips only, each decoded
        return tuple(replace(case, instructions=(), lora_mode="merged", generate=case.generate and 1)
                     for case in cases if case.clips)
    if (Path(checkpoint) / "adapter_config.json").is_file():
        return tuple(cases)
    regime = regime_of(checkpoint)["regime"]
    kept = []
    for case in cases:
        if case.lora_mode != "audio_only":
            kept.append(case)
        elif not case.clips:  # text only: still a case of its own (no audio anywhere)
            kept.append(replace(case, lora_mode="merged", why=f"{case.why}; this checkpoint has no adapter files "
                                                              f"({regime}): the decoder weights as they are"))
    return tuple(kept)


Section = Tuple[str, str, ParityResult, dict]


def _hf_prompt(tokenizer, instruction: str) -> str:
    """HF's own prompt construction: the tokenizer's chat template (the model card's recipe)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction


def _audio_rows(paths: Sequence[Path]) -> Tuple[List[Tuple[Probe, Any, Any]], list, list, list]:
    """(probe rows, HF audio, FMS audio, input metadata): each clip read by HF's `load_audio` and FMS `read_audio`."""
    from granite_speech.audio import read_audio

    rows: List[Tuple[Probe, Any, Any]] = []
    hf_audio, fms_audio, inputs_meta = [], [], []
    for i, path in enumerate(paths):
        reference = _attempt(lambda: hf_load_audio(path, SAMPLING_RATE))
        # silent: the CLI announced the user's own files when it checked them; the built-in clips need no note
        candidate = _attempt(lambda: read_audio(path, SAMPLING_RATE, notify=lambda note: None))
        rows.append((Probe(f"audio.{i}.samples", "load_audio", "read_audio", teacher=(),
                           note=f"{path.name}: decoded, down-mixed to mono, resampled to {SAMPLING_RATE} Hz"),
                     reference, candidate))
        hf_audio.append(reference)
        fms_audio.append(candidate)
        if isinstance(reference, torch.Tensor):
            inputs_meta.append({"audio": path.name, "seconds": round(reference.numel() / SAMPLING_RATE, 3)})
    return rows, hf_audio, fms_audio, inputs_meta


class _Float64Mel(torch.nn.Module):
    """HF's mel filterbank in float64 on the samples it is given (HF's extractor casts them to float32 first, which
    loses nothing: the float32 samples are the input), so the features' floor is the extractor's own rounding."""

    def __init__(self, mel: torch.nn.Module):
        super().__init__()
        self.mel = copy.deepcopy(mel).double()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.mel(audio.double())


def _preprocessing_floors(paths: Sequence[Path], hf_audio: list, hf_extractor=None):
    """The rounding-only reference of preprocessing (noise floors): each clip read by HF's recipe in float64 and, for
    an extractor with a torchaudio mel filterbank (the LLM members'), HF's features with that filterbank in float64.
    None where HF's own side failed (its probes already say why)."""
    if any(isinstance(audio, BaseException) for audio in hf_audio):
        return None
    rows = [(Probe(f"audio.{i}.samples", "load_audio", "load_audio", teacher=()), value, value)
            for i, path in enumerate(paths) for value in [hf_load_audio(path, SAMPLING_RATE, torch.float64)]]
    if hf_extractor is not None:
        extractor64 = copy.copy(hf_extractor)
        extractor64.mel_filters = _Float64Mel(hf_extractor.mel_filters)
        features = extractor64([audio.numpy() for audio in hf_audio])["input_features"]
        rows.append((Probe("features.input_features", "feature_extractor", "feature_extractor", teacher=()),
                     features, features))
    return pair_from_values(rows).hf


def _preprocess(case: Case, models: Models, workdir: Path) -> Tuple[List[Tuple[Probe, Any, Any]], dict, dict, dict]:
    """(probe rows, HF model inputs, FMS model inputs, extra): each side through its own preprocessing."""
    from granite_speech.__main__ import build_prompt

    hf_processor, fms_processor = models.processors()
    paths = [_clip_path(clip, workdir) for clip in case.clips]
    rows, hf_audio, fms_audio, inputs_meta = _audio_rows(paths)
    hf_prompts = [_hf_prompt(hf_processor.tokenizer, text) for text in case.rows()]
    fms_prompts = [build_prompt(fms_processor.tokenizer, text) for text in case.rows()]
    # a side whose audio could not be read carries that error to its later stages, instead of a follow-on crash
    failed = next((a for a in hf_audio if isinstance(a, BaseException)), None)
    fms_failed = next((a for a in fms_audio if isinstance(a, BaseException)), None)
    if paths:
        hf_extractor = getattr(hf_processor, "audio_processor", None) or hf_processor.feature_extractor  # 5.x / 4.57
        hf_features = failed or _attempt(lambda: hf_extractor([a.numpy() for a in hf_audio]))
        fms_features = fms_failed or _attempt(lambda: fms_processor.feature_extractor(list(fms_audio)))
        for key, klass in (("input_features", "activation"), ("input_features_mask", "exact"),
                           ("audio_embed_sizes", "exact")):
            rows.append((Probe(f"features.{key}", "feature_extractor", "feature_extractor", teacher=(),
                               tolerance_class=klass), _field(hf_features, key), _field(fms_features, key)))
    side = case.padding_side
    hf_batch = failed or _attempt(lambda: hf_processor(text=hf_prompts, audio=[a.numpy() for a in hf_audio] or None,
                                             return_tensors="pt", padding=True, padding_side=side))
    fms_batch = fms_failed or _attempt(lambda: fms_processor(fms_prompts, list(fms_audio) or None,
                                                             padding_side=side))
    for key in ("input_ids", "attention_mask"):
        rows.append((Probe(f"processor.{key}", "processor", "processor", teacher=(), tolerance_class="exact",
                           note=f"after <|audio|> expansion, {side}-padded"), _field(hf_batch, key),
                     _field(fms_batch, key)))
    inputs_meta = inputs_meta or [{"audio": "(text only)"} for _ in case.rows()]
    mask = _field(hf_batch, "attention_mask")
    for count, meta in zip(mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) else [], inputs_meta):
        meta["prompt tokens"] = int(count)
    floors = (_preprocessing_floors(paths, hf_audio, hf_extractor if not isinstance(hf_features, BaseException)
                                    else None) if paths else None)
    return (rows, _model_inputs(hf_batch, models), _model_inputs(fms_batch, models),
            {"inputs": inputs_meta, "floors": floors})


def _field(value: Any, key: str) -> Any:
    if isinstance(value, BaseException):
        return value
    got = value.get(key) if hasattr(value, "get") else None
    if isinstance(got, (list, tuple)):
        got = torch.tensor(got)
    return got


def _model_inputs(batch: Any, models: Models) -> Any:
    if isinstance(batch, BaseException):
        return batch
    out = {}
    for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        if key in batch and batch[key] is not None:
            value = batch[key]
            out[key] = value.to(models.device, models.dtype if key == "input_features" else value.dtype)
    return out


def _shortfall(models: Models, need: int, parked: bool = False, reuse: bool = True) -> Optional[str]:
    """None when `need` more bytes fit on the run device (with 25% headroom), else what they need and what is free.
    `reuse`: HF's float64 copy already made counts as free (the float64 work reuses or replaces it, never holds it
    twice). `parked`: with the working models moved to host memory first (`Models.float64_room`), on a GPU."""
    free = available_bytes(models.device)
    if free is not None and models.device.type == "cuda":
        free += models.device_bytes([models.hf[torch.float64]]) if reuse and torch.float64 in models.hf else 0
        free += models.device_bytes() if parked else 0
    if free is not None and need * 1.25 > free:
        return f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free" + (" with the working models parked in "
                                                                          "host memory" if parked else "")
    return None


def _values(*modules: torch.nn.Module) -> int:
    """How many values the parameters and buffers of `modules` hold."""
    return sum(t.numel() for module in modules for t in itertools.chain(module.parameters(), module.buffers()))


def decoder_blocks(model: torch.nn.Module) -> Tuple[torch.nn.Module, ...]:
    """The decoder blocks of an FMS family model (none for the CTC member): FMS's `Granite.base_model.layers`."""
    layers = getattr(getattr(getattr(model, "language_model", None), "base_model", None), "layers", None)
    return (layers,) if layers is not None else ()


def audio_path_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of an FMS model without its decoder blocks, for the formula check: it compares the audio path
    and the merged embeddings only, and the blocks hold most of an LLM member's weights (2b: 23 GB less in float64).
    The weights are the working float32 model's, upcast exactly as HF's float64 copy is upcast from HF's; the audio
    path holds no LoRA, so the merge's rounding is not in it."""
    blocks = decoder_blocks(model)
    if not blocks:
        return copy.deepcopy(model).to(torch.float64)
    base = model.language_model.base_model
    base.layers = torch.nn.ModuleList().eval()
    try:
        return copy.deepcopy(model).to(torch.float64)
    finally:
        base.layers = blocks[0]


def _float64(inputs: dict) -> dict:
    return {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in inputs.items()}


def _floors_wanted(floors: str, models: Models) -> Tuple[bool, str, Optional[str]]:
    """(measure the floors?, why, the cause when they are not measured: a `parity.verdict.CAUSES` entry)."""
    if floors == "off":
        return False, "noise floors off (--floors off)", "floors off"
    if floors == "on":
        return True, "HF in float64 (requested)", None
    short = _shortfall(models, models.float64_bytes(), parked=True)
    if short:
        return False, f"noise floors not run: an fp64 copy {short}", "memory"
    return True, "HF in float64", None


def _note_not_run(extra: dict, check: str, why: str, cause: Optional[str]) -> None:
    """Record in a section's extras a planned check that did not run (the verdict counts it; nothing is silent)."""
    if cause is not None:
        extra.setdefault("not_run", []).append(not_run_record(check, why, cause))


def _forward_kwargs(member: str) -> dict:
    """What HF's forward gets beside the inputs: no KV cache for the LLM members (a teacher-forced pass)."""
    return {} if member == CTC5 else {"use_cache": False}


def _model_section(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, *, mode: str, floors: str,
                   detail: bool, overrides, phases: str = "one", store: "ReferenceStore",
                   title: str) -> Tuple[ParityResult, dict]:
    from transformers import AutoConfig

    has_audio = "input_features" in hf_inputs
    member = models.member
    hf_config = AutoConfig.from_pretrained(str(models.checkpoint))
    probes = probes_for(hf_config, detail=detail)
    if not has_audio:  # text only: the audio modules do not run on either side
        probes = tuple(p for p in probes if not p.name.startswith(AUDIO_PROBE_PREFIXES))
    masks = masks_for(hf_config, hf_inputs)
    forward_kwargs = _forward_kwargs(member)
    regime = None if member == CTC5 else regime_of(models.checkpoint, case.lora_mode)
    lora = {} if regime is None else {"lora_mode": case.lora_mode, "lora_regime": regime["regime"],
                                      "hf_adapter": has_audio and regime["adapter_files"]}

    def hf_forward(model):
        _set_adapter(model, has_audio)  # HF's forward never toggles the adapter; its generate does, with audio
        return model(**hf_inputs, **forward_kwargs)

    if store.reading:  # HF captures recorded elsewhere: the HF model is never loaded here
        reference = store.get(title, hf_inputs)  # checked against this run's inputs before anything loads
        pair = capture_against(probes, reference, ModelRun(models.fms_model(case.lora_mode),
                                                                  lambda m: m(**fms_inputs), gather=tp_gather()), mode=mode,
                               on_raise="record")
        floor_captures = store.get(f"{title} #floors", hf_inputs, optional=True)
        extra = {**lora, "reference": str(store.path),
                 "floors": "read with the reference" if floor_captures is not None else "not in the reference"}
        _note_not_run(extra, "noise floors", extra["floors"], None if floor_captures is not None else "reference")
        candidate64, extra["float64"], cause = _candidate64(case, models, fms_inputs, probes, floor_captures,
                                                            "reference", store.made_from(f"{title} #floors"))
        _note_not_run(extra, "float64 formula check", extra["float64"], cause)
        if models.dtype in LOW_PRECISION:
            _note_not_run(extra, "upcast audit", "needs the HF model here (--reference-captures)", "reference")
        result = diff_captures(pair, dtype=models.dtype, device=models.device, overrides=overrides,
                               masks=masks, floors=floor_captures, candidate64=candidate64)
        return result, extra
    if phases == "two":  # one model in memory at a time: factories, HF captures on disk in between
        hf = lambda: load_hf_family_model(models.checkpoint, models.dtype, str(models.device))  # noqa: E731
        fms = lambda: load_fms_family_model(models.checkpoint, models.dtype, models.device,  # noqa: E731
                                            lora_mode=case.lora_mode)
    else:
        hf, fms = models.reference(), models.fms_model(case.lora_mode)
    pair = capture_pair(probes, ModelRun(hf, hf_forward), ModelRun(fms, lambda m: m(**fms_inputs), gather=tp_gather()),
                        mode=mode,
                        phases=phases, hf_aliases=HF_LAYOUT_ALIASES, on_raise="record")
    extra = {**lora, "phases": pair.plan.reason}
    floor_captures = None
    if phases == "two":
        wanted, why, cause = False, "noise floors not run in a two-phase run", "phases two"
    else:
        wanted, why, cause = _floors_wanted(floors, models)
    if pair.hf.raised:
        wanted, why, cause = False, "noise floors not run: the HF forward raised", "raised"
    extra["floors"] = why
    _note_not_run(extra, "noise floors", why, cause)
    with models.float64_room():
        if wanted:
            hf64 = models.reference64()
            _set_adapter(hf64, has_audio)
            inputs64 = _float64(hf_inputs)
            floor_captures = capture_model(hf64, lambda m: m(**inputs64, **forward_kwargs), probes, side="hf",
                                           aliases=HF_LAYOUT_ALIASES)
            store.put(f"{title} #floors", floor_captures, hf_inputs, made_from=models.hf64_source["dtype"])
        candidate64, extra["float64"], cause = _candidate64(case, models, fms_inputs, probes,
                                                            None if pair.fms.raised else floor_captures,
                                                            "raised" if pair.fms.raised else cause,
                                                            models.hf64_source.get("dtype"))
    _note_not_run(extra, "float64 formula check", extra["float64"], cause)
    upcasts = None
    if models.dtype in LOW_PRECISION:
        if phases == "two":
            _note_not_run(extra, "upcast audit", "needs both models at once (two-phase run)", "phases two")
        elif pair.hf.raised or pair.fms.raised:
            _note_not_run(extra, "upcast audit", "a side's forward raised", "raised")
        else:
            upcasts, extra["upcast_audit"] = _upcast_audit(pair, hf, hf_forward, fms, lambda m: m(**fms_inputs))
    store.put(title, pair.hf, hf_inputs)
    result = diff_captures(pair, dtype=models.dtype, device=models.device, overrides=overrides, masks=masks,
                           floors=floor_captures, candidate64=candidate64, upcasts=upcasts)
    return result, extra


def _places(captures) -> Dict[str, str]:
    """module path -> the first probe hooked there (the place an op is recorded under)."""
    places: Dict[str, str] = {}
    for name, path in captures.resolved.items():
        places.setdefault(path, name)
    return places


def _upcast_audit(pair, hf, hf_forward, fms, fms_forward) -> Tuple[Dict[str, List[str]], dict]:
    """Both forwards once more under the upcast audit: per probe, the sensitive ops FMS runs in 16 bits where HF
    does not (a missing fp32 upcast)."""
    with torch.no_grad():
        with audit_ops(hf, _places(pair.hf)) as hf_ops:
            hf_forward(hf)
        with audit_ops(fms, _places(pair.fms)) as fms_ops:
            fms_forward(fms)
    missing = missing_upcasts(hf_ops, fms_ops)
    summary = {"hf": {k or "(outside every probe)": sorted(v) for k, v in hf_ops.items()},
               "fms": {k or "(outside every probe)": sorted(v) for k, v in fms_ops.items()}}
    return missing, summary


# where both sides compute in float64 throughout when loaded in float64 (measured on every default case: |FMS - HF|
# <= 4.1e-14 on the 2-core CPU at tiny, 0 on an H200 at tiny and 2b); in the decoder FMS's RoPE casts q and k to
# float32 (fms.modules.positions) and HF computes its RMSNorm statistics in float32
FLOAT64_EXACT_PREFIXES = AUDIO_PROBE_PREFIXES + ("decoder.inputs_embeds",)


def _candidate64(case: Case, models: Models, fms_inputs: dict, probes, floors, floors_cause: Optional[str],
                 floors_from: Optional[torch.dtype]) -> Tuple[Optional[object], str, Optional[str]]:
    """FMS's audio path run in float64 on its own inputs (`audio_path_float64`): beside HF in float64 (the floors),
    rounding is gone, so a formula fault smaller than the run dtype's rounding (an eps, a constant's sixth digit) is
    a plain difference.
    Returns (captures, why, cause): a cause when the check was planned and did not run (`parity.verdict.CAUSES`).
    Planned in float32 cases with audio; a 16-bit case's float64 reference holds its 16-bit weights, FMS's float64
    load the checkpoint's, so the float32 cases of the run are where formulas are checked. `floors_from`: the dtype
    HF's float64 copy behind `floors` was made from (this run's, or the one the reference's fingerprint records)."""
    exact = tuple(p for p in probes if p.name.startswith(FLOAT64_EXACT_PREFIXES))
    if models.dtype != torch.float32 or not exact:
        return None, "not planned here (float32 cases with audio check the formulas)", None
    if floors is None:
        return None, "not run: no HF float64 run to check against", floors_cause or "raised"
    if tp_gather() is not None:
        return None, "not run under tensor parallelism", "tensor parallel"
    if floors_from != torch.float32:  # then HF's copy holds weights rounded to a 16-bit dtype
        source = "unrecorded" if floors_from is None else dtype_name(floors_from)
        return None, f"not run: HF's float64 copy was made from {source} weights", "reference"
    fms = models.fms_model(case.lora_mode)
    need = 8 * (_values(fms) - _values(*decoder_blocks(fms)))
    short = _shortfall(models, need, parked=True)
    if short:
        return None, f"not run: FMS's audio path in float64 {short}", "memory"
    hf64 = models.hf.get(torch.float64)
    if hf64 is not None and _shortfall(models, need + models.device_bytes([hf64])):
        hf64.to("cpu")  # HF's float64 copy has done its part (the floors) and makes room
        free_memory()
    # freed at once: a float64 copy held per LoRA mode would crowd the next case's floors on a GPU
    fms64 = audio_path_float64(fms).to(models.device)
    inputs64 = _float64(fms_inputs)
    try:
        captures = capture_model(fms64, lambda m: m(**inputs64), exact, side="fms", on_raise="record")
    finally:
        del fms64
        free_memory()
    return captures, (f"FMS and HF in float64 on the same inputs, {len(exact)} probes of the audio path (formula "
                      "check; the decoder is left out: FMS rotates q and k in float32 even in a float64 model)"), None


def _generation_inputs(hf_inputs: dict, steps: int, stop: Optional["Ending"] = None) -> dict:
    """What an HF `generate` run is recorded from, for the reference store: its inputs, new tokens and stop token."""
    return {**hf_inputs, "new_tokens": torch.tensor(steps),
            **({} if stop is None else {"stop": torch.tensor([stop.token, stop.pad])})}


@dataclass(frozen=True)
class Ending:
    """Where greedy rows end: `token` taken as end-of-text; a row that emitted it holds `pad` from then on."""

    token: int
    pad: int


def pick_stop_token(tokens: torch.Tensor, exclude: Sequence[Optional[int]] = ()) -> Optional[Tuple[int, list]]:
    """A token of HF's greedy rows [B, S] that, taken as end-of-text, ends the rows at different steps: (token, each
    row's end step or None). Preferred: every row ends (the loop must stop by itself), then the most distinct end
    steps, then the latest end (the most steps compared); the smallest id on a tie. None when no token ends two
    rows at different steps."""
    rows, best, best_key = tokens.tolist(), None, None
    for token in sorted(set(tokens.flatten().tolist()) - set(exclude)):
        ends = [row.index(token) if token in row else None for row in rows]
        stops = {end for end in ends if end is not None}
        key = (None not in ends, len(stops), max(stops, default=-1))
        if len(stops) >= 2 and (best_key is None or key > best_key):
            best, best_key = (token, ends), key
    return best


def _row_ends(tokens: torch.Tensor, stop: Optional[Ending]) -> List[Optional[int]]:
    """Each row's end step (the first `stop.token`), None where it runs to the last step or there is no stop."""
    rows = tokens.tolist()
    return [row.index(stop.token) if stop is not None and stop.token in row else None for row in rows]


def _hf_generation(case: Case, models: Models, hf_inputs: dict, store: "ReferenceStore",
                   stop: Optional[Ending] = None) -> Tuple[torch.Tensor, list]:
    """HF `generate`'s greedy tokens [B, n] and per-step logits (FMS scale), run here or read from the store. Without
    `stop`, n = case.generate (end-of-text suppressed); with it, rows end at `stop.token` and hold `stop.pad` after
    it, and generation stops when every row has ended (HF's rule), so n may be smaller."""
    key = f"{case.name} · HF generate" + ("" if stop is None else f" · rows end at {stop.token}")
    recorded_from = _generation_inputs(hf_inputs, case.generate, stop)
    if store.reading:
        saved = store.get(key, recorded_from)
        steps = int(saved.get("steps"))
        tokens = torch.stack([saved.get(f"step.{k}.token") for k in range(steps)], dim=1)
        return tokens, [saved.get(f"step.{k}.logits") for k in range(steps)]
    hf = models.reference()
    _set_adapter(hf, "input_features" in hf_inputs)
    ending = ({"min_new_tokens": case.generate} if stop is None
              else {"eos_token_id": stop.token, "pad_token_id": stop.pad})
    with torch.no_grad():
        hf_out = hf.generate(**hf_inputs, max_new_tokens=case.generate, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **ending)
    scaling = hf.config.text_config.logits_scaling
    tokens = hf_out.sequences[:, hf_inputs["input_ids"].size(1):].cpu()
    logits = [hf_logits_to_fms(step, scaling).to(models.dtype).cpu() for step in hf_out.logits]
    values = [("steps", torch.tensor(tokens.size(1)))] + [
        (f"step.{k}.{part}", value) for k in range(tokens.size(1))
        for part, value in (("token", tokens[:, k]), ("logits", logits[k]))]
    saved = pair_from_values([(Probe(name, "generate", "generate", teacher=()), value, value)
                              for name, value in values]).hf
    store.put(key, saved, recorded_from)
    return tokens, logits


def _choose_ending(case: Case, models: Models, hf_inputs: dict, store: "ReferenceStore") -> Tuple[Optional[Ending],
                                                                                                   dict]:
    """For a case whose rows must end apart: the ending of HF's own greedy path (end-of-text suppressed, so a stop
    token of it), so that every decoding loop is run over rows ending at different steps. (ending or None, extras)."""
    hf_tokens, _ = _hf_generation(case, models, hf_inputs, store)
    return ending_apart(hf_tokens, models.processors()[0].tokenizer, "greedy")


def ending_apart(tokens: torch.Tensor, tokenizer, path: str) -> Tuple[Optional[Ending], dict]:
    """(the ending that makes HF's rows [B, S] end at different steps, or None; extras): end-of-text where it already
    does, else a token of the path that does (`pick_stop_token`); None, and the check noted not run, where none does."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    ends = _row_ends(tokens, Ending(eos, pad))
    if len({end for end in ends if end is not None}) >= 2:
        return Ending(eos, pad), {"rows_end": {"stop_token": eos, "end_of_text": True, "hf_end_steps": ends}}
    picked = pick_stop_token(tokens, exclude=(pad, eos))
    if picked is None:
        extra = {"rows_end": f"no token of HF's {path} path ends the rows at different steps"}
        _note_not_run(extra, "rows ending apart", extra["rows_end"], "inputs")
        return None, extra
    return Ending(picked[0], pad), {"rows_end": {"stop_token": picked[0], "pad": pad, "hf_end_steps": picked[1]}}


def _hf_generation_floors(case: Case, models: Models, hf_inputs: dict, hf_tokens: torch.Tensor,
                          store: "ReferenceStore", stop: Optional[Ending] = None):
    """HF in float64 run once over the prompt and HF's own greedy tokens (teacher-forced along HF's path): each step's
    logits on exactly HF's prefix, the rounding-only reference of every step (its noise floor). A float64 `generate`
    would part from HF's tokens at HF's own near ties and leave the later steps, where a tie may flip, unmeasured.
    Ended rows are fed their pad with the mask extended, as HF `generate` feeds them."""
    key = f"{case.name} · HF generate #floors" + ("" if stop is None else f" · rows end at {stop.token}")
    recorded_from = _generation_inputs(hf_inputs, case.generate, stop)
    if store.reading:
        return store.get(key, recorded_from, optional=True)
    steps = hf_tokens.size(1)
    inputs64 = _float64(hf_inputs)
    prompt = inputs64["input_ids"]
    tokens = hf_tokens[:, : steps - 1].to(prompt.device)
    mask = torch.cat([inputs64["attention_mask"], torch.ones_like(tokens)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate derives them
    with models.float64_room(), torch.no_grad():
        hf64 = models.reference64()
        _set_adapter(hf64, "input_features" in hf_inputs)
        out = hf64(**{**inputs64, "input_ids": torch.cat([prompt, tokens], dim=1), "attention_mask": mask},
                   position_ids=positions, use_cache=False)
    scaling = hf64.config.text_config.logits_scaling
    start = prompt.size(1) - 1
    floors = pair_from_values([(Probe(f"step.{k}.logits", "generate", "generate", teacher=()), value, value)
                               for k in range(steps)
                               for value in [hf_logits_to_fms(out.logits[:, start + k], scaling).cpu()]]).hf
    store.put(key, floors, recorded_from, made_from=models.hf64_source["dtype"])
    return floors


def _fast_runs(models: Models) -> Dict[str, dict]:
    """The fast-path loops of a generation section: {label: StaticGenerator keywords}. A non-eager `--fast-encoder`
    is the first loop's (compiled once per clip shape); the static prefill's loop keeps the eager encoder."""
    label, first = "fast path", {"static_prefill": False}
    if models.fast_encoder != "eager":
        label = f"fast path, {models.fast_encoder} encoder"
        backend = "inductor" if models.device.type == "cuda" else "aot_eager"  # the CPU has no inductor flex kernel
        first.update(encoder=models.fast_encoder, compile_backend=backend)
    return {label: first, "fast path, static prefill": {"static_prefill": True}}


def _fms_generation_runs(case: Case, models: Models, fms_inputs: dict, stop: Optional[Ending], audit: bool):
    """Each FMS decoding loop on the case: {label: (tokens [B, n], per-step logits) or the exception it raised} and
    the ops each ran in 16 bits (the upcast audit). Eager stops by itself when every row has ended; the fast path
    (single-device: not run under tensor parallelism) runs every step, its ended rows held at pad."""
    from granite_speech.fast_generate import StaticGenerator
    from granite_speech.generation import generate_greedy
    from granite_speech.model import padding_attn_kwargs

    fms = models.fms_model(case.lora_mode)
    steps, fms_len = case.generate, fms_inputs["input_ids"].size(1)
    ops: Dict[str, Dict[str, set]] = {}
    eos, pad = (None, None) if stop is None else (stop.token, stop.pad)

    def audited(logits: list):
        return audit_ops(place=lambda: f"step.{len(logits)}.logits") if audit else contextlib.nullcontext({})

    def run_eager():
        logits: List[torch.Tensor] = []
        extra_kwargs = {k: v for k, v in fms_inputs.items() if k in ("input_features", "input_features_mask")}
        extra_kwargs.update(padding_attn_kwargs(fms_inputs["attention_mask"], dtype=models.dtype))
        with audited(logits) as seen:
            tokens = generate_greedy(fms, fms_inputs["input_ids"], max_new_tokens=steps, eos_token_id=eos,
                                     pad_token_id=pad, extra_kwargs=extra_kwargs, on_step=logits.append)
        ops["eager FMS generate"] = seen
        return tokens[:, fms_len:], logits

    def run_fast(label: str, kwargs: dict):
        logits: List[torch.Tensor] = []
        with audited(logits) as seen:
            fast = StaticGenerator(fms, fms_len + steps, use_cuda_graph=models.device.type == "cuda", **kwargs)
            audio = fast.encode_audio(fms_inputs["input_features"]) if "input_features" in fms_inputs else None
            logits.append(fast.prefill(fms_inputs["input_ids"], audio, fms_inputs.get("input_features_mask"),
                                       fms_inputs["attention_mask"], eos, pad).clone())
            for _ in range(1, steps):
                logits.append(fast.decode_step().clone())
        ops[label] = seen
        return fast.tokens(fms_len + steps)[:, fms_len:].clone(), logits

    tensor_parallel = tp_gather() is not None
    with torch.no_grad():
        runs = {"eager FMS generate": _attempt(run_eager)}
        for label, kwargs in _fast_runs(models).items():
            runs[label] = None if tensor_parallel else _attempt(lambda: run_fast(label, kwargs))
    return runs, ops


def _generation_rows(hf_run, run, steps: int, dtype: torch.dtype, ties: Dict[int, dict],
                     ends: Sequence[Optional[int]]) -> Tuple[list, Dict[str, torch.Tensor]]:
    """Probe rows of one loop against HF generate: each step's token (exact; pad after a row's end) and logits. A
    row's logits are compared up to its end step (later ones only feed pad), and a row that flipped at a near tie up
    to that step's logits (its later prefixes differ)."""
    def step_values(run, step: int, cast: Optional[torch.dtype] = None) -> Tuple[Any, Any]:
        if isinstance(run, BaseException):
            return run, run
        tokens, logits = run
        token = tokens[:, step].cpu() if step < tokens.size(1) else None
        value = logits[step] if step < len(logits) else None
        return token, None if value is None else value.to(cast or value.dtype).cpu()

    rows, masks = [], {}
    batch = len(ends)
    for step in range(steps):
        hf_token, hf_logits = step_values(hf_run, step)
        token, logits = step_values(run, step, dtype)
        for part, hf_value, value, klass, last in (("token", hf_token, token, "exact", -1),
                                                   ("logits", hf_logits, logits, "logits", 0)):
            keep = torch.tensor([(r not in ties or step <= ties[r]["step"] + last)
                                 and (part == "token" or ends[r] is None or step <= ends[r]) for r in range(batch)])
            if batch and not keep.any():
                continue
            valid = "" if batch == 0 or bool(keep.all()) else f"{part}.{step}"
            if valid:
                masks[valid] = keep
            rows.append((Probe(f"step.{step}.{part}", "generate", "generate", teacher=(), tolerance_class=klass,
                               valid=valid), hf_value, value))
    return rows, masks


def _generation_sections(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, overrides,
                         store: "ReferenceStore", floors: str = "auto") -> List[Section]:
    """Every decoding loop (eager FMS generate, the fast path with each prefill) against HF `generate`: greedy tokens
    and per-step logits, judged against HF float64 floors along HF's own tokens, with the near-tie rule and the
    upcast audit in 16 bits. A case with `ends_apart` runs them over rows that end at different steps."""
    # the upcast audit in 16-bit runs: the ops each side runs in 16 bits, FMS's per step, HF's over its generate
    audit = models.dtype in LOW_PRECISION and not store.reading
    stop, ending_extra = None, {}
    if case.ends_apart:
        chosen = _attempt(lambda: _choose_ending(case, models, hf_inputs, store))
        stop, ending_extra = (None, {"rows_end": repr(chosen)}) if isinstance(chosen, BaseException) else chosen
        if isinstance(chosen, BaseException):
            _note_not_run(ending_extra, "rows ending apart", "HF generate raised", "raised")
    hf_ops: Dict[str, set] = {}

    def run_hf():
        with (audit_ops(place=lambda: "generate") if audit else contextlib.nullcontext({})) as seen:
            result = _hf_generation(case, models, hf_inputs, store, stop)
        hf_ops.update(seen)
        return result

    # a side that raised is reported on every step it did not reach, instead of ending the run
    hf_run = _attempt(run_hf)
    floor_captures, floors_why, floors_cause = _generation_floors(case, models, hf_inputs, hf_run, store, floors,
                                                                  stop)
    runs, ops = _fms_generation_runs(case, models, fms_inputs, stop, audit)
    steps = case.generate if isinstance(hf_run, BaseException) else hf_run[0].size(1)
    ends = [] if isinstance(hf_run, BaseException) else _row_ends(hf_run[0], stop)
    sections = []
    for label, run in runs.items():
        if run is None:
            continue
        ties = _near_ties(hf_run, run, floor_captures, models.dtype)
        rows, masks = _generation_rows(hf_run, run, steps, models.dtype, ties, ends)
        if stop is not None and label == "eager FMS generate":  # the one loop that stops by itself
            rows.append((Probe("generate.new_tokens", "generate", "generate", teacher=(), tolerance_class="exact",
                               note="new tokens before every row ended"), _new_tokens(hf_run), _new_tokens(run)))
        upcasts = None
        if audit and not isinstance(hf_run, BaseException):
            upcasts = missing_upcasts(hf_ops, ops.get(label, {}), lambda place: "generate")
        result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides,
                               floors=floor_captures, masks=masks, upcasts=upcasts)
        extra = {"new_tokens": case.generate, "floors": floors_why, **copy.deepcopy(ending_extra)}
        _note_not_run(extra, "noise floors", floors_why, floors_cause)
        _generation_extras(extra, models, store, hf_run, hf_ops, ops.get(label, {}), upcasts, ties)
        sections.append((f"{case.name} · generation: {label} vs HF generate", "generation", result, extra))
    return sections


def _new_tokens(run) -> Any:
    """How many tokens a decoding loop returned (the exception it raised, if it did)."""
    return run if isinstance(run, BaseException) else torch.tensor(run[0].size(1))


def _generation_floors(case: Case, models: Models, hf_inputs: dict, hf_run, store: "ReferenceStore", floors: str,
                       stop: Optional[Ending]):
    """(floor captures or None, why, the not-run cause or None) of a generation case."""
    if isinstance(hf_run, BaseException):
        return None, "noise floors not run (HF generate raised)", "raised"
    if store.reading:
        wanted, why, cause = True, "read with the reference", None
    else:
        wanted, why, cause = _floors_wanted(floors, models)
    if not wanted:
        return None, why, cause
    captures = _hf_generation_floors(case, models, hf_inputs, hf_run[0], store, stop)
    if captures is None:
        return None, "noise floors not in the reference captures", "reference"
    return captures, why, cause


def _generation_extras(extra: dict, models: Models, store: "ReferenceStore", hf_run, hf_ops, fms_ops, upcasts,
                       ties: Dict[int, dict]) -> None:
    """A generation section's extras beside its probes: the upcast audit (or why not), the fast path's absence under
    tensor parallelism, near-tie flips, and how varied HF's tokens are."""
    if upcasts is not None:
        extra["upcast_audit"] = {"hf": sorted(hf_ops.get("generate", ())),
                                 "fms": {k: sorted(v) for k, v in fms_ops.items()}}
    elif models.dtype in LOW_PRECISION:
        _note_not_run(extra, "upcast audit", "needs HF generate run here" if store.reading else "HF generate raised",
                      "reference" if store.reading else "raised")
    if tp_gather() is not None:
        extra["fast_path"] = "not run: the fast path is single-device (tensor-parallel run)"
        _note_not_run(extra, "fast path generation", extra["fast_path"], "tensor parallel")
    if ties:
        extra["near_tie_flips"] = [ties[r] for r in sorted(ties)]
    if not isinstance(hf_run, BaseException):
        hf_tokens = hf_run[0]
        extra.update(distinct_hf_tokens=len(set(hf_tokens.flatten().tolist())),
                     rows_differ=bool(hf_tokens.size(0) > 1 and not (hf_tokens == hf_tokens[:1]).all()))


def _ranks() -> int:
    """The ranks the FMS decoder is sharded over (1: not tensor parallel)."""
    return torch.distributed.get_world_size() if tp_gather() is not None else 1


def _rows(*runs) -> int:
    return next(run[0].size(0) for run in runs if not isinstance(run, BaseException))


def _near_ties(hf_run, run, floor_captures, dtype: torch.dtype) -> Dict[int, dict]:
    """`parity.diff.near_tie_flips` on two generation runs (none where a side raised or no floor was measured)."""
    if isinstance(hf_run, BaseException) or isinstance(run, BaseException) or floor_captures is None:
        return {}
    (hf_tokens, hf_logits), (tokens, _) = hf_run, run
    hf64 = {k: floor_captures.get(value_key(f"step.{k}.logits")) for k in range(len(hf_logits))}
    return near_tie_flips(hf_tokens, hf_logits, tokens, {k: v for k, v in hf64.items() if v is not None},
                          dtype_name(dtype))


# ---------------------------------------------------------------------------------------------------------------
# the CTC member (5.0): preprocessing and greedy decoding


def _preprocess_ctc(case: Case, models: Models, workdir: Path) -> Tuple[List[Tuple[Probe, Any, Any]], dict, dict,
                                                                         dict]:
    """(probe rows, HF model inputs, FMS model inputs, extra): audio, then HF's GraniteSpeech5Processor vs FMS
    `GraniteSpeech5Processor` (features and frame mask, both exact)."""
    hf_processor, fms_processor = models.processors()
    paths = [_clip_path(clip, workdir) for clip in case.clips]
    rows, hf_audio, fms_audio, inputs_meta = _audio_rows(paths)
    hf_batch = _attempt(lambda: hf_processor(audio=[a.numpy() for a in hf_audio], sampling_rate=SAMPLING_RATE,
                                             return_tensors="pt"))
    fms_batch = _attempt(lambda: fms_processor(list(fms_audio), sampling_rate=SAMPLING_RATE))
    for key, note in (("input_features", "log-mel + deltas, frame pairs stacked [B, T, 4 x mel bins]"),
                      ("attention_mask", "valid input frames [B, T]")):
        rows.append((Probe(f"features.{key}", "GraniteSpeech5Processor", "GraniteSpeech5Processor", teacher=(),
                           tolerance_class="exact", note=note), _field(hf_batch, key), _field(fms_batch, key)))
    mask = _field(hf_batch, "attention_mask")
    for count, meta in zip(mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) else [], inputs_meta):
        meta["frames"] = int(count)
    return (rows, _ctc_inputs(hf_batch, models), _ctc_inputs(fms_batch, models),
            {"inputs": inputs_meta, "floors": _preprocessing_floors(paths, hf_audio)})


def _ctc_inputs(batch: Any, models: Models) -> Any:
    if isinstance(batch, BaseException):
        return batch
    return {"input_features": batch["input_features"].to(models.device, models.dtype),
            "attention_mask": batch["attention_mask"].to(models.device)}


def _text_tensor(texts: Sequence[str]) -> torch.Tensor:
    """Texts as UTF-8 bytes [B, longest], padded with -1: an exact comparison of strings by the engine."""
    encoded = [list(text.encode("utf-8")) for text in texts]
    out = torch.full((len(encoded), max([len(e) for e in encoded] + [1])), -1, dtype=torch.long)
    for row, values in enumerate(encoded):
        out[row, : len(values)] = torch.tensor(values, dtype=torch.long)
    return out


def _tensor_text(values: torch.Tensor) -> List[str]:
    return [bytes(v for v in row.tolist() if v >= 0).decode("utf-8", errors="replace") for row in values]


def _ids_tensor(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token-id rows of different lengths [B, longest], padded with -1."""
    out = torch.full((len(rows), max([len(r) for r in rows] + [1])), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return out


def _hf_ctc_decoding(case: Case, models: Models, hf_inputs: dict, store: "ReferenceStore") -> Dict[str, torch.Tensor]:
    """HF's greedy CTC decoding: `GraniteSpeech5ForCTC.generate` (per-frame argmax, padded frames = blank), the
    collapse its tokenizer applies (repeats merged, blank dropped) and the processor's `batch_decode` text."""
    from itertools import groupby

    key = f"{case.name} · HF generate"
    if store.reading:
        saved = store.get(key, hf_inputs)
        return {name: saved.get(name) for name in ("ctc.frame_ids", "ctc.ids", "ctc.text")}
    hf = models.reference()
    hf_processor, _ = models.processors()
    with torch.no_grad():
        frame_ids = hf.generate(**hf_inputs).cpu()
    blank = hf.config.pad_token_id
    collapsed = [[t for t, _ in groupby(row) if t != blank] for row in frame_ids.tolist()]
    texts = hf_processor.batch_decode(frame_ids, skip_special_tokens=True)
    values = {"ctc.frame_ids": frame_ids, "ctc.ids": _ids_tensor(collapsed), "ctc.text": _text_tensor(texts)}
    store.put(key, pair_from_values([(Probe(name, "generate", "generate", teacher=()), value, value)
                                     for name, value in values.items()]).hf, hf_inputs)
    return values


def _ctc_generation_sections(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, overrides,
                             store: "ReferenceStore", floors: str = "auto") -> List[Section]:
    """FMS `generate` (per-frame ids), `ctc_decode` (collapsed ids) and its processor's text, each exactly against
    HF's on HF's own inputs' clips (each side its own features, as the model section). `floors` is accepted for the
    common signature and has nothing to act on: every value here is ids or text, compared exactly."""
    fms = models.fms_model(case.lora_mode)
    _, fms_processor = models.processors()
    hf = _hf_ctc_decoding(case, models, hf_inputs, store)
    with torch.no_grad():
        frame_ids = fms.generate(fms_inputs["input_features"], fms_inputs["attention_mask"]).cpu()
        collapsed = fms.ctc_decode(fms_inputs["input_features"], fms_inputs["attention_mask"])
    texts = fms_processor.decode_collapsed(collapsed)
    notes = {"ctc.frame_ids": "per-frame argmax, padded frames = blank (HF GraniteSpeech5ForCTC.generate)",
             "ctc.ids": "CTC-collapsed ids: repeats merged, blank dropped (FMS ctc_decode vs HF's tokenizer rule)",
             "ctc.text": "decoded text as UTF-8 bytes (FMS processor decode_collapsed vs HF processor batch_decode)"}
    values = {"ctc.frame_ids": frame_ids, "ctc.ids": _ids_tensor(collapsed), "ctc.text": _text_tensor(texts)}
    rows = [(Probe(name, "generate", "generate", teacher=(), tolerance_class="exact", note=notes[name]), hf[name],
             values[name]) for name in notes]
    result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides)
    hf_texts = _tensor_text(hf["ctc.text"])
    return [(f"{case.name} · CTC greedy decoding: FMS vs HF generate + processor", "generation", result,
             {"hf_text": hf_texts, "fms_text": texts, "frames": int(hf["ctc.frame_ids"].shape[1]),
              "distinct_hf_ids": len(set(hf["ctc.frame_ids"].flatten().tolist())),
              "tokens_per_row": [int((row >= 0).sum()) for row in hf["ctc.ids"]]})]


# ---------------------------------------------------------------------------------------------------------------
# `transcribe` as users run it


def _transcribe_case(cases: Sequence[Case]) -> Optional[Case]:
    """The case `transcribe` is compared on: the first with generation, at least two bundled clips (a padded batch)
    and the run's dtype."""
    return next((c for c in cases if c.generate and len(c.clips) >= 2 and not c.dtype and not c.instructions
                 and not any(clip.startswith(STEREO_44K) for clip in c.clips)), None)


def _hf_transcripts(case: Case, models: Models, paths: Sequence[Path], store: "ReferenceStore") -> Tuple[
        torch.Tensor, Optional[Ending], dict]:
    """HF's own transcription recipe (the model card's): its `load_audio`, the tokenizer's chat template, the
    processor, `generate` (adapter on), `batch_decode`. Texts as UTF-8 bytes, the ending FMS must use, and extras.
    For a case whose rows must end apart where end-of-text does not do it: a stop token of HF's own path ends the
    rows (`pick_stop_token`), and each row is cut at it as `batch_decode` drops the special end-of-text."""
    from granite_speech.__main__ import DEFAULT_PROMPT

    key = f"{case.name} · HF transcribe"
    audio = [hf_load_audio(path, 16000) for path in paths]
    recorded_from = {**{f"audio.{i}": samples for i, samples in enumerate(audio)},
                     "new_tokens": torch.tensor(case.generate)}  # what the store checks a saved transcript by
    if store.reading:
        saved = store.get(key, recorded_from)
        token, pad = saved.get("transcribe.stop").tolist()
        stop = None if token < 0 else Ending(token, pad)
        return saved.get("transcribe.text"), stop, {"rows_end": "read with the reference"}
    hf_processor, _ = models.processors()
    hf = models.reference()
    _set_adapter(hf, True)
    prompt = hf_processor.tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}],
                                                        tokenize=False, add_generation_prompt=True)
    inputs = hf_processor(text=[prompt] * len(audio), audio=[samples.numpy() for samples in audio],
                          return_tensors="pt", padding=True, padding_side="left")
    inputs = {k: (v.to(models.device, models.dtype) if v.is_floating_point() else v.to(models.device))
              for k, v in inputs.items()}
    with torch.no_grad():
        new = hf.generate(**inputs, max_new_tokens=case.generate, do_sample=False)[:, inputs["input_ids"].size(1):]
    stop, extra = (None, {}) if not case.ends_apart else ending_apart(new, hf_processor.tokenizer, "transcribe")
    if stop is not None and stop.token != hf_processor.tokenizer.eos_token_id:  # a stop token of HF's path
        with torch.no_grad():
            new = hf.generate(**inputs, max_new_tokens=case.generate, do_sample=False, eos_token_id=stop.token,
                              pad_token_id=stop.pad)[:, inputs["input_ids"].size(1):]
    rows = [row[: row.index(stop.token)] if stop is not None and stop.token in row else row for row in new.tolist()]
    texts = _text_tensor(hf_processor.batch_decode(rows, skip_special_tokens=True))
    stop_value = torch.tensor([-1, -1] if stop is None else [stop.token, stop.pad])
    store.put(key, pair_from_values([(Probe(name, "transcribe", "transcribe", teacher=()), value, value)
                                     for name, value in (("transcribe.text", texts),
                                                         ("transcribe.stop", stop_value))]).hf, recorded_from)
    return texts, stop, extra


def _float32_models(models: Models) -> Tuple[Optional[Models], str]:
    """The models the transcribe section runs: float32 always. It compares texts exactly, which only float32 can
    promise: in 16 bits a greedy near-tie flips a token (the generation sections judge 16-bit numerics, with the
    near-tie rule). In a 16-bit run the float32 pair is loaded for it where it fits."""
    if models.dtype == torch.float32:
        return models, "float32"
    loaded = torch.float32 in models.hf and (torch.float32, "merged") in models.fms
    short = None if loaded else _shortfall(models, 2 * 4 * models.values(), reuse=False)
    if short:
        return None, f"not run: exact transcripts need the float32 models: {short}"
    return models.at(torch.float32), (f"float32 in a {dtype_name(models.dtype)} run: exact transcripts need it; "
                                      "the generation sections judge the 16-bit numerics")


def _transcribe_section(case: Case, models: Models, why: str, workdir: Path, overrides,
                        store: "ReferenceStore") -> Section:
    """`granite_speech.__main__.transcribe_loaded` (prompt, reading, processor, batch, decoding loop, eos cut,
    decode) with each decoding loop, exactly against HF's own recipe on the same files, in float32: the plumbing
    around the model that the model sections never run."""
    from granite_speech.__main__ import check_transcribe_inputs, transcribe_loaded

    paths = [_clip_path(clip, workdir) for clip in case.clips]
    hf_run = _attempt(lambda: _hf_transcripts(case, models, paths, store))
    hf_texts, stop, ending_extra = (hf_run, None, {}) if isinstance(hf_run, BaseException) else hf_run
    _, fms_processor = models.processors()
    decoders = ("eager",) if tp_gather() is not None else ("eager", "fast")  # the fast path is single-device
    rows, texts = [], {}
    for decoder in decoders:
        def run(decoder=decoder):
            job = check_transcribe_inputs(models.checkpoint, paths, max_new_tokens=case.generate,
                                          device=models.device, dtype=models.dtype, decoder=decoder,
                                          notify=lambda message: None)
            if stop is not None:
                job = replace(job, eos_token_id=stop.token)
            return transcribe_loaded(models.fms_model("merged"), fms_processor, job, notify=lambda message: None)

        got = _attempt(run)
        texts[decoder] = got if isinstance(got, BaseException) else list(got)
        rows.append((Probe(f"transcribe.{decoder}.text", "transcribe", "transcribe", teacher=(),
                           tolerance_class="exact", note=f"transcripts as UTF-8 bytes (--decoder {decoder})"),
                     hf_texts, got if isinstance(got, BaseException) else _text_tensor(got)))
    result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides)
    extra = {"clips": [p.name for p in paths], "new_tokens": case.generate, "dtype": why, **ending_extra,
             **{f"{d}_text": (repr(t) if isinstance(t, BaseException) else t) for d, t in texts.items()}}
    if not isinstance(hf_texts, BaseException):
        hf_list = _tensor_text(hf_texts)
        extra.update(hf_text=hf_list, rows_differ=len(set(hf_list)) > 1)
    if len(decoders) == 1:
        extra["fast_path"] = "not run: the fast path is single-device (tensor-parallel run)"
        _note_not_run(extra, "transcribe --decoder fast", extra["fast_path"], "tensor parallel")
    return (f"{case.name} · transcribe: FMS transcribe vs HF's recipe (chat template, processor, generate, "
            "batch_decode)", "generation", result, extra)


def _preprocessing_section(case: Case, models: Models, rows: list, floor_captures, floors: str, overrides) -> Section:
    """Audio, features and processor outputs; the floating ones judged against HF's own float64 recipe too."""
    extra = {"why": case.why}
    if floor_captures is not None and floors == "off":
        floor_captures = None
        _note_not_run(extra, "noise floors", "noise floors off (--floors off)", "floors off")
    result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides,
                           floors=floor_captures)
    return f"{case.name} · preprocessing", "preprocessing", result, extra


def _models_used(cases: Sequence[Case], dtype: torch.dtype, transcribed: Optional[Case]) -> Tuple[set, set]:
    """(FMS (dtype, lora_mode) keys, HF dtypes) the model, generation and transcribe sections of `cases` load."""
    fms, hf = set(), set()
    for case in cases:
        case_dtype = getattr(torch, case.dtype) if case.dtype else dtype
        fms.add((case_dtype, case.lora_mode))
        hf.add(case_dtype)
        if case is transcribed:  # float32 always (`_float32_models`)
            fms.add((torch.float32, "merged"))
            hf.add(torch.float32)
    return fms, hf


def run_pipeline(
    checkpoint: Union[str, Path],
    *,
    cases: Optional[Sequence[Case]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    mode: str = "teacher_forced",
    feed: str = "own",
    floors: str = "auto",
    phases: str = "one",
    detail: bool = True,
    overrides: Optional[dict] = None,
    models: Optional[Models] = None,
    save_captures: Optional[Path] = None,
    reference_captures: Optional[Path] = None,
    progress: Callable[[str], None] = lambda message: None,
    fast_encoder: str = "eager",
) -> Tuple[List[Section], dict]:
    """Every case through preprocessing, model and generation; returns (report sections, run extras). With
    `phases="two"` (a model too large for two copies in memory) the model sections load one model at a time and
    generation, which needs both side by side, is left out (said in the section's extras). `save_captures` writes
    every HF-side value (model probes, floors, generation) to a folder; `reference_captures` reads such a folder
    instead of running HF here (another process, another machine): only the HF processor is used locally.
    `fast_encoder`: the fast path's audio encoder (`StaticGenerator(encoder=)`) in its generation section."""
    from granite_speech.fast_generate import ENCODERS

    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if floors not in FLOORS:
        raise ValueError(f"floors must be one of {FLOORS}, got {floors!r}")
    if fast_encoder not in ENCODERS:
        raise ValueError(f"fast_encoder must be one of {ENCODERS}, got {fast_encoder!r}")
    own_models = models is None  # then models no later case uses are freed as the cases go
    models = models or Models(Path(checkpoint), dtype, torch.device(device))
    models.fast_encoder = fast_encoder
    store = ReferenceStore(save_captures, reference_captures, checkpoint=models.checkpoint)  # checked before loading
    sections: List[Section] = []
    inputs_meta = []
    skipped: Dict[str, str] = {}  # a section left out, and why (reported in the run's metadata)
    not_run: List[dict] = []  # planned checks of no section that did not run (the verdict counts them)
    with tempfile.TemporaryDirectory(prefix="parity-audio-") as tmp:
        base = models
        ctc = models.member == CTC5
        preprocess = _preprocess_ctc if ctc else _preprocess
        generation = _ctc_generation_sections if ctc else _generation_sections
        run_cases = cases_for(models.checkpoint, cases)
        transcribed = _transcribe_case(run_cases)
        for index, case in enumerate(run_cases):
            if own_models:
                base.keep_only(*_models_used(run_cases[index:], base.dtype, transcribed))
            progress(f"case: {case.name}")
            models = base.at(getattr(torch, case.dtype)) if case.dtype else base
            rows, hf_inputs, fms_inputs, extra = preprocess(case, models, Path(tmp))
            inputs_meta.extend({"case": case.name, **row} for row in extra["inputs"])
            sections.append(_preprocessing_section(case, models, rows, extra["floors"], floors, overrides))
            if isinstance(hf_inputs, BaseException):
                continue  # the reference could not even be built: the preprocessing section says why
            fed = hf_inputs if feed == "hf" or isinstance(fms_inputs, BaseException) else fms_inputs
            title = f"{case.name} · model"
            result, model_extra = _model_section(case, models, hf_inputs, fed, mode=mode, floors=floors,
                                                 detail=detail, overrides=overrides, phases=phases, store=store,
                                                 title=title)
            model_extra["feed"] = "HF preprocessing to both" if fed is hf_inputs else "each side its own"
            if case.generate and phases == "two":
                model_extra["generation"] = "not run: generation compares both models side by side (phases one)"
                _note_not_run(model_extra, "generation and transcribe", model_extra["generation"], "phases two")
            sections.append((title, "model", result, model_extra))
            if case.generate and phases != "two":
                sections.extend(generation(case, models, hf_inputs, fed, overrides, store, floors))
                if not ctc and case is transcribed:
                    plumbing, why = _float32_models(models)
                    if plumbing is None:
                        progress(f"transcribe section {why}")
                        skipped["transcribe"] = why
                        not_run.append(not_run_record("transcribe", why, "memory", section=case.name))
                    else:
                        sections.append(_transcribe_section(case, plumbing, why, Path(tmp), overrides, store))
    written = store.finish()
    return sections, {"inputs": inputs_meta, "feed": feed, "mode": mode, **skipped, "not_run": not_run,
                      "saved_captures": None if written is None else str(written),
                      "reference_captures": None if reference_captures is None else str(reference_captures)}


def member_metadata(checkpoint: Union[str, Path]) -> dict:
    """The report header's family entries: which member (HF model_type and class, FMS architecture) and which
    LoRA regime ran (`granite_speech.family.lora_regime`; the 5.0 CTC model has none)."""
    member = member_of(checkpoint)
    fms_architecture = {SPEECH: "granite_speech", PLUS: "granite_speech_plus", CTC5: "granite_speech5"}[member]
    out = {"model_type": member, "hf_class": _HF_CLASSES[member], "fms_architecture": fms_architecture}
    regime = regime_of(checkpoint)
    out["lora_regime"] = regime["regime"]
    out["lora_regime_detail"] = regime["detail"]
    return out


def compare_report(
    checkpoint: Union[str, Path],
    *,
    seeded: Optional[str] = None,
    cases: Optional[Sequence[Case]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    mode: str = "teacher_forced",
    feed: str = "own",
    floors: str = "auto",
    phases: str = "one",
    policy: Policy = Policy(),
    overrides: Optional[dict] = None,
    seed: Optional[int] = None,
    save_captures: Optional[Path] = None,
    reference_captures: Optional[Path] = None,
    progress: Callable[[str], None] = lambda message: None,
    fast_encoder: str = "eager",
) -> dict:
    """The `compare` job: every case through the pipeline, one report (JSON-able dict). `seeded` names the fixture
    variant when the weights are the seeded random fixture rather than a real checkpoint. `policy` is how the
    verdict judges the records (`parity.verdict`): lenient or not, and which causes of checks not run were asked
    for."""
    from parity.report import build_multi_report, run_metadata

    sections, extra = run_pipeline(checkpoint, cases=cases, dtype=dtype, device=device, mode=mode, feed=feed,
                                   floors=floors, phases=phases, overrides=overrides, progress=progress,
                                   save_captures=save_captures, reference_captures=reference_captures,
                                   fast_encoder=fast_encoder)
    for _, _, result, _ in sections:
        result.lenient = policy.lenient
    meta = run_metadata(
        device=device, dtype=dtype, seed=seed, checkpoint=str(checkpoint), mode=mode, feed=feed,
        weights=f"seeded-random ({seeded}, seed {seed})" if seeded else "checkpoint",
        checkpoint_sha256=checkpoint_fingerprint(checkpoint), inputs=extra["inputs"],
        saved_captures=extra["saved_captures"], reference_captures=extra["reference_captures"],
        title=f"Granite Speech parity · {seeded or Path(checkpoint).name}", **member_metadata(checkpoint),
        tensor_parallel_ranks=_ranks(), **({"transcribe": extra["transcribe"]} if "transcribe" in extra else {}),
        not_run=extra["not_run"], fast_encoder=fast_encoder,
    )
    return build_multi_report(sections, meta, policy=policy)
