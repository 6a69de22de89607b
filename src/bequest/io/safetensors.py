"""Safetensors files at the byte level: headers checked against the file, shards in order, tensors
read and written one at a time at their offsets (so a checkpoint never has to fit in memory).

Nothing here unpickles: a folder that holds only pickle weights is refused with the way to convert it.
Nothing here needs torch either, but turning bytes into a torch tensor (imported there, so that copying
bytes never pays torch's import).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
    if not isinstance(header, dict):
        raise BequestError(f"{file}: the safetensors header is not a table of tensors; re-save or re-download it")
    header.pop("__metadata__", None)
    for name, t in header.items():
        if not (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
                and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
                and all(isinstance(x, int) and x >= 0 for x in [*t["shape"], *t["data_offsets"]])):
            raise BequestError(f"{file}: tensor {name!r} has no valid dtype, shape and data_offsets in the header; "
                               "re-save or re-download it")
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


# ---------------------------------------------------------------- sizes and disk

class Dtype(NamedTuple):
    size: int  # bytes per element
    name: str  # torch's (and config.json's) name for it


DTYPES = {
    "F64": Dtype(8, "float64"), "F32": Dtype(4, "float32"), "F16": Dtype(2, "float16"), "BF16": Dtype(2, "bfloat16"),
    "F8_E4M3": Dtype(1, "float8_e4m3fn"), "F8_E5M2": Dtype(1, "float8_e5m2"),
    "I64": Dtype(8, "int64"), "I32": Dtype(4, "int32"), "I16": Dtype(2, "int16"), "I8": Dtype(1, "int8"),
    "U8": Dtype(1, "uint8"), "BOOL": Dtype(1, "bool"),
}


def torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code].name)
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MARGIN = 64 * 2**20  # bytes kept free beyond the shards: headers, config, tokenizer, card


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '512MiB' -> 2**29; a bare number is bytes (Hugging Face's convention)."""
    s = str(text).strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    try:
        n = float(digits) * UNITS[s[len(digits):]]
    except (ValueError, KeyError):
        n = 0
    if not 1 <= n < float("inf"):
        raise BequestError(f"--shard-size {text!r} is not a size; write it like 2GB, 500MB or 4GiB")
    return int(n)


def check_disk(out: str | Path, nbytes: int) -> None:
    """Refuse up front when the output's disk cannot hold `nbytes` more (plus a margin)."""
    where = Path(out).resolve().parent
    while not where.exists():
        where = where.parent
    free, need = shutil.disk_usage(where).free, nbytes + MARGIN
    if free < need:
        raise BequestError(
            f"{where} has {free / 1e9:.2f} GB free but the grown model needs {need / 1e9:.2f} GB; "
            "free some space or write OUT to a bigger disk"
        )


# ---------------------------------------------------------------- raw tensors in


@dataclass
class StoredTensor:
    """One tensor of a safetensors file and where its bytes lie."""

    file: Path
    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in `file`
    nbytes: int


def stored_tensors(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of one file by name, located from its (checked) header; nothing is read."""
    header = read_header(file)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        out[name] = StoredTensor(file, name, info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)
    return out


class TensorReader:
    """Source files opened once. Tensors are read into memory of their own, or mapped one at a time
    (`mapped`) for a single pass over them, never through a long-lived mmap of a file: its pages count
    as resident until it closes, so reading a whole model through one would look (and be accounted) as
    big as the model."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.fds = stack, {}

    def _fd(self, s: StoredTensor) -> int:
        if s.file not in self.fds:
            self.fds[s.file] = os.open(s.file, os.O_RDONLY)
            self.stack.callback(os.close, self.fds[s.file])
        return self.fds[s.file]

    def tensor(self, s: StoredTensor):
        """`s` as a torch tensor of its own dtype."""
        import torch

        buf = torch.empty(s.nbytes, dtype=torch.uint8)
        self.read(s, buf.numpy(), 0)
        return buf.view(torch_dtype(s.dtype)).reshape(s.shape)  # safetensors is little-endian, as torch on x86/ARM

    def float32(self, s: StoredTensor, chunk: int = 2**24):
        """`s` as an fp32 torch tensor, converted a chunk at a time: never the stored copy and the fp32 one
        whole at once."""
        import torch

        out = torch.empty(s.shape, dtype=torch.float32).view(-1)
        size = DTYPES[s.dtype].size
        buf = torch.empty(min(chunk - chunk % size, s.nbytes) or size, dtype=torch.uint8)
        for begin in range(0, s.nbytes, len(buf)):
            part = buf[: min(len(buf), s.nbytes - begin)]
            self.read(s, part.numpy(), begin)
            out[begin // size : (begin + len(part)) // size] = part.view(torch_dtype(s.dtype))
        return out.view(s.shape)

    def read(self, s: StoredTensor, buf, begin: int) -> None:
        """Bytes begin .. begin + len(buf) of `s` into `buf` (any writable buffer of bytes)."""
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            n = os.preadv(self._fd(s), [view[done:]], s.start + begin + done)
            if n == 0:
                _changed(s)
            done += n

    def mapped(self, s: StoredTensor, whole: bool = True) -> memoryview:
        """The bytes of `s` mapped from its file, not copied (a pass over them reads the page cache once,
        where a read would copy it first); unmapped when the last view of them goes. `whole` maps every
        page up front, else only the pages touched are read."""
        if s.nbytes == 0:
            return memoryview(b"")
        begin = s.start - s.start % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if whole else 0)
        try:
            pages = mmap.mmap(self._fd(s), s.start + s.nbytes - begin, flags=flags, prot=mmap.PROT_READ, offset=begin)
        except (OSError, ValueError):
            _changed(s)  # the file is shorter than its header says now
        return memoryview(pages)[s.start - begin :]

    def prefetch(self, s: StoredTensor) -> None:
        """Ask the kernel to start reading `s` now, so the disk works while the tensor before it is copied."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(s), s.start, s.nbytes, os.POSIX_FADV_WILLNEED)

    def copy(self, s: StoredTensor, fd: int, pos: int) -> None:
        """The bytes of `s` as they are, to `fd` at `pos`."""
        done = 0
        try:
            os.lseek(fd, pos, os.SEEK_SET)
            while done < s.nbytes:  # sendfile: no user-space buffer, the path shutil.copyfile takes
                n = os.sendfile(fd, self._fd(s), s.start + done, s.nbytes - done)
                if n == 0:
                    _changed(s)
                done += n
        except OSError:  # a system whose sendfile only writes to sockets: through a small buffer instead
            while done < s.nbytes:
                chunk = os.pread(self._fd(s), min(s.nbytes - done, 2**24), s.start + done)
                if not chunk:
                    _changed(s)
                pwrite(fd, chunk, pos + done)
                done += len(chunk)


def _changed(s: StoredTensor):
    raise BequestError(f"{s.file}: ended inside tensor {s.name}; the file changed while growing")


# ---------------------------------------------------------------- raw tensors out


def pwrite(fd: int, data, pos: int) -> None:
    """All of `data` at `pos` (os.pwrite may write less)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def encode_header(table: dict[str, tuple[str, tuple[int, ...], int, int]]) -> bytes:
    """A safetensors header from name -> (dtype, shape, begin, end) in the data section."""
    entries = {"__metadata__": {"format": "pt"}}
    for name, (dtype, shape, begin, end) in table.items():
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def create_file(path: Path, header: bytes, data_bytes: int, stack: contextlib.ExitStack) -> int:
    """A safetensors file of its full size holding only `header`, open for writing (closed by `stack`).

    Unwritten bytes read as zeros, so zero tensors need no writing; fallocate also reserves the
    blocks, where the filesystem can."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stack.callback(os.close, fd)
    size = len(header) + data_bytes
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)
    pwrite(fd, header, 0)
    return fd


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, weight_map: dict[str, str], n_params: int, nbytes: int) -> None:
    """model.safetensors.index.json, as Hugging Face writes it; write it last, so a folder with an
    index has every shard it names."""
    index = {"metadata": {"total_parameters": n_params, "total_size": nbytes},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
