"""Greedy generation of a batch in which every row stops at its own eos, as HF `generate` does.

FMS 1.13.1's `fms.utils.generation.generate` tracks eos as `eos_found | (next_val == eos)` with `eos_found` of shape
[B] and `next_val` of shape [B, 1]: the OR broadcasts to [B, B], so as soon as *one* row emits eos the sum reaches B
and the whole batch stops; the other rows are cut short. Here FMS's `generate` still runs the model (prefill, KV
cache, padding masks) but is given no eos; a post-iteration hook keeps the per-row state instead:

- a row that has emitted eos gets `pad_token_id` from then on (HF's rule), so its later tokens are fixed;
- when every row has emitted eos the loop stops (HF's rule), by raising out of the hook after recording the step.
"""

from typing import Any, Callable, Mapping, Optional

import torch


class _EveryRowEnded(Exception):
    """Raised from the post-iteration hook to leave FMS's loop once every row has emitted eos."""


@torch.no_grad()
def generate_greedy(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: Optional[int],
    pad_token_id: Optional[int] = None,
    extra_kwargs: Optional[Mapping[str, Any]] = None,
    on_step: Optional[Callable[[torch.Tensor], None]] = None,
) -> torch.Tensor:
    """[B, L + n] tokens (the prompt, then n <= max_new_tokens new ones). Each row ends at its own eos; after it the
    row holds `pad_token_id` (eos when None); generation stops when every row has ended or after max_new_tokens.
    `on_step` is given each step's next-token logits [B, vocab] (a parity harness compares them)."""
    from fms.utils.generation import generate

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    fill = eos_token_id if pad_token_id is None else pad_token_id
    ended = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    new_tokens = []

    def per_row_eos(position, logits, next_val, kwargs):
        nonlocal ended
        if on_step is not None:
            on_step(logits[:, -1] if logits.dim() == 3 else logits)
        if eos_token_id is not None:
            next_val = torch.where(ended.unsqueeze(1), torch.full_like(next_val, fill), next_val)
            ended = ended | (next_val[:, 0] == eos_token_id)
        new_tokens.append(next_val)
        if eos_token_id is not None and bool(ended.all()):
            raise _EveryRowEnded
        return next_val, kwargs

    try:
        output = generate(
            model,
            input_ids,
            max_seq_len=input_ids.size(1) + max_new_tokens,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,  # FMS's own eos check stops the batch at the first row's eos: see the module doc
            prepare_model_inputs_hook=getattr(model, "prepare_inputs_for_generation", None),
            post_iteration_hook=per_row_eos,
            extra_kwargs=dict(extra_kwargs or {}),
        )
    except _EveryRowEnded:
        return torch.cat([input_ids, *new_tokens], dim=1)
    return output
