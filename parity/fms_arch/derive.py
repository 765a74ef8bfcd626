"""The probe table of any FMS architecture, derived from FMS's own checkpoint adapter and both module trees.

Derivation does not read the adapter's regexes: it runs the adapter. Every element of every HF checkpoint tensor
gets a unique tag (its global index, exact in float64), FMS's registered adapter for (architecture, "hf") converts
the tagged state dict as it converts real weights (renames, fusions, permutations, splits), and each FMS parameter's
tags say which HF tensors fed it and how (a plain copy, a row block of a fused tensor, RoPE-permuted rows). Then:

- an HF module and an FMS module are paired when the HF tensors under the HF module are exactly those that feed the
  FMS parameters under the FMS module (embeddings, norms, attention / MLP / MoE / mixer blocks, layers, heads);
- an HF leaf whose tensors went into a row block of one fused FMS tensor (q / k / v into `qkv_fused`, gate / up into
  `wg1_fused`) is paired with that FMS module through `feature_slice(a, b)`, and `rope_interleaved_to_halves(d)`
  when the tags show FMS's RoPE row permutation;
- an HF module with parameters that pairs with nothing is refused with the reason (never dropped silently).
Teacher forcing is derived from one dry run of each side: a module is re-run on HF's input[0] only where both
inputs have the same shape; FMS arguments that received the very tensor of input[0] (attention's q, k and v) are all
substituted.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from parity.adapters import build_adapter
from parity.hooks import attached_hooks
from parity.probes import Probe

NOTE = "derived from the FMS adapter (tagged state dict) and both module trees"


@dataclass(frozen=True)
class Source:
    """How one FMS tensor was made from the HF checkpoint: its HF tensors, and for a single row-block source the
    rows [start, stop) of the FMS tensor it occupies and the adapter that maps FMS's rows back to HF's order."""

    hf_keys: Tuple[str, ...]
    # copy | block | subset (part of one HF tensor) | rearranged (all its HF elements, in an order no adapter spec
    # expresses) | transformed (not a layout of tags: arithmetic)
    how: str
    blocks: Tuple[Tuple[str, int, int, str], ...] = ()  # (hf key, start row, stop row, row adapter spec)


@dataclass
class Derivation:
    probes: List[Probe] = field(default_factory=list)
    refused: List[dict] = field(default_factory=list)  # {"hf": path, "reason": ...}
    sources: Dict[str, Source] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"probes": len(self.probes), "refused": len(self.refused),
                "permuted": sum("rope_" in p.fms_adapter for p in self.probes),
                "sliced": sum("feature_slice" in p.fms_adapter for p in self.probes)}


# ---------------------------------------------------------------------------------------------------------------
# tags through the adapter


def tag_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Tuple[int, int]]]:
    """Each tensor replaced by float64 tags (its elements' global indices); key -> (first tag, end)."""
    tagged, spans, start = {}, {}, 0
    for key in sorted(hf_sd):
        n = hf_sd[key].numel()
        if start + n >= 2 ** 52:
            raise ValueError("too many checkpoint elements to tag exactly in float64")
        tagged[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(hf_sd[key].shape)
        spans[key] = (start, start + n)
        start += n
    return tagged, spans


def _rows_adapter(fms_rows: torch.Tensor, hf_rows: torch.Tensor) -> Optional[str]:
    """The adapter spec that maps FMS rows (first dim) back onto HF's: identity, a RoPE permutation, or None."""
    if fms_rows.shape != hf_rows.shape:
        return None
    if torch.equal(fms_rows, hf_rows):
        return "identity"
    n = fms_rows.shape[0]
    for head_dim in range(2, n + 1, 2):
        if n % head_dim:
            continue
        spec = f"rope_interleaved_to_halves({head_dim})"
        restored = build_adapter(spec)(fms_rows.movedim(0, -1)).movedim(-1, 0)
        if torch.equal(restored, hf_rows):
            return spec
    return None


def trace_sources(fms_tagged: Mapping[str, torch.Tensor], tagged: Mapping[str, torch.Tensor],
                  spans: Mapping[str, Tuple[int, int]]) -> Dict[str, Source]:
    """FMS key -> Source, read from the adapted tags."""
    keys = sorted(spans, key=lambda k: spans[k][0])
    starts = torch.tensor([spans[k][0] for k in keys], dtype=torch.float64)
    sources = {}
    for fms_key, value in fms_tagged.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        flat = value.detach().double().flatten()
        if flat.numel() == 0 or not bool(((flat == flat.round()) & (flat >= 0)).all()):
            sources[fms_key] = Source((), "transformed")
            continue
        owners = torch.searchsorted(starts, flat, right=True) - 1
        hf_keys = tuple(keys[i] for i in sorted(set(owners.tolist())))
        how, blocks = _layout(value.double(), hf_keys, tagged)
        if how == "transformed" and len(hf_keys) == 1 and value.numel() < tagged[hf_keys[0]].numel():
            how = "subset"
        elif how == "transformed" and sum(tagged[k].numel() for k in hf_keys) == value.numel():
            how = "rearranged"  # every element of its HF tensors, in an order no adapter spec expresses
        sources[fms_key] = Source(hf_keys, how, blocks)
    return sources


def _layout(value: torch.Tensor, hf_keys: Sequence[str], tagged: Mapping[str, torch.Tensor]):
    """('copy' | 'block' | 'transformed', blocks): each HF tensor as a contiguous row block of the FMS tensor (fused
    tensors: the blocks in any order, disjoint)."""
    if len(hf_keys) == 1 and torch.equal(value, tagged[hf_keys[0]]):
        return "copy", ((hf_keys[0], 0, value.shape[0] if value.dim() else 1, "identity"),)
    blocks = []
    for key in hf_keys:
        hf_value = tagged[key]
        if value.dim() == 0 or hf_value.dim() != value.dim() or hf_value.shape[1:] != value.shape[1:]:
            return "transformed", ()
        start = _find_block(value, hf_value)
        if start is None:
            return "transformed", ()
        stop = start + hf_value.shape[0]
        blocks.append((key, start, stop, _rows_adapter(value[start:stop], hf_value)))
    covered = sorted((start, stop) for _, start, stop, _ in blocks)
    if covered[0][0] != 0 or covered[-1][1] != value.shape[0] or \
            any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        return "transformed", ()
    return "block", tuple(blocks)


def _find_block(value: torch.Tensor, hf_value: torch.Tensor) -> Optional[int]:
    """The row where the HF tensor's tags form a block of `value` (its rows, maybe RoPE-permuted), else None."""
    rows = hf_value.shape[0]
    lo, hi = hf_value.min(), hf_value.max()
    per_row = value.flatten(1) if value.dim() > 1 else value[:, None]
    inside = ((per_row >= lo) & (per_row <= hi)).all(dim=1)
    hits = torch.nonzero(inside).flatten()
    if hits.numel() == 0:
        return None
    start = int(hits[0])
    if start + rows > value.shape[0] or not bool(inside[start:start + rows].all()):
        return None
    if _rows_adapter(value[start:start + rows], hf_value) is None:
        return None
    return start


def adapted_sources(architecture: str, hf_sd: Mapping[str, torch.Tensor], adapter_kwargs: Mapping) -> Dict[str, Source]:
    """Run FMS's registered (architecture, "hf") adapter on the tagged checkpoint and trace every FMS tensor."""
    from fms.utils.serialization import get_adapted

    tagged, spans = tag_state_dict(hf_sd)
    fms_tagged = get_adapted(architecture, "hf", dict(tagged), dict(adapter_kwargs))
    return trace_sources(fms_tagged, tagged, spans)


# ---------------------------------------------------------------------------------------------------------------
# pairing modules


def _owned(model: torch.nn.Module, names: Optional[Set[str]] = None) -> Dict[str, Set[str]]:
    """module path -> the parameter / state-dict names under it (restricted to `names` when given)."""
    owners: Dict[str, Set[str]] = {}
    for name in (names if names is not None else dict(model.named_parameters())):
        parts = name.split(".")
        for cut in range(len(parts)):
            owners.setdefault(".".join(parts[:cut]), set()).add(name)
    return owners


def checkpoint_names(hf: torch.nn.Module, hf_sd: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """HF parameter name (its module tree) -> checkpoint key (its save layout). transformers 5 may save another
    layout than it holds (Mistral3 / LLaVA: `model.language_model.*` saved as `language_model.model.*`), so the two
    are matched by content: every seeded tensor is unique."""
    by_bytes: Dict[Tuple, str] = {}
    for key, tensor in hf_sd.items():
        by_bytes.setdefault((tuple(tensor.shape), tensor.dtype, tensor.contiguous().numpy().tobytes()
                             if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes()), key)
    names = {}
    for name, param in hf.named_parameters():
        value = param.detach().cpu()
        blob = value.contiguous().numpy().tobytes() if value.dtype != torch.bfloat16 else \
            value.view(torch.int16).numpy().tobytes()
        key = by_bytes.get((tuple(value.shape), value.dtype, blob))
        if key is not None:
            names[name] = key
    return names


def pair_modules(hf: torch.nn.Module, fms: torch.nn.Module, hf_names: Mapping[str, str],
                 sources: Mapping[str, Source]) -> Tuple[List[Tuple[str, str, str]], List[dict]]:
    """[(HF path, FMS path, FMS adapter)] in HF module order, and the refused HF modules with their reasons. The
    deepest HF module claims an FMS module first (HF `intermediate` = dense + activation and its `dense` share
    one parameter set: the FMS Linear computes what `dense` computes)."""
    fms_params = {name for name, _ in fms.named_parameters()}
    # adapted keys FMS has no parameter for are dropped by its loader ("not copied into model"): they feed nothing
    sources = {key: source for key, source in sources.items() if key in fms_params}
    fms_owned = _owned(fms, fms_params)
    containers = {p for p, m in fms.named_modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))}
    fed: Dict[str, frozenset] = {}
    for path, names in fms_owned.items():
        # a leaf's output follows its rows, so it needs an exact layout; a block's output does not (its dense undoes
        # whatever order q / k / v were kept in), so a rearrangement of its tensors is fine there
        layouts = ("copy", "block") if _is_leaf(fms, path) else ("copy", "block", "rearranged")
        if path not in containers and all(n in sources and sources[n].how in layouts for n in names):
            fed[path] = frozenset(k for n in names for k in sources[n].hf_keys)
    by_fed: Dict[frozenset, str] = {}
    for path in sorted(fed, key=lambda p: -p.count(".") - (p != "")):  # the deepest module wins a tie
        by_fed.setdefault(fed[path], path)
    hf_owned = {path: {hf_names[n] for n in names} for path, names in _owned(hf, set(hf_names)).items()}
    order = [path for path, module in hf.named_modules() if path and path in hf_owned
             and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))]
    found, refused, taken = {}, {}, set()
    for path in sorted(order, key=lambda p: -p.count(".")):
        want = frozenset(hf_owned[path])
        target = by_fed.get(want)
        if target is not None and _fused_leaf(hf, path, fms, target):
            refused[path] = (f"its parameters are fused into the single FMS projection {target}, which computes "
                             "the projections, not this module's output")
            continue
        pair = (target, _leaf_adapter(fms, target, sources)) if target is not None else _sliced_pair(want, sources)
        if pair is not None and pair not in taken:
            found[path] = pair
            taken.add(pair)
            continue
        refused[path] = (f"its FMS counterpart {pair[0]} is already paired with an inner HF module of the same "
                         "parameters" if pair is not None else _why_unpaired(want, sources))
    pairs = [(path, *found[path]) for path in order if path in found]
    return pairs, _outermost([{"hf": path, "reason": refused[path]} for path in order if path in refused])


def _leaf_adapter(fms: torch.nn.Module, path: str, sources: Mapping[str, Source]) -> str:
    """The adapter of an FMS leaf whose own tensors hold their HF rows permuted (RoPE's q / k rows), else identity."""
    module = fms.get_submodule(path) if path else fms
    if any(True for _ in module.children()):
        return "identity"  # a block's output is not permuted: its dense undoes the q / k order
    specs = set()
    for name, _ in module.named_parameters(recurse=False):
        blocks = sources[f"{path}.{name}" if path else name].blocks
        specs |= {blocks[0][3]} if len(blocks) == 1 else {"identity"}
    return specs.pop() if len(specs) == 1 else "identity"


def _is_leaf(model: torch.nn.Module, path: str) -> bool:
    module = model.get_submodule(path) if path else model
    return not any(True for _ in module.children())


def _fused_leaf(hf: torch.nn.Module, hf_path: str, fms: torch.nn.Module, fms_path: str) -> bool:
    """An HF module whose parameters sit in several child modules, paired with one FMS leaf (a fused projection)."""
    fms_module = fms.get_submodule(fms_path) if fms_path else fms
    if any(True for _ in fms_module.children()):
        return False
    hf_module = hf.get_submodule(hf_path)
    return sum(1 for child in hf_module.children() if any(True for _ in child.parameters())) > 1


def _sliced_pair(want: frozenset, sources: Mapping[str, Source]):
    """An HF leaf (weight, maybe bias) occupying the same row block of one fused FMS linear: (FMS path, adapter)."""
    hits = {}
    for fms_key, source in sources.items():
        for hf_key, start, stop, adapter in source.blocks:
            if hf_key in want and source.how == "block":
                hits[hf_key] = (fms_key, start, stop, adapter)
    if set(hits) != set(want) or not hits:
        return None
    owners = {key.rsplit(".", 1)[0] for key, *_ in hits.values()}
    spans = {(start, stop) for _, start, stop, _ in hits.values()}
    adapters = {adapter for *_, adapter in hits.values()}
    if len(owners) != 1 or len(spans) != 1 or len(adapters) != 1:
        return None
    (start, stop), adapter = spans.pop(), adapters.pop()
    spec = f"feature_slice({start}, {stop})" + ("" if adapter == "identity" else f" | {adapter}")
    return owners.pop(), spec


def _why_unpaired(want: frozenset, sources: Mapping[str, Source]) -> str:
    feeding = sorted(k for k, s in sources.items() if want & set(s.hf_keys))
    if not feeding:
        return "its tensors feed no FMS parameter (the adapter drops them, or FMS has no such parameter)"
    subset = [k for k in feeding if sources[k].how == "subset"]
    if subset:
        return (f"FMS's adapter keeps only part of its tensors in {subset[:3]} (e.g. RoBERTa's padding-offset "
                "position rows): the FMS module takes other inputs, so its output is not this module's")
    if any(sources[k].how == "rearranged" for k in feeding):
        return (f"the adapter rearranges its rows inside {feeding[:3]} in an order no adapter spec expresses (e.g. a "
                "partial-rotary RoPE permutation): compared at the enclosing block instead")
    if any(sources[k].how == "transformed" for k in feeding):
        return f"the adapter transforms its tensors arithmetically into {feeding[:3]} (no exact FMS counterpart)"
    mixed = sorted({h for k in feeding for h in sources[k].hf_keys} - want)
    return (f"no FMS module is fed by exactly its tensors: {feeding[:3]} also take {mixed[:3]}" if mixed else
            f"its tensors are split across FMS modules {sorted({k.rsplit('.', 1)[0] for k in feeding})[:4]}")


def _outermost(refused: List[dict]) -> List[dict]:
    """A refused module inside a refused module for the same reason is the same story: listed under the outermost."""
    kept: List[dict] = []
    for entry in refused:
        parent = next((k for k in kept if entry["hf"].startswith(k["hf"] + ".")), None)
        if parent is not None and parent["reason"] == entry["reason"]:
            parent.setdefault("inside", []).append(entry["hf"])
        else:
            kept.append(entry)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# teacher forcing, from one dry run of each side


def input_shapes(model: torch.nn.Module, paths: Sequence[str], forward) -> Dict[str, dict]:
    """path -> {"shape": input[0] shape, "same": FMS argument names that received input[0] itself} (first call)."""
    seen: Dict[str, dict] = {}
    with attached_hooks() as hooks:
        for path in set(paths):
            def record(mod, args, kwargs, path=path):
                if path in seen:
                    return
                first = args[0] if args else next(iter(kwargs.values()), None)
                same = [name for name, value in kwargs.items() if value is first]
                seen[path] = {"shape": tuple(first.shape) if isinstance(first, torch.Tensor) else None,
                              "same": same, "positional": len(args)}
            hooks.pre_forward(model.get_submodule(path) if path else model, record)
        with torch.no_grad():
            forward(model)
    return seen


def teacher_pairs(hf_seen: Optional[dict], fms_seen: Optional[dict]) -> Tuple[Tuple[Tuple[str, str], ...], str]:
    if not hf_seen or not fms_seen:
        return (), "not teacher-forced: the module did not run on one side in the dry run"
    if hf_seen["shape"] is None or hf_seen["shape"] != fms_seen["shape"]:
        return (), (f"not teacher-forced: HF input[0] {hf_seen['shape']} and FMS input[0] {fms_seen['shape']} differ "
                    "in shape (the modules take different first inputs)")
    pairs = [("input[0]", "input[0]")]
    if not fms_seen["positional"]:  # input[0] was passed by keyword: it is among `same`; substitute each once
        pairs = []
    pairs += [("input[0]", f"input.{name}") for name in fms_seen["same"]]
    return tuple(pairs), ""


def _permuted_input(fms: torch.nn.Module, path: str) -> bool:
    """A norm over permuted q / k heads (Qwen3's q_norm): its only parameters are 1-D, so its input is permuted."""
    module = fms.get_submodule(path) if path else fms
    return all(param.dim() == 1 for param in module.parameters())


def derive(hf: torch.nn.Module, fms: torch.nn.Module, architecture: str, hf_sd: Mapping[str, torch.Tensor],
           hf_forward, fms_forward, adapter_kwargs: Mapping) -> Derivation:
    """The probe table for (hf, fms): one probe per paired module (named by its FMS path), plus refusals."""
    derivation = Derivation()
    derivation.sources = adapted_sources(architecture, hf_sd, adapter_kwargs)
    names = checkpoint_names(hf, hf_sd)
    unmatched = sorted(n for n, _ in hf.named_parameters() if n not in names)
    pairs, derivation.refused = pair_modules(hf, fms, names, derivation.sources)
    if unmatched:
        derivation.refused.insert(0, {"hf": ", ".join(unmatched[:4]) + (" ..." if len(unmatched) > 4 else ""),
                                      "reason": f"{len(unmatched)} HF parameter(s) are saved in another form than "
                                                "the model holds them (no checkpoint tensor equals them)"})
    hf_seen = input_shapes(hf, [p[0] for p in pairs], hf_forward)
    fms_seen = input_shapes(fms, [p[1] for p in pairs], fms_forward)
    for hf_path, fms_path, adapter in pairs:
        if hf_path not in hf_seen:  # (a module FMS never runs while HF does stays: that is a finding)
            why = ("neither module runs on this input (e.g. the vision tower on a text-only input)"
                   if fms_path not in fms_seen else "HF's forward never calls this module (it uses the module's "
                   "weights directly, e.g. a fallback kernel)")
            derivation.refused.append({"hf": hf_path, "reason": f"paired with {fms_path}, but {why}"})
            continue
        teacher, why = teacher_pairs(hf_seen.get(hf_path), fms_seen.get(fms_path))
        if teacher and adapter != "identity" and _permuted_input(fms, fms_path):
            teacher, why = (), ("not teacher-forced: the module's input is in FMS's RoPE-permuted order, HF's input "
                                "cannot be substituted as is")
        name = (fms_path or "model") if adapter == "identity" else f"{fms_path}-{hf_path.rsplit('.', 1)[-1]}"
        derivation.probes.append(Probe(name, hf_path, fms_path, hf_take="output[0?]", fms_take="output[0?]",
                                       fms_adapter=adapter, teacher=teacher,
                                       note=NOTE + (f"; {why}" if why else "")))
    return derivation
