"""The whole Granite Speech pipeline, FMS against HF, from the audio file to the generated tokens.

For each input case (`parity.granite.cases`) the report gets up to three kinds of sections:
- preprocessing: audio reading / down-mixing / resampling (FMS `read_audio` vs HF's `load_audio`), features, lengths
  and masks (FMS feature extractor vs HF's), prompt expansion (FMS processor vs HF's), each side's own;
- model: every probe of the Granite Speech table, each side fed by its own preprocessing (or, with
  `feed="hf"`, both fed HF's, which isolates the model), teacher-forced by default, decoder probes judged under the
  text validity mask, and each probe's noise floor measured by HF in float64 (for localisation);
- generation: each decoding loop against HF `generate` (`parity.granite.generation`; the CTC member's greedy
  decoding: `parity.granite.ctc`), and `transcribe` as users run it against HF's own recipe.
The HF side always gets HF's own prompt construction (its tokenizer's chat template), processor, position ids and
generation settings; nothing the project computes is fed to it. The models, their loaders and the memory planning of
the float64 work live in `parity.granite.models`.

Every member of the family runs (`member_of(checkpoint)` reads config.json's model_type):
- granite_speech (3.3, and 4.0-1b / 4.1-2b with the LoRA merged in the weights) and granite_speech_plus
  (4.1-2b-plus): the cases above, each with its probe table (`parity.granite.probes_family.probes_for`) and its HF
  class; a checkpoint without adapter files runs only the LoRA regime it has (`family.lora_regime`, in the report);
- granite_speech5_ctc (5.0-470m, no LLM): a CTC pipeline (`ctc_cases`): preprocessing, the model probes of the 5.0
  table on valid frames only (one validity mask per frame rate), and a greedy CTC decoding section.
"""

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from parity.capture import ModelRun, capture_against, capture_model, capture_pair, free_memory, pair_from_values
from parity.diff import ParityResult, diff_captures
from parity.granite.cases import (STEREO_44K, Case, Section, attempt, audio_rows, cases_for, clip_path, field_of,
                                  preprocessing_floors)
from parity.granite.ctc import ctc_generation_sections, preprocess_ctc, tensor_text, text_tensor
from parity.granite.generation import Ending, ending_apart, generation_sections
from parity.granite.hf import hf_load_audio
from parity.granite.models import (Models, audio_path_float64, decoder_blocks, floors_wanted, inputs_in_float64,
                                   load_fms_family_model, load_hf_family_model, member_metadata, regime_of,
                                   set_adapter, shortfall, value_count)
from parity.granite.probes import AUDIO_PROBE_PREFIXES, HF_LAYOUT_ALIASES
from parity.granite.probes_family import CTC5, masks_for, probes_for
from parity.granite.tp import tp_gather
from parity.precision import LOW_PRECISION, audit_ops, missing_upcasts
from parity.probes import Probe
from parity.store import ReferenceStore, checkpoint_fingerprint
from parity.tolerances import dtype_name
from parity.verdict import Policy, note_not_run, not_run_record

FEEDS = ("own", "hf")
FLOORS = ("auto", "on", "off")


# ---------------------------------------------------------------------------------------------------------------
# preprocessing


def _hf_prompt(tokenizer, instruction: str) -> str:
    """HF's own prompt construction: the tokenizer's chat template (the model card's recipe)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction


def _preprocess(case: Case, models: Models, workdir: Path) -> Tuple[List[Tuple[Probe, Any, Any]], dict, dict, dict]:
    """(probe rows, HF model inputs, FMS model inputs, extra): each side through its own preprocessing."""
    from granite_speech.__main__ import build_prompt

    hf_processor, fms_processor = models.processors()
    paths = [clip_path(clip, workdir) for clip in case.clips]
    rows, hf_audio, fms_audio, inputs_meta = audio_rows(paths)
    hf_prompts = [_hf_prompt(hf_processor.tokenizer, text) for text in case.rows()]
    fms_prompts = [build_prompt(fms_processor.tokenizer, text) for text in case.rows()]
    # a side whose audio could not be read carries that error to its later stages, instead of a follow-on crash
    failed = next((a for a in hf_audio if isinstance(a, BaseException)), None)
    fms_failed = next((a for a in fms_audio if isinstance(a, BaseException)), None)
    if paths:
        hf_extractor = getattr(hf_processor, "audio_processor", None) or hf_processor.feature_extractor  # 5.x / 4.57
        hf_features = failed or attempt(lambda: hf_extractor([a.numpy() for a in hf_audio]))
        fms_features = fms_failed or attempt(lambda: fms_processor.feature_extractor(list(fms_audio)))
        for key, klass in (("input_features", "activation"), ("input_features_mask", "exact"),
                           ("audio_embed_sizes", "exact")):
            rows.append((Probe(f"features.{key}", "feature_extractor", "feature_extractor", teacher=(),
                               tolerance_class=klass), field_of(hf_features, key), field_of(fms_features, key)))
    side = case.padding_side
    hf_batch = failed or attempt(lambda: hf_processor(text=hf_prompts, audio=[a.numpy() for a in hf_audio] or None,
                                            return_tensors="pt", padding=True, padding_side=side))
    fms_batch = fms_failed or attempt(lambda: fms_processor(fms_prompts, list(fms_audio) or None,
                                                            padding_side=side))
    for key in ("input_ids", "attention_mask"):
        rows.append((Probe(f"processor.{key}", "processor", "processor", teacher=(), tolerance_class="exact",
                           note=f"after <|audio|> expansion, {side}-padded"), field_of(hf_batch, key),
                     field_of(fms_batch, key)))
    inputs_meta = inputs_meta or [{"audio": "(text only)"} for _ in case.rows()]
    mask = field_of(hf_batch, "attention_mask")
    for count, meta in zip(mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) else [], inputs_meta):
        meta["prompt tokens"] = int(count)
    floors = (preprocessing_floors(paths, hf_audio, hf_extractor if not isinstance(hf_features, BaseException)
                                    else None) if paths else None)
    return (rows, _model_inputs(hf_batch, models), _model_inputs(fms_batch, models),
            {"inputs": inputs_meta, "floors": floors})


def _model_inputs(batch: Any, models: Models) -> Any:
    if isinstance(batch, BaseException):
        return batch
    out = {}
    for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        if key in batch and batch[key] is not None:
            value = batch[key]
            out[key] = value.to(models.device, models.dtype if key == "input_features" else value.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the model section


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
    if store.reading:  # HF captures recorded elsewhere: the HF model is never loaded here
        return _model_section_from_reference(case, models, hf_inputs, fms_inputs, probes, masks, lora, mode=mode,
                                             overrides=overrides, store=store, title=title)

    def hf_forward(model):
        set_adapter(model, has_audio)  # HF's forward never toggles the adapter; its generate does, with audio
        return model(**hf_inputs, **forward_kwargs)

    if phases == "two":  # one model in memory at a time: factories, HF captures on disk in between
        hf = lambda: load_hf_family_model(models.checkpoint, models.dtype, str(models.device))  # noqa: E731
        fms = lambda: load_fms_family_model(models.checkpoint, models.dtype, models.device,  # noqa: E731
                                            lora_mode=case.lora_mode)
    else:
        hf, fms = models.reference(), models.fms_model(case.lora_mode)
    pair = capture_pair(probes, ModelRun(hf, hf_forward), ModelRun(fms, lambda m: m(**fms_inputs), gather=tp_gather()),
                        mode=mode, phases=phases, hf_aliases=HF_LAYOUT_ALIASES, on_raise="record")
    extra = {**lora, "phases": pair.plan.reason}
    floor_captures = None
    if phases == "two":
        wanted, why, cause = False, "noise floors not run in a two-phase run", "phases two"
    else:
        wanted, why, cause = floors_wanted(floors, models)
    if pair.hf.raised:
        wanted, why, cause = False, "noise floors not run: the HF forward raised", "raised"
    extra["floors"] = why
    note_not_run(extra, "noise floors", why, cause)
    with models.float64_room():
        if wanted:
            hf64 = models.reference64()
            set_adapter(hf64, has_audio)
            inputs64 = inputs_in_float64(hf_inputs)
            floor_captures = capture_model(hf64, lambda m: m(**inputs64, **forward_kwargs), probes, side="hf",
                                           aliases=HF_LAYOUT_ALIASES)
            store.put(f"{title} #floors", floor_captures, hf_inputs, made_from=models.hf64_source["dtype"])
        candidate64, extra["float64"], cause = _candidate64(case, models, fms_inputs, probes,
                                                            None if pair.fms.raised else floor_captures,
                                                            "raised" if pair.fms.raised else cause,
                                                            models.hf64_source.get("dtype"))
    note_not_run(extra, "float64 formula check", extra["float64"], cause)
    upcasts = None
    if models.dtype in LOW_PRECISION:
        if phases == "two":
            note_not_run(extra, "upcast audit", "needs both models at once (two-phase run)", "phases two")
        elif pair.hf.raised or pair.fms.raised:
            note_not_run(extra, "upcast audit", "a side's forward raised", "raised")
        else:
            upcasts, extra["upcast_audit"] = _upcast_audit(pair, hf, hf_forward, fms, lambda m: m(**fms_inputs))
    store.put(title, pair.hf, hf_inputs)
    result = diff_captures(pair, dtype=models.dtype, device=models.device, overrides=overrides, masks=masks,
                           floors=floor_captures, candidate64=candidate64, upcasts=upcasts)
    return result, extra


def _model_section_from_reference(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, probes, masks,
                                  lora: dict, *, mode: str, overrides, store: "ReferenceStore",
                                  title: str) -> Tuple[ParityResult, dict]:
    """The model section against HF captures another run saved (`--reference-captures`): FMS alone runs here."""
    reference = store.get(title, hf_inputs)  # checked against this run's inputs before anything loads
    fms = ModelRun(models.fms_model(case.lora_mode), lambda m: m(**fms_inputs), gather=tp_gather())
    pair = capture_against(probes, reference, fms, mode=mode, on_raise="record")
    floor_captures = store.get(f"{title} #floors", hf_inputs, optional=True)
    extra = {**lora, "reference": str(store.path),
             "floors": "read with the reference" if floor_captures is not None else "not in the reference"}
    note_not_run(extra, "noise floors", extra["floors"], None if floor_captures is not None else "reference")
    candidate64, extra["float64"], cause = _candidate64(case, models, fms_inputs, probes, floor_captures,
                                                        "reference", store.made_from(f"{title} #floors"))
    note_not_run(extra, "float64 formula check", extra["float64"], cause)
    if models.dtype in LOW_PRECISION:
        note_not_run(extra, "upcast audit", "needs the HF model here (--reference-captures)", "reference")
    result = diff_captures(pair, dtype=models.dtype, device=models.device, overrides=overrides,
                           masks=masks, floors=floor_captures, candidate64=candidate64)
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
    need = 8 * (value_count(fms) - value_count(*decoder_blocks(fms)))
    short = shortfall(models, need, parked=True)
    if short:
        return None, f"not run: FMS's audio path in float64 {short}", "memory"
    hf64 = models.hf.get(torch.float64)
    if hf64 is not None and shortfall(models, need + models.device_bytes([hf64])):
        hf64.to("cpu")  # HF's float64 copy has done its part (the floors) and makes room
        free_memory()
    # freed at once: a float64 copy held per LoRA mode would crowd the next case's floors on a GPU
    fms64 = audio_path_float64(fms).to(models.device)
    inputs64 = inputs_in_float64(fms_inputs)
    try:
        captures = capture_model(fms64, lambda m: m(**inputs64), exact, side="fms", on_raise="record")
    finally:
        del fms64
        free_memory()
    return captures, (f"FMS and HF in float64 on the same inputs, {len(exact)} probes of the audio path (formula "
                      "check; the decoder is left out: FMS rotates q and k in float32 even in a float64 model)"), None


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
    set_adapter(hf, True)
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
    texts = text_tensor(hf_processor.batch_decode(rows, skip_special_tokens=True))
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
    short = None if loaded else shortfall(models, 2 * 4 * models.values(), reuse=False)
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

    paths = [clip_path(clip, workdir) for clip in case.clips]
    hf_run = attempt(lambda: _hf_transcripts(case, models, paths, store))
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

        got = attempt(run)
        texts[decoder] = got if isinstance(got, BaseException) else list(got)
        rows.append((Probe(f"transcribe.{decoder}.text", "transcribe", "transcribe", teacher=(),
                           tolerance_class="exact", note=f"transcripts as UTF-8 bytes (--decoder {decoder})"),
                     hf_texts, got if isinstance(got, BaseException) else text_tensor(got)))
    result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides)
    extra = {"clips": [p.name for p in paths], "new_tokens": case.generate, "dtype": why, **ending_extra,
             **{f"{d}_text": (repr(t) if isinstance(t, BaseException) else t) for d, t in texts.items()}}
    if not isinstance(hf_texts, BaseException):
        hf_list = tensor_text(hf_texts)
        extra.update(hf_text=hf_list, rows_differ=len(set(hf_list)) > 1)
    if len(decoders) == 1:
        extra["fast_path"] = "not run: the fast path is single-device (tensor-parallel run)"
        note_not_run(extra, "transcribe --decoder fast", extra["fast_path"], "tensor parallel")
    return (f"{case.name} · transcribe: FMS transcribe vs HF's recipe (chat template, processor, generate, "
            "batch_decode)", "generation", result, extra)


# ---------------------------------------------------------------------------------------------------------------
# the run


def _preprocessing_section(case: Case, models: Models, rows: list, floor_captures, floors: str, overrides) -> Section:
    """Audio, features and processor outputs; the floating ones judged against HF's own float64 recipe too."""
    extra = {"why": case.why}
    if floor_captures is not None and floors == "off":
        floor_captures = None
        note_not_run(extra, "noise floors", "noise floors off (--floors off)", "floors off")
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


def _check_options(feed: str, floors: str, fast_encoder: str, fast_gemv: str, device: torch.device) -> None:
    """A ValueError naming the option and its choices, before anything loads."""
    from granite_speech.fast_generate import ENCODERS, GEMVS, splitk_refusal

    for name, value, choices in (("feed", feed, FEEDS), ("floors", floors, FLOORS),
                                 ("fast_encoder", fast_encoder, ENCODERS), ("fast_gemv", fast_gemv, GEMVS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    refusal = splitk_refusal(device) if fast_gemv == "splitk" else None
    if refusal:
        raise ValueError(f"fast_gemv='splitk': {refusal}")


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
    fast_gemv: str = "cublas",
) -> Tuple[List[Section], dict]:
    """Every case through preprocessing, model and generation; returns (report sections, run extras). With
    `phases="two"` (a model too large for two copies in memory) the model sections load one model at a time and
    generation, which needs both side by side, is left out (said in the section's extras). `save_captures` writes
    every HF-side value (model probes, floors, generation) to a folder; `reference_captures` reads such a folder
    instead of running HF here (another process, another machine): only the HF processor is used locally.
    `fast_encoder`, `fast_gemv`: the fast path's audio encoder and weight products (`StaticGenerator(encoder=,
    gemv=)`) in its generation section."""
    _check_options(feed, floors, fast_encoder, fast_gemv, torch.device(device))
    own_models = models is None  # then models no later case uses are freed as the cases go
    models = models or Models(Path(checkpoint), dtype, torch.device(device))
    models.fast_encoder, models.fast_gemv = fast_encoder, fast_gemv
    store = ReferenceStore(save_captures, reference_captures, checkpoint=models.checkpoint)  # checked before loading
    sections: List[Section] = []
    inputs_meta = []
    skipped: Dict[str, str] = {}  # a section left out, and why (reported in the run's metadata)
    not_run: List[dict] = []  # planned checks of no section that did not run (the verdict counts them)
    with tempfile.TemporaryDirectory(prefix="parity-audio-") as tmp:
        base = models
        ctc = models.member == CTC5
        preprocess = preprocess_ctc if ctc else _preprocess
        generation = ctc_generation_sections if ctc else generation_sections
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
                note_not_run(model_extra, "generation and transcribe", model_extra["generation"], "phases two")
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


def _ranks() -> int:
    """The ranks the FMS decoder is sharded over (1: not tensor parallel)."""
    return torch.distributed.get_world_size() if tp_gather() is not None else 1


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
    fast_gemv: str = "cublas",
) -> dict:
    """The `compare` job: every case through the pipeline, one report (JSON-able dict). `seeded` names the fixture
    variant when the weights are the seeded random fixture rather than a real checkpoint. `policy` is how the
    verdict judges the records (`parity.verdict`): lenient or not, and which causes of checks not run were asked
    for."""
    from parity.report import build_multi_report, run_metadata

    sections, extra = run_pipeline(checkpoint, cases=cases, dtype=dtype, device=device, mode=mode, feed=feed,
                                   floors=floors, phases=phases, overrides=overrides, progress=progress,
                                   save_captures=save_captures, reference_captures=reference_captures,
                                   fast_encoder=fast_encoder, fast_gemv=fast_gemv)
    for _, _, result, _ in sections:
        result.lenient = policy.lenient
    meta = run_metadata(
        device=device, dtype=dtype, seed=seed, checkpoint=str(checkpoint), mode=mode, feed=feed,
        weights=f"seeded-random ({seeded}, seed {seed})" if seeded else "checkpoint",
        checkpoint_sha256=checkpoint_fingerprint(checkpoint), inputs=extra["inputs"],
        saved_captures=extra["saved_captures"], reference_captures=extra["reference_captures"],
        title=f"Granite Speech parity · {seeded or Path(checkpoint).name}", **member_metadata(checkpoint),
        tensor_parallel_ranks=_ranks(), **({"transcribe": extra["transcribe"]} if "transcribe" in extra else {}),
        not_run=extra["not_run"], fast_encoder=fast_encoder, fast_gemv=fast_gemv,
    )
    return build_multi_report(sections, meta, policy=policy)
