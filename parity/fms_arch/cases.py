"""The inputs each architecture is compared on, built the same way for both sides (FMS's own padding helper gives
FMS its mask and positions; HF gets the equivalent 2-D attention mask and the same positions)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from parity.fms_arch.configs import Arch

SEQ_LEN, SHORT_LEN = 12, 7  # the padded batch: a full row and a row padded on the side FMS pads
NEW_TOKENS = 6


@dataclass
class Inputs:
    """One input of one case: HF's forward kwargs, FMS's positional ids and keyword arguments, the token validity."""

    name: str
    hf: Dict[str, Any]
    fms_args: Tuple[Any, ...]
    fms_kwargs: Dict[str, Any] = field(default_factory=dict)
    valid: Optional[torch.Tensor] = None  # [B, T] bool: real tokens (None: every position is real)
    hf_entry: str = ""  # HF submodule the forward enters through ("" = the model itself)

    @property
    def label(self) -> str:
        """The short name a section title uses: "one sequence", "padded batch", "one image"."""
        return self.name.split(" of ")[0].split(" (")[0]

    def hf_forward(self, model: torch.nn.Module):
        module = model.get_submodule(self.hf_entry) if self.hf_entry else model
        return module(**self.hf)

    def fms_forward(self, model: torch.nn.Module):
        return model(*self.fms_args, **self.fms_kwargs)

    def to(self, dtype: torch.dtype) -> "Inputs":
        """Floating inputs (pixels) in `dtype`; ids, masks and positions unchanged."""
        cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return Inputs(self.name, {k: cast(v) for k, v in self.hf.items()}, tuple(cast(v) for v in self.fms_args),
                      {k: (cast(v) if k != "mask" else v) for k, v in self.fms_kwargs.items()}, self.valid,
                      self.hf_entry)


def _tokens(config, n: int, seed: int) -> torch.Tensor:
    """Ordinary token ids: above the special ids (pad / bos / eos / image) that change a model's behaviour."""
    text = getattr(config, "text_config", None) or config
    vocab = min(text.vocab_size, 4096)
    return torch.randint(3, min(vocab - 2, 120), (n,), generator=torch.Generator().manual_seed(seed))


def _pad_id(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.pad_token_id if getattr(text, "pad_token_id", None) is not None else 0)


def single(arch: Arch, config) -> Inputs:
    if arch.kind == "vision":
        vision = config.vision_config
        pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size,
                             generator=torch.Generator().manual_seed(2))
        return Inputs("one image", {"pixel_values": pixels}, (pixels,), hf_entry="vision_model")
    ids = _tokens(config, SEQ_LEN, 1)[None]
    hf = {"input_ids": ids}
    if arch.kind != "encoder":
        hf["use_cache"] = False
    return Inputs(f"one sequence of {SEQ_LEN} tokens", hf, (ids,))


def padded(arch: Arch, config) -> Optional[Inputs]:
    """Two rows, the second padded (left for decoders, right for encoders); None where FMS takes no mask."""
    if arch.kind not in ("decoder", "encoder"):
        return None
    from fms.utils.generation import pad_input_ids

    decoder = arch.kind == "decoder"
    rows = [_tokens(config, SEQ_LEN, 3), _tokens(config, SHORT_LEN, 4)]
    ids, kwargs = pad_input_ids(rows, is_causal_mask=decoder, padding_side="left" if decoder else "right",
                                pad_token_id=_pad_id(config))
    lengths = torch.tensor([SEQ_LEN, SHORT_LEN])
    positions = torch.arange(SEQ_LEN)[None]
    valid = (positions >= SEQ_LEN - lengths[:, None]) if decoder else (positions < lengths[:, None])
    hf = {"input_ids": ids, "attention_mask": valid.long()}
    fms_kwargs = {"mask": kwargs["mask"]}
    if decoder:  # HF's forward does not derive positions from the mask: both get FMS's
        hf.update(position_ids=kwargs["position_ids"], use_cache=False)
        fms_kwargs["position_ids"] = kwargs["position_ids"]
    side = "left" if decoder else "right"
    return Inputs(f"padded batch of 2 ({SEQ_LEN} and {SHORT_LEN} tokens, {side}-padded)", hf, (ids,), fms_kwargs,
                  valid=valid)


def generation_prompt(config) -> torch.Tensor:
    return _tokens(config, 8, 5)[None]
