"""The modality LoRA of Granite Speech on the decoder's attention projections (PEFT `adapter_config.json`).

The adapter's weights are loaded as parameters of their own (`lora.layers.N.{q,k,v}_proj.lora_{A,B}.weight`), so
each checkpoint key maps to one parameter whatever partial state dict FMS's loader hands to the adapter steps.
After loading they are either merged into the fused QKV weights or kept and applied by a forward hook on each
attention's `in_proj` only when audio is present (HF enables the adapter in `generate` only with audio).
Under FMS tensor parallelism each rank holds the full (small) adapter and adds the rows of its own heads: FMS splits
q, k and v row-wise into contiguous per-rank blocks of heads.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from granite_speech.config import GraniteSpeechConfig

# target module -> index in the (query, key, value) split of FMS's QKV projection
TARGET_SLOT = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def add_lora_deltas(qkv: Sequence[torch.Tensor], x: torch.Tensor, pairs: Sequence[Tuple[int, torch.Tensor, torch.Tensor]],
                    scaling: float) -> List[torch.Tensor]:
    """(q, k, v) + scaling * B(A(x)) on each adapted slot; `pairs` holds (slot, A weight, B weight). Pure tensor math,
    shared by the attention hook and the fast decode step."""
    out = list(qkv)
    for slot, lora_a, lora_b in pairs:
        out[slot] = out[slot] + scaling * F.linear(F.linear(x, lora_a), lora_b)
    return out


def local_rows(full: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """This rank's rows of a full q/k/v-sized tensor: FMS's TPMultiHeadAttention keeps rows [r*n/w, (r+1)*n/w) of
    each projection (GraniteSpeech refuses kv heads fewer than ranks, where FMS would replicate them instead)."""
    world = getattr(attn, "world_size", 1)
    return full if world == 1 else full.chunk(world, dim=0)[attn.rank]


class LoRAPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)

    def reset_parameters(self):
        self.lora_A.reset_parameters()
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight


class ModalityLoRA(nn.Module):
    def __init__(self, config: GraniteSpeechConfig):
        super().__init__()
        text = config.text_config
        kvheads = text.kvheads or text.nheads
        out_features = {
            "q_proj": text.nheads * text.head_dim,
            "k_proj": kvheads * text.head_dim,
            "v_proj": kvheads * text.head_dim,
        }
        self.targets = tuple(sorted(config.lora_target_modules, key=TARGET_SLOT.__getitem__))
        self.scaling = config.lora_scaling
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {t: LoRAPair(text.emb_dim, out_features[t], config.lora_rank) for t in self.targets}
            )
            for _ in range(text.nlayers)
        )
        self.enabled = True
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []

    def reset_parameters(self):
        for layer in self.layers:
            for pair in layer.values():
                pair.reset_parameters()

    def pair_count(self) -> int:
        return sum(len(layer) for layer in self.layers)

    @torch.no_grad()
    def merge_into(self, decoder: nn.Module) -> None:
        """W += (alpha / r) * B @ A for every adapted projection of every decoder layer."""
        for layer, block in zip(self.layers, decoder.layers):
            in_proj = block.attn.in_proj
            for target, pair in layer.items():
                delta = local_rows(self.scaling * pair.delta_weight(), block.attn).to(self._weight(in_proj, target).dtype)
                self._weight(in_proj, target).add_(delta)

    @staticmethod
    def _weight(in_proj: nn.Module, target: str) -> torch.Tensor:
        slot = TARGET_SLOT[target]
        if hasattr(in_proj, "qkv_fused"):
            start = sum(in_proj.splits[:slot])
            return in_proj.qkv_fused.weight[start : start + in_proj.splits[slot]]
        return getattr(in_proj, ("query", "key", "value")[slot]).weight

    def attach(self, decoder: nn.Module, merge: bool) -> None:
        if merge:
            self.merge_into(decoder)
            return
        self.detach()
        for layer, block in zip(self.layers, decoder.layers):
            self._hooks.append(block.attn.in_proj.register_forward_hook(self._make_hook(layer, block.attn)))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _make_hook(self, layer: nn.ModuleDict, attn: nn.Module):
        def add_lora(module: nn.Module, args: tuple, output: tuple) -> Optional[tuple]:
            if not self.enabled:
                return None
            pairs = [(TARGET_SLOT[t], pair.lora_A.weight, local_rows(pair.lora_B.weight, attn))
                     for t, pair in layer.items()]
            return tuple(add_lora_deltas(output, args[0], pairs, self.scaling))

        return add_lora
