"""The CTC member (5.0, no LLM): its preprocessing (audio, HF's GraniteSpeech5Processor vs FMS
`GraniteSpeech5Processor`) and its greedy decoding section (per-frame ids, CTC-collapsed ids and the decoded text,
each exact), with the texts-as-bytes tensors the transcribe section shares (`text_tensor`, `tensor_text`).
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from parity.capture import pair_from_values
from parity.diff import diff_captures
from parity.granite.cases import (SAMPLING_RATE, Case, Section, attempt, audio_rows, clip_path, field_of,
                                  preprocessing_floors)
from parity.granite.models import Models
from parity.probes import Probe
from parity.store import ReferenceStore


def preprocess_ctc(case: Case, models: Models, workdir: Path) -> Tuple[List[Tuple[Probe, Any, Any]], dict, dict,
                                                                        dict]:
    """(probe rows, HF model inputs, FMS model inputs, extra): audio, then HF's GraniteSpeech5Processor vs FMS
    `GraniteSpeech5Processor` (features and frame mask, both exact)."""
    hf_processor, fms_processor = models.processors()
    paths = [clip_path(clip, workdir) for clip in case.clips]
    rows, hf_audio, fms_audio, inputs_meta = audio_rows(paths)
    hf_batch = attempt(lambda: hf_processor(audio=[a.numpy() for a in hf_audio], sampling_rate=SAMPLING_RATE,
                                            return_tensors="pt"))
    fms_batch = attempt(lambda: fms_processor(list(fms_audio), sampling_rate=SAMPLING_RATE))
    for key, note in (("input_features", "log-mel + deltas, frame pairs stacked [B, T, 4 x mel bins]"),
                      ("attention_mask", "valid input frames [B, T]")):
        rows.append((Probe(f"features.{key}", "GraniteSpeech5Processor", "GraniteSpeech5Processor", teacher=(),
                           tolerance_class="exact", note=note), field_of(hf_batch, key), field_of(fms_batch, key)))
    mask = field_of(hf_batch, "attention_mask")
    for count, meta in zip(mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) else [], inputs_meta):
        meta["frames"] = int(count)
    return (rows, _ctc_inputs(hf_batch, models), _ctc_inputs(fms_batch, models),
            {"inputs": inputs_meta, "floors": preprocessing_floors(paths, hf_audio)})


def _ctc_inputs(batch: Any, models: Models) -> Any:
    if isinstance(batch, BaseException):
        return batch
    return {"input_features": batch["input_features"].to(models.device, models.dtype),
            "attention_mask": batch["attention_mask"].to(models.device)}


def text_tensor(texts: Sequence[str]) -> torch.Tensor:
    """Texts as UTF-8 bytes [B, longest], padded with -1: an exact comparison of strings by the engine."""
    encoded = [list(text.encode("utf-8")) for text in texts]
    out = torch.full((len(encoded), max([len(e) for e in encoded] + [1])), -1, dtype=torch.long)
    for row, values in enumerate(encoded):
        out[row, : len(values)] = torch.tensor(values, dtype=torch.long)
    return out


def tensor_text(values: torch.Tensor) -> List[str]:
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
    values = {"ctc.frame_ids": frame_ids, "ctc.ids": _ids_tensor(collapsed), "ctc.text": text_tensor(texts)}
    store.put(key, pair_from_values([(Probe(name, "generate", "generate", teacher=()), value, value)
                                     for name, value in values.items()]).hf, hf_inputs)
    return values


def ctc_generation_sections(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, overrides,
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
    values = {"ctc.frame_ids": frame_ids, "ctc.ids": _ids_tensor(collapsed), "ctc.text": text_tensor(texts)}
    rows = [(Probe(name, "generate", "generate", teacher=(), tolerance_class="exact", note=notes[name]), hf[name],
             values[name]) for name in notes]
    result = diff_captures(pair_from_values(rows), dtype=models.dtype, device=models.device, overrides=overrides)
    hf_texts = tensor_text(hf["ctc.text"])
    return [(f"{case.name} · CTC greedy decoding: FMS vs HF generate + processor", "generation", result,
             {"hf_text": hf_texts, "fms_text": texts, "frames": int(hf["ctc.frame_ids"].shape[1]),
              "distinct_hf_ids": len(set(hf["ctc.frame_ids"].flatten().tolist())),
              "tokens_per_row": [int((row >= 0).sum()) for row in hf["ctc.ids"]]})]
