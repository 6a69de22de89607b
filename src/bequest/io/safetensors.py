"""Safetensors files read without loading them: headers checked against the file, shards in order.

Nothing here unpickles: a folder that holds only pickle weights is refused with the way to convert it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from bequest.errors import BequestError


def read_header(file: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file, checked against the file's real size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise BequestError(f"{file}: not a readable safetensors file ({e}); re-save or re-download it") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise BequestError(
            f"{file}: truncated or corrupted safetensors ({size} bytes, header says {8 + n + end}); "
            "re-save or re-download it"
        )
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise BequestError(f"{index}: unreadable shard index ({e}); re-save the model") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise BequestError(f"{index}: missing shard {missing[0]}; copy the whole model folder")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise BequestError(
            f"{path}: only pickle weights (*.bin); bequest never unpickles, convert them with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise BequestError(f"{path}: no model.safetensors found; point at a Hugging Face model folder")
