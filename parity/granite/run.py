"""Granite Speech glue for the generic harness: the inputs both models see, and one parity run -> report dict.

The CLI (`compare`) and the layer suites call `run_parity`; the harness mechanics know nothing of Granite Speech
beyond its probe table.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from parity.capture import ModelRun, PairCaptures, capture_pair, normalize_mode
from parity.diff import diff_captures
from parity.granite.hf import set_hf_adapter
from parity.granite.probes import HF_LAYOUT_ALIASES, TEXT, granite_speech_probes, text_mask
from parity.report import build_report, run_metadata

DEFAULT_PROMPT = "<|audio|>can you transcribe the speech into a written format?"


def make_inputs(hf_processor, clips: Sequence[torch.Tensor], device, dtype, prompt: str = DEFAULT_PROMPT) -> dict:
    """Identical model inputs for both sides, built by HF's own processor (so preprocessing is not under test here;
    suites/test_features.py and test_processor.py prove ours equal to it)."""
    inputs = hf_processor(text=[prompt] * len(clips), audio=list(clips), return_tensors="pt", padding=True)
    if int(inputs["attention_mask"].sum()) != inputs["attention_mask"].numel():
        raise ValueError(
            "the layer-by-layer run compares every position, so its prompts must not be text-padded: use one clip, "
            "or clips with the same number of audio tokens (suites/test_model_parity.py covers padded batches)"
        )
    return {
        "input_ids": inputs["input_ids"].to(device),
        "input_features": inputs["input_features"].to(device, dtype),
        "input_features_mask": inputs["input_features_mask"].to(device),
    }


def run_parity(
    hf: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
    fms: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
    inputs: Mapping[str, Any],
    *,
    hf_config: Any,
    mode: str = "propagated",
    phases: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    overrides: Optional[Mapping[str, float]] = None,
    detail: bool = True,
    param_bytes: Optional[int] = None,
    workdir: Optional[Path] = None,
    **meta: Any,
):
    """One propagated or teacher-forced run (in one or two phases) of every probe with the modality LoRA on (audio prompt).
    Returns (ParityResult, report dict). `hf`/`fms` may be factories (needed for two-phase runs)."""
    pair = capture_parity(hf, fms, inputs, hf_config=hf_config, mode=mode, phases=phases, device=device,
                          detail=detail, param_bytes=param_bytes, workdir=workdir)
    return judge_parity(pair, inputs, mode=mode, dtype=dtype, device=device, overrides=overrides, **meta)


def capture_parity(
    hf: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
    fms: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
    inputs: Mapping[str, Any],
    *,
    hf_config: Any,
    mode: str = "teacher-forced",
    phases: str = "auto",
    device: Union[str, torch.device] = "cpu",
    detail: bool = True,
    param_bytes: Optional[int] = None,
    workdir: Optional[Path] = None,
) -> PairCaptures:
    """Both models' probe values (no judgement). A teacher-forced capture holds the propagated values too, so it
    serves both judgements (`judge_parity`): the FMS forward carries its own outputs on, the re-runs are extra."""
    probes = granite_speech_probes(hf_config, detail=detail)

    def hf_forward(model):
        set_hf_adapter(model, True)  # HF's forward never toggles the adapter; audio prompts use it
        return model(**inputs, use_cache=False)

    return capture_pair(
        probes,
        ModelRun(hf, hf_forward, param_bytes=param_bytes, device=device),
        ModelRun(fms, dict(inputs), param_bytes=param_bytes, device=device),
        mode=mode,
        phases=phases,
        workdir=workdir,
        hf_aliases=HF_LAYOUT_ALIASES,
    )


def judge_parity(pair: PairCaptures, inputs: Mapping[str, Any], *, mode: str, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu", overrides: Optional[Mapping[str, float]] = None,
                 **meta: Any):
    """(ParityResult, report dict) of a capture judged in `mode`: a teacher-forced capture judged `propagated` gives
    what a propagated capture would (its teacher-forced column is not judged)."""
    captured, wanted = normalize_mode(pair.mode), normalize_mode(mode)
    if wanted != captured and captured != "teacher_forced":
        raise ValueError(f"a {pair.mode} capture cannot be judged {mode}: it holds no teacher-forced values")
    pair = dataclasses.replace(pair, mode=wanted)
    result = diff_captures(pair, dtype=dtype, device=device, overrides=overrides, masks={TEXT: text_mask(inputs)})
    report = build_report(result, run_metadata(device=device, dtype=dtype, mode=mode, phases=pair.plan.to_dict(),
                                               **meta))
    return result, report
