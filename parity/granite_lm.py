"""A second model family for the engine: FMS's own `granite` decoder against HF `GraniteForCausalLM`.

The probe table is not written by hand: it is derived from FMS's checkpoint adapter name map (the regex renames
that turn HF parameter names into FMS ones). Every HF module whose parameters all rename into exactly the parameters
of one FMS module is paired with it (leaf projections, norms, embedding, attention / MLP blocks, decoder layers).
What a name map cannot know is written below as overrides: FMS keeps q/k rows permuted for interleaved RoPE, so
those two rows get the permutation adapter, and whole-model outputs differ in type (`output[0?]` takes the first
element of a tuple or of an HF ModelOutput on both sides).
"""

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from parity.probes import Probe

# (HF module path suffix, adapter applied to the FMS output) -- what the name map cannot derive
ROPE_OVERRIDES = ("self_attn.q_proj", "self_attn.k_proj")


def _module_params(model: torch.nn.Module) -> Dict[str, set]:
    """module path -> the full names of every parameter under it (including children)."""
    owners: Dict[str, set] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for cut in range(len(parts)):
            owners.setdefault(".".join(parts[:cut]), set()).add(name)
    return owners


def derive_pairs(hf: torch.nn.Module, fms: torch.nn.Module,
                 rename: Callable[[Mapping[str, object]], Mapping[str, object]]) -> List[Tuple[str, str]]:
    """(HF module, FMS module) pairs whose parameter sets correspond exactly under `rename` (the FMS adapter's name
    step), in HF module order; the roots (outputs not comparable as such) and module containers are left out."""
    hf_owners, fms_owners = _module_params(hf), _module_params(fms)
    fms_by_params = {frozenset(params): path for path, params in fms_owners.items()}
    pairs = []
    for path, module in hf.named_modules():
        if not path or path not in hf_owners or isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue  # the root, and containers that are never called
        renamed = frozenset(rename({name: None for name in hf_owners[path]}))
        target = fms_by_params.get(renamed)
        if target:
            pairs.append((path, target))
    return pairs


def granite_lm_probes(hf: torch.nn.Module, fms: torch.nn.Module, head_dim: int,
                      rename: Optional[Callable] = None) -> Tuple[Tuple[Probe, ...], dict]:
    """The derived probe table and how it was made ({'derived': n, 'overridden': m})."""
    if rename is None:
        from fms.models.granite import _hf_to_fms_names as rename
    probes, overridden = [], 0
    for hf_path, fms_path in derive_pairs(hf, fms, rename):
        adapter = "identity"
        if hf_path.endswith(ROPE_OVERRIDES):
            adapter, overridden = f"rope_interleaved_to_halves({head_dim})", overridden + 1
        probes.append(Probe(fms_path, hf_path, fms_path, hf_take="output[0?]", fms_take="output[0?]",
                            fms_adapter=adapter, note="derived from the FMS adapter's name map"))
    return tuple(probes), {"derived": len(probes), "overridden": overridden}
