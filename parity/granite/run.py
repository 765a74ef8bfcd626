"""Granite Speech glue for the generic harness: the inputs both models see, and one parity run -> report dict.

The layer suite captures once (`capture_parity`) and judges that capture in both modes (`judge_parity`); the
self-test calls both at once (`run_parity`). The harness mechanics know nothing of Granite Speech beyond its probe
table.
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


def run_parity(hf: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
               fms: Union[torch.nn.Module, Callable[[], torch.nn.Module]], inputs: Mapping[str, Any], *,
               dtype: torch.dtype = torch.float32, overrides: Optional[Mapping[str, float]] = None, **capture: Any):
    """One capture (`capture_parity`'s keywords: hf_config, mode, phases, device, ...) judged in the mode it was
    captured in. Returns (ParityResult, report dict)."""
    pair = capture_parity(hf, fms, inputs, **capture)
    return judge_parity(pair, inputs, mode=pair.mode, dtype=dtype, device=capture.get("device", "cpu"),
                        overrides=overrides)


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
