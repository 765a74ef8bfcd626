"""The reference side of a run on disk: capture sets saved once (`compare --save-captures DIR`) and compared against
in another process or on another machine (`--reference-captures DIR`), without loading the reference model there.

The file carries a fingerprint beside the captures: the checkpoint's (`checkpoint_fingerprint`), the inputs each
set was recorded from (per input tensor: dtype, shape, sha256 and, for floating tensors, two sums), the dtypes of
each set, the dtype a float64 copy was made from (for noise floors), and the versions (for information). A run
reading the file checks the checkpoint when it opens it and each set's inputs before using the set: a reference
that belongs to another run raises `ReferenceMismatch` (a usage error) instead of showing up as a parity failure.

Floating inputs (features, audio samples) match when bit-identical or when their sums agree to `FLOAT_INPUT_RTOL`:
the same audio read and featurised on another CPU may differ in the last bits, other audio differs by far more.
"""

import hashlib
import json
import struct
from importlib import metadata as distributions
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Union

import torch

from parity.capture import Captures, ReferenceMismatch, load_capture_sets, save_capture_sets  # noqa: F401
from parity.tolerances import dtype_name

REFERENCE_FILE = "hf_captures.safetensors"  # what --save-captures writes and --reference-captures reads
FINGERPRINT_KEY = "parity_fingerprint"  # the safetensors metadata entry beside the captures' own
FINGERPRINT_FORMAT = 1
FLOAT_INPUT_RTOL = 1e-4  # last-bit differences move a sum by ~1e-7 relative; other audio by far more than 1e-4
VERSIONED = ("transformers", "ibm-fms")  # beside torch's own version string (it names the CUDA build)
# checkpoint content sampled per tensor (whole tensors up to SAMPLE_BLOCKS * SAMPLE_BYTES)
SAMPLE_BLOCKS = 8
SAMPLE_BYTES = 512


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def checkpoint_fingerprint(folder: Union[str, Path]) -> str:
    """sha256 over every *.json file, and over each safetensors file's name, size, header (tensor names, dtypes,
    shapes, offsets) and a sample of every tensor's bytes (the first, the last and evenly spaced blocks between):
    identifies a checkpoint, fine-tunes of the same layout included, without reading gigabytes of weights."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as handle:
            if path.suffix != ".safetensors":
                digest.update(handle.read())
                continue
            (length,) = struct.unpack("<Q", handle.read(8))
            header = handle.read(min(length, 100_000_000))
            digest.update(header)
            for block in _sampled_tensor_bytes(handle, header, 8 + length):
                digest.update(block)
    return digest.hexdigest()


def _sampled_tensor_bytes(handle, header: bytes, data_start: int) -> Iterator[bytes]:
    try:
        entries = json.loads(header)
    except ValueError:  # a truncated or foreign file: its header bytes alone identify it
        return
    spans = sorted(tuple(e["data_offsets"]) for k, e in entries.items() if k != "__metadata__")
    for begin, end in spans:
        size = end - begin
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            blocks = [(0, size)]
        else:
            blocks = [(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1), SAMPLE_BYTES) for i in range(SAMPLE_BLOCKS)]
        for start, length in blocks:
            handle.seek(data_start + begin + start)
            yield handle.read(length)


def describe_inputs(inputs: Mapping[str, torch.Tensor]) -> Dict[str, dict]:
    """Per input tensor: dtype, shape, sha256 of its bytes and, when floating, its sums of |x| and x² (float64)."""
    out = {}
    for name, value in sorted(inputs.items()):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {name!r} must be a tensor to be fingerprinted, got {type(value).__name__}")
        flat = value.detach().cpu().contiguous().reshape(-1)
        entry = {"dtype": dtype_name(value.dtype), "shape": list(value.shape),
                 "sha256": hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()}
        if value.is_floating_point():
            wide = flat.double()
            entry.update(sum_abs=float(wide.abs().sum()), sum_sq=float((wide * wide).sum()))
        out[name] = entry
    return out


def input_differences(saved: Mapping[str, dict], here: Mapping[str, dict]) -> List[str]:
    """What differs between two `describe_inputs` records, one phrase per input (empty: the same inputs)."""
    if set(saved) != set(here):
        return [f"inputs {sorted(here)} here, {sorted(saved)} in the reference"]
    differences = []
    for name in sorted(here):
        old, new = saved[name], here[name]
        if (old["dtype"], old["shape"]) != (new["dtype"], new["shape"]):
            differences.append(f"{name} is {new['dtype']}{new['shape']} here, {old['dtype']}{old['shape']} in the "
                               "reference")
        elif old["sha256"] != new["sha256"] and not _sums_agree(old, new):
            differences.append(f"{name} holds other values")
    return differences


def _sums_agree(old: dict, new: dict) -> bool:
    return "sum_abs" in old and all(abs(old[k] - new[k]) <= FLOAT_INPUT_RTOL * max(abs(old[k]), abs(new[k]))
                                    for k in ("sum_abs", "sum_sq"))


def _versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"torch": torch.__version__}
    for name in VERSIONED:
        try:
            out[name] = distributions.version(name)
        except distributions.PackageNotFoundError:
            out[name] = None
    return out


def _capture_dtypes(captures: Captures) -> List[str]:
    return sorted({dtype_name(captures.get(k).dtype) for k in captures.keys() if captures.has_tensor(k)})


def read_fingerprint(path: Union[str, Path]) -> dict:
    """The fingerprint record of a reference file (metadata only, no tensor read); raises `ReferenceMismatch` for a
    file saved without one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get(FINGERPRINT_KEY)
    if raw is None:
        raise ReferenceMismatch(f"{path} was saved by an older harness without fingerprints (no "
                                f"'{FINGERPRINT_KEY}' metadata): the checkpoint and inputs it was recorded from "
                                "cannot be checked; save the reference again")
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise ReferenceMismatch(f"{path} has an unreadable '{FINGERPRINT_KEY}' entry ({err})") from err
    if not isinstance(record, dict) or record.get("format") != FINGERPRINT_FORMAT:
        raise ReferenceMismatch(f"{path} has a fingerprint of another format than {FINGERPRINT_FORMAT}; save the "
                                "reference again with this version")
    return record


# ---------------------------------------------------------------------------------------------------------------
# the store


class ReferenceStore:
    """Reference-side capture sets of a run, by section: collected to be saved (`save`: a folder), or read from
    such a folder (`read`), checked against this run's `checkpoint` on opening and against each set's inputs on
    `get`, so that the reference model is never loaded here."""

    def __init__(self, save: Optional[Path] = None, read: Optional[Path] = None,
                 checkpoint: Optional[Path] = None):
        self.save_path = None if save is None else Path(save) / REFERENCE_FILE
        self.path = None if read is None else Path(read) / REFERENCE_FILE
        self.reading = self.path is not None
        self.checkpoint = checkpoint
        self.records: Dict[str, dict] = {}  # per set: its inputs, dtypes and (floors) the dtype copied from
        self.sets: Dict[str, Captures] = {}
        if self.reading:
            fingerprint = read_fingerprint(self.path)
            self._check_checkpoint(fingerprint.get("checkpoint"))
            self.records = fingerprint.get("sets", {})
            self.sets = load_capture_sets(self.path)

    def _check_checkpoint(self, saved: Optional[str]) -> None:
        if self.checkpoint is None:
            return
        here = checkpoint_fingerprint(self.checkpoint)
        if saved != here:
            raise ReferenceMismatch(f"the checkpoint differs: {self.path} was saved from a checkpoint with "
                                    f"fingerprint {str(saved)[:12]}..., this run's {self.checkpoint} has "
                                    f"{here[:12]}...; save the reference again from this checkpoint")

    def get(self, name: str, inputs: Mapping[str, torch.Tensor], optional: bool = False) -> Optional[Captures]:
        """The set `name`, after checking it was recorded from `inputs`; None for a missing `optional` set."""
        if name not in self.sets:
            if optional:
                return None
            raise ReferenceMismatch(f"{self.path} holds no section {name!r}: it was saved from other inputs (it "
                                    f"holds {sorted(self.sets)[:6]})")
        saved = self.records.get(name, {}).get("inputs", {})
        differences = input_differences(saved, describe_inputs(inputs))
        if differences:
            shown = "; ".join(differences[:2]) + (f"; {len(differences) - 2} more" if len(differences) > 2 else "")
            raise ReferenceMismatch(f"the inputs of section {name!r} differ from the ones {self.path} was saved "
                                    f"from ({shown}): it was saved from other audio, prompts or settings")
        return self.sets[name]

    def made_from(self, name: str) -> Optional[torch.dtype]:
        """The dtype the float64 copy behind set `name` was made from (None: not a float64 copy, or no such set)."""
        source = self.records.get(name, {}).get("made_from")
        return None if source is None else getattr(torch, source)

    def put(self, name: str, captures: Captures, inputs: Mapping[str, torch.Tensor],
            made_from: Optional[torch.dtype] = None) -> None:
        """Keep set `name`, recorded from `inputs` (by a float64 copy made from `made_from` weights, for floors)."""
        if self.save_path is None or self.reading:
            return
        self.sets[name] = captures
        self.records[name] = {"inputs": describe_inputs(inputs), "dtypes": _capture_dtypes(captures)}
        if made_from is not None:
            self.records[name]["made_from"] = dtype_name(made_from)

    def finish(self) -> Optional[Path]:
        """Write the kept sets with their fingerprint (the path written, None when not saving)."""
        if self.save_path is None or self.reading:
            return None
        fingerprint = {"format": FINGERPRINT_FORMAT, "versions": _versions(), "sets": self.records,
                       "checkpoint": None if self.checkpoint is None else checkpoint_fingerprint(self.checkpoint)}
        return save_capture_sets(self.save_path, self.sets, metadata={FINGERPRINT_KEY: json.dumps(fingerprint)})
