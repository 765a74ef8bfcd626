"""Checks on a checkpoint folder's files before any tensor is read, so a broken folder is reported by file name
(FMS's loader globs `*.safetensors`, never reads the index, and surfaces a truncated file as a bare header error)."""

import json
from pathlib import Path
from typing import Union

INDEX_NAME = "model.safetensors.index.json"


def check_checkpoint_folder(folder: Union[str, Path]) -> Path:
    """The folder as a Path; raises FileNotFoundError / ValueError naming the missing or unreadable file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    index = folder / INDEX_NAME
    if index.is_file():
        listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [name for name in listed if not (folder / name).is_file()]
        if absent:
            raise FileNotFoundError(f"shard(s) {absent} listed in {index} are missing from {folder}")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no *.safetensors files (only safetensors are loaded, never pickle)")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                handle.keys()
        except SafetensorError as err:  # its message does not name the file
            raise ValueError(f"{shard.name} in {folder} is truncated or corrupt: {err}") from err
    return folder
