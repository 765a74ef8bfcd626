"""Fixture builders for the parity harness: HF configs, tokenizer, seeded checkpoints (cached), speech clips.

    from parity.fixtures import build_checkpoint, load_speech_dataset
    folder = build_checkpoint("tiny")                # hub layout, cached by content hash
    folder = build_checkpoint("tiny", layout="tf5")  # re-saved by transformers 5.x save_pretrained
    dataset = load_speech_dataset()                  # librispeech_asr_dummy schema, 16 kHz float32
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from . import _checkpoint
from ._tokenizer import AUDIO_TOKEN, FIXTURES_DIR, build_tokenizer

__all__ = [
    "AUDIO_TOKEN",
    "CONFIG_VARIANTS",
    "FIXTURES_DIR",
    "LAYOUTS",
    "VARIANTS",
    "build_checkpoint",
    "build_tokenizer",
    "hf_config_path",
    "load_hf_config",
    "load_speech_dataset",
    "speech_clip_table",
]

VARIANTS = ("tiny", "2b", "8b")
CONFIG_VARIANTS = VARIANTS + ("tiny-untied",)
LAYOUTS = ("hub", "tf5")
CONFIGS_DIR = FIXTURES_DIR / "configs"
SPEECH_DIR = FIXTURES_DIR / "speech"
SPEECH_METADATA = SPEECH_DIR / "metadata.jsonl"
SAMPLE_RATE = 16000
CACHE_ENV = "GRANITE_SPEECH_FIXTURE_CACHE"
LIBRISPEECH_DUMMY = "hf-internal-testing/librispeech_asr_dummy"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BUILDER_SOURCES = (
    Path(__file__),
    Path(_checkpoint.__file__),
    Path(__file__).with_name("_tokenizer.py"),
    FIXTURES_DIR / "text" / "tokenizer_corpus.txt",
)


def hf_config_path(variant: str) -> Path:
    """fixtures/configs/<variant>.json (HF config.json content)."""
    if variant not in CONFIG_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {CONFIG_VARIANTS}")
    return CONFIGS_DIR / f"{variant}.json"


def load_hf_config(variant_or_config: str | Path | dict) -> dict:
    """The HF config dict of a variant name, a config.json path, or a dict (returned as a copy)."""
    if isinstance(variant_or_config, dict):
        return json.loads(json.dumps(variant_or_config))
    if isinstance(variant_or_config, str) and variant_or_config in CONFIG_VARIANTS:
        path = hf_config_path(variant_or_config)
    elif isinstance(variant_or_config, (str, Path)):
        path = Path(variant_or_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"{variant_or_config!r} is neither a variant {CONFIG_VARIANTS} nor an existing config.json path"
            )
    else:
        raise TypeError(f"expected a variant name, a path or a dict; got {type(variant_or_config).__name__}")
    return json.loads(path.read_text())


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_DTYPES.values())}")
    return dtype


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "granite-speech-parity")


def _builder_version() -> str:
    import transformers

    digest = hashlib.sha256(transformers.__version__.encode())  # init code and the tf5 writer depend on it
    for path in _BUILDER_SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache_key(hf_config: dict, **params) -> str:
    payload = json.dumps({"config": hf_config, "builder": _builder_version(), **params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _build_atomically(final: Path, write) -> Path:
    """Run write(tmp_dir) and rename tmp_dir to final; a concurrent winner's folder is kept."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_checkpoint(
    variant_or_config: str | Path | dict,
    *,
    seed: int = 0,
    layout: str = "hub",
    cache_dir: Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
    max_shard_bytes: int = _checkpoint.DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Folder with a seeded random GraniteSpeech checkpoint, built once and cached by content hash.

    layout "hub": config.json, model-0000i-of-0000n.safetensors (>= 2 shards) + index in the legacy key layout,
      adapter_config.json + adapter_model.safetensors (PEFT LoRA on q_proj/v_proj, lora_B non-zero), tokenizer
      files, preprocessor_config.json, processor_config.json.
    layout "tf5": the hub checkpoint loaded and re-saved by transformers 5.x (base model and processor), with the
      adapter files written hub-style.
    LoRA defaults: r=64/alpha=32 for real sizes, r=8/alpha=16 for tiny (see _checkpoint.default_lora_shape).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    hf_config = load_hf_config(variant_or_config)
    _checkpoint.check_config(hf_config)
    dtype = _resolve_dtype(dtype)
    default_rank, default_alpha = _checkpoint.default_lora_shape(hf_config)
    lora_rank = default_rank if lora_rank is None else lora_rank
    lora_alpha = default_alpha if lora_alpha is None else lora_alpha
    if lora_rank <= 0 or lora_alpha <= 0:
        raise ValueError(f"lora_rank and lora_alpha must be positive, got {lora_rank}, {lora_alpha}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dtype_name = str(dtype).removeprefix("torch.")
    key = _cache_key(
        hf_config, seed=seed, layout=layout, dtype=dtype_name, lora=[lora_rank, lora_alpha], shard=max_shard_bytes
    )
    label = variant_or_config if isinstance(variant_or_config, str) and variant_or_config in CONFIG_VARIANTS else "cfg"
    final = cache_dir / f"{label}-{layout}-{dtype_name}-{key}"

    if layout == "hub":
        def write(tmp: Path) -> None:
            _checkpoint.write_hub_folder(
                tmp, hf_config, final_path=final, seed=seed, dtype=dtype,
                lora_rank=lora_rank, lora_alpha=lora_alpha, max_shard_bytes=max_shard_bytes,
            )
    else:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise ValueError(f"layout 'tf5' is written by transformers 5.x; this is {transformers.__version__}")
        hub_folder = build_checkpoint(
            hf_config if label == "cfg" else label, seed=seed, layout="hub", cache_dir=cache_dir, dtype=dtype,
            lora_rank=lora_rank, lora_alpha=lora_alpha, max_shard_bytes=max_shard_bytes,
        )

        def write(tmp: Path) -> None:
            _checkpoint.write_tf5_folder(
                tmp, hub_folder, final_path=final, dtype=dtype, max_shard_bytes=max_shard_bytes
            )

    return _build_atomically(final, write)


def speech_clip_table() -> list[dict]:
    """The CLIPS table of fixtures/make_clips.py (id, num_samples, encoder_frames, boundary, text)."""
    spec = importlib.util.spec_from_file_location("granite_speech_make_clips", FIXTURES_DIR / "make_clips.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [dict(clip) for clip in module.CLIPS]


def _decode_audio_with_soundfile(batch: dict) -> dict:
    import numpy as np
    import soundfile as sf

    decoded = []
    for audio in batch["audio"]:
        source = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]
        array, rate = sf.read(source, dtype="float32", always_2d=False)
        if array.ndim != 1:
            raise ValueError(f"expected mono audio in {audio['path']}, got shape {array.shape}")
        if rate != SAMPLE_RATE:
            raise ValueError(f"expected {SAMPLE_RATE} Hz audio in {audio['path']}, got {rate} Hz")
        decoded.append({"array": np.asarray(array, dtype=np.float32), "sampling_rate": rate, "path": audio["path"]})
    batch["audio"] = decoded
    return batch


def _cached_librispeech_dummy():
    """The hub dataset from a local hub snapshot only: `local_files_only` never opens a connection."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(LIBRISPEECH_DUMMY, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError as err:
        raise ValueError(
            f"{LIBRISPEECH_DUMMY} is not in the local HF hub cache and is never downloaded here; "
            f"use source='local' (the committed clips). Cause: {err}"
        ) from err
    return datasets.load_dataset(snapshot, "clean", split="validation")


def load_speech_dataset(source: str = "local"):
    """A `datasets.Dataset` in the librispeech_asr_dummy schema (file, audio, text, speaker_id, chapter_id, id).

    `audio` is decoded on access with soundfile: {"array": float32 [N], "sampling_rate": 16000, "path": str}.
    source "local": the committed espeak-ng clips in fixtures/speech (rows in CLIPS order).
    source "librispeech_dummy": hf-internal-testing/librispeech_asr_dummy ("clean", "validation") from the local
      HF cache only (never downloads); raises if it is not cached.
    """
    import datasets

    if source == "local":
        rows = [json.loads(line) for line in SPEECH_METADATA.read_text().splitlines() if line.strip()]
        for row in rows:
            row["file"] = str(SPEECH_DIR / row["file"])
            row["audio"] = {"bytes": None, "path": row["file"]}
        features = datasets.Features(
            {
                "file": datasets.Value("string"),
                "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                "text": datasets.Value("string"),
                "speaker_id": datasets.Value("int64"),
                "chapter_id": datasets.Value("int64"),
                "id": datasets.Value("string"),
            }
        )
        # Cast to Audio after construction: encoding through Audio would import torchcodec.
        dataset = datasets.Dataset.from_list(rows, features=features)
        dataset = dataset.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE, decode=False))
    elif source == "librispeech_dummy":
        dataset = _cached_librispeech_dummy()
        dataset = dataset.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE, decode=False))
    else:
        raise ValueError(f"unknown source {source!r}; expected 'local' or 'librispeech_dummy'")
    dataset = dataset.select_columns(["file", "audio", "text", "speaker_id", "chapter_id", "id"])
    return dataset.with_transform(_decode_audio_with_soundfile)


def read_speech_rows() -> list[dict]:
    """The committed clips as rows of the librispeech_asr_dummy schema, read with soundfile only (no `datasets`,
    which GPU images may lack); `load_speech_dataset()` wraps the same rows in a `datasets.Dataset`."""
    rows = [json.loads(line) for line in SPEECH_METADATA.read_text().splitlines() if line.strip()]
    for row in rows:
        path = str(SPEECH_DIR / row["file"])
        row["audio"] = _decode_audio_with_soundfile({"audio": [{"path": path, "bytes": None}]})["audio"][0]
    return rows
