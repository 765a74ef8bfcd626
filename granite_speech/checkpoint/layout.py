"""The one map between the key layouts Granite Speech checkpoints and HF models come in.

- hub layout: what the published checkpoints hold, and what transformers 4.57 keeps in memory
  (`encoder.*`, `projector.*`, `language_model.model.*`, `language_model.lm_head.*`);
- transformers >= 5.10.1 in-memory layout (`model.encoder.*`, `model.projector.*`, `model.language_model.*`,
  `lm_head.*`), which 5.x `save_pretrained` also writes;
- PEFT adapter files prefix every key with `base_model.model.`.
Everything that renames between them (the FMS checkpoint adapter, the harness's HF module paths, the fixture
writers) reads `HUB_TO_TF5` from here.
"""

from typing import Tuple

# hub / 4.57 prefix -> 5.10.1+ in-memory prefix (module paths, without the trailing dot)
HUB_TO_TF5: Tuple[Tuple[str, str], ...] = (
    ("language_model.model", "model.language_model"),
    ("language_model.lm_head", "lm_head"),
    ("encoder", "model.encoder"),
    ("projector", "model.projector"),
)
PEFT_PREFIX = "base_model.model."


def _rewrite(path: str, old: str, new: str):
    if path == old:
        return new
    if path.startswith(old + "."):
        return new + path[len(old) :]
    return None


# transformers 5.17's save_pretrained writes the decoder one level deeper (HF loads both forms)
DOUBLED_DECODER = ("language_model.model.model", "language_model.model")


def to_hub(key: str) -> str:
    """A key or module path of either layout (PEFT-prefixed or not) in the hub layout."""
    key = key.removeprefix(PEFT_PREFIX)
    doubled = _rewrite(key, *DOUBLED_DECODER)
    if doubled is not None:
        return doubled
    for hub, tf5 in HUB_TO_TF5:
        rewritten = _rewrite(key, tf5, hub)
        if rewritten is not None:
            return rewritten
    return key


def to_tf5(key: str) -> str:
    """A hub-layout key or module path in the transformers 5.10.1+ layout."""
    for hub, tf5 in HUB_TO_TF5:
        rewritten = _rewrite(key, hub, tf5)
        if rewritten is not None:
            return rewritten
    return key
