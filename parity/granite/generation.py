"""The generation sections of the LLM members (3.3, plus): every FMS decoding loop (eager `generate`, the fast path
with each prefill) against HF `generate` on HF's own inputs, greedy tokens and every step's logits, judged against
HF float64 floors along HF's own tokens, with the near-tie rule and, in 16 bits, the upcast audit; the first step
where they part is the first divergence. Rows that must end apart end at a stop token of HF's own path (`Ending`,
`pick_stop_token`, `ending_apart`).
"""

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from parity.capture import pair_from_values, value_key
from parity.diff import diff_captures, near_tie_flips
from parity.granite.cases import Case, Section, attempt
from parity.granite.hf import hf_logits_to_fms
from parity.granite.models import Models, floors_wanted, inputs_in_float64, set_adapter
from parity.granite.tp import tp_gather
from parity.precision import LOW_PRECISION, audit_ops, missing_upcasts
from parity.probes import Probe
from parity.store import ReferenceStore
from parity.tolerances import dtype_name
from parity.verdict import note_not_run


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
    set_adapter(hf, "input_features" in hf_inputs)
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
        note_not_run(extra, "rows ending apart", extra["rows_end"], "inputs")
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
    inputs64 = inputs_in_float64(hf_inputs)
    prompt = inputs64["input_ids"]
    tokens = hf_tokens[:, : steps - 1].to(prompt.device)
    mask = torch.cat([inputs64["attention_mask"], torch.ones_like(tokens)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate derives them
    with models.float64_room(), torch.no_grad():
        hf64 = models.reference64()
        set_adapter(hf64, "input_features" in hf_inputs)
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
    and a non-cuBLAS `--fast-gemv` are the first loop's (the encoder compiled once per clip shape); the static
    prefill's loop keeps the defaults."""
    label, first = "fast path", {"static_prefill": False}
    if models.fast_encoder != "eager":
        label += f", {models.fast_encoder} encoder"
        backend = "inductor" if models.device.type == "cuda" else "aot_eager"  # the CPU has no inductor flex kernel
        first.update(encoder=models.fast_encoder, compile_backend=backend)
    if models.fast_gemv != "cublas":
        label += f", {models.fast_gemv} GEMV"
        first.update(gemv=models.fast_gemv)
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
        runs = {"eager FMS generate": attempt(run_eager)}
        for label, kwargs in _fast_runs(models).items():
            runs[label] = None if tensor_parallel else attempt(lambda: run_fast(label, kwargs))
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


def generation_sections(case: Case, models: Models, hf_inputs: dict, fms_inputs: dict, overrides,
                        store: "ReferenceStore", floors: str = "auto") -> List[Section]:
    """Every decoding loop (eager FMS generate, the fast path with each prefill) against HF `generate`: greedy tokens
    and per-step logits, judged against HF float64 floors along HF's own tokens, with the near-tie rule and the
    upcast audit in 16 bits. A case with `ends_apart` runs them over rows that end at different steps."""
    # the upcast audit in 16-bit runs: the ops each side runs in 16 bits, FMS's per step, HF's over its generate
    audit = models.dtype in LOW_PRECISION and not store.reading
    stop, ending_extra = None, {}
    if case.ends_apart:
        chosen = attempt(lambda: _choose_ending(case, models, hf_inputs, store))
        stop, ending_extra = (None, {"rows_end": repr(chosen)}) if isinstance(chosen, BaseException) else chosen
        if isinstance(chosen, BaseException):
            note_not_run(ending_extra, "rows ending apart", "HF generate raised", "raised")
    hf_ops: Dict[str, set] = {}

    def run_hf():
        with (audit_ops(place=lambda: "generate") if audit else contextlib.nullcontext({})) as seen:
            result = _hf_generation(case, models, hf_inputs, store, stop)
        hf_ops.update(seen)
        return result

    # a side that raised is reported on every step it did not reach, instead of ending the run
    hf_run = attempt(run_hf)
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
        note_not_run(extra, "noise floors", floors_why, floors_cause)
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
        wanted, why, cause = floors_wanted(floors, models)
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
        note_not_run(extra, "upcast audit", "needs HF generate run here" if store.reading else "HF generate raised",
                     "reference" if store.reading else "raised")
    if tp_gather() is not None:
        extra["fast_path"] = "not run: the fast path is single-device (tensor-parallel run)"
        note_not_run(extra, "fast path generation", extra["fast_path"], "tensor parallel")
    if ties:
        extra["near_tie_flips"] = [ties[r] for r in sorted(ties)]
    if not isinstance(hf_run, BaseException):
        hf_tokens = hf_run[0]
        extra.update(distinct_hf_tokens=len(set(hf_tokens.flatten().tolist())),
                     rows_differ=bool(hf_tokens.size(0) > 1 and not (hf_tokens == hf_tokens[:1]).all()))


def _near_ties(hf_run, run, floor_captures, dtype: torch.dtype) -> Dict[int, dict]:
    """`parity.diff.near_tie_flips` on two generation runs (none where a side raised or no floor was measured)."""
    if isinstance(hf_run, BaseException) or isinstance(run, BaseException) or floor_captures is None:
        return {}
    (hf_tokens, hf_logits), (tokens, _) = hf_run, run
    hf64 = {k: floor_captures.get(value_key(f"step.{k}.logits")) for k in range(len(hf_logits))}
    return near_tie_flips(hf_tokens, hf_logits, tokens, {k: v for k, v in hf64.items() if v is not None},
                          dtype_name(dtype))
