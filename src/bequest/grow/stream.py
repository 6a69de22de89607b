"""Streaming growth: grow a safetensors checkpoint tensor by tensor, never holding the whole model.

`plan` reads only config.json and the safetensors headers. It builds the target config, the index
maps (the width operator's own, so they equal the in-memory path's) and, for every output tensor, the
source tensor it comes from and its place (shard, offset) in the output. `write` then writes each
shard's header first and visits the source tensors in the order the in-memory path expands them, so
random fills draw the same numbers; each output is computed from one source tensor (AKI: two) and
written straight to its place. Memory is a few times the largest tensor, never a shard or the model.
Depth growth at unchanged width needs no arithmetic at all: outputs are source bytes copied by the
kernel (sendfile), or zeros, which a pre-sized shard already holds.

Tensors keep their source dtype. Arithmetic runs in fp32 as in memory and is rounded once on write:
an fp32 checkpoint gives the in-memory path's tensors bit for bit; a bf16 or fp16 one gives them
rounded to that dtype (tensors that are only copied stay bit-exact).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch

from bequest.anatomy import Anatomy, anatomy, build_model
from bequest.errors import BequestError
from bequest.grow import add_noise, growth_maps, new_blocks, targets
from bequest.grow import depth as _depth
from bequest.grow import width as _width
from bequest.grow.depth import DEPTH, WRITERS, moved
from bequest.grow.state import from_roles, grown_config, join_key, split_key, to_roles
from bequest.grow.width import WIDTH, axes, eps_factor, expand, expand_options, later_mask
from bequest.io import check_checkpoint, load_config, read_header, weight_files

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MARGIN = 64 * 2**20  # bytes kept free beyond the shards: headers, config, tokenizer, card
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)


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


# ---------------------------------------------------------------- the plan


@dataclass
class Source:
    """One tensor of the source checkpoint and where its bytes lie."""

    file: Path
    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in `file`
    nbytes: int


@dataclass
class Output:
    """One tensor of the grown checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    keys: list[str]  # the grown role keys it is made of (q, k, v for GPT-2's fused c_attn)
    how: str  # "copy" (source bytes as they are), "zeros", or "compute"
    shard: int = 0
    offset: int = 0  # within its shard's data section

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class Unit:
    """One source tensor, its role keys, and the outputs made from it."""

    source: Source
    keys: list[str]
    outputs: list[Output] = field(default_factory=list)


@dataclass
class Plan:
    src: Path
    anat: Anatomy  # the source's
    new_anat: Anatomy  # the grown model's (its config is the one to save)
    stack: list[tuple[int, bool]]  # per new block: (source layer, fresh)
    spaces: dict
    notes: dict
    maps: dict
    units: list[Unit]  # in the order the in-memory path expands them
    shards: list[list[Output]]  # each in its data order
    noise: float
    seed: int
    options: dict  # what `expand` needs besides the tensor
    noisy: set[int]  # new blocks that take noise
    inverse_scale: bool  # GPT-2's scale_attn_by_inverse_layer_idx: moved queries are rescaled

    @property
    def source_bytes(self) -> int:
        return sum(u.source.nbytes for u in self.units)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for shard in self.shards for o in shard)

    @property
    def files(self) -> list[str]:
        n = len(self.shards)
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def unit(self, key: str) -> Unit:
        return next(u for u in self.units if key in u.keys)


def _slot(anat: Anatomy, name: str):
    try:
        return anat.slots([name])[name]
    except BequestError:  # a buffer (check_checkpoint refused anything else without a role)
        return None


def _sources(path: Path, anat: Anatomy) -> dict[str, Source]:
    """Every source tensor with a role, by slot ('layer.3.attn.qkv.weight'), from the headers."""
    found = {}
    for file in weight_files(path):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        header = read_header(file)
        for name, slot in ((k, _slot(anat, k)) for k in header):
            if slot is None:
                continue
            info = header[name]
            if info["dtype"] not in DTYPES:
                raise BequestError(f"{file}: {name} is stored as {info['dtype']}, which bequest cannot grow; "
                                   "convert the checkpoint to bf16, fp16 or fp32")
            begin, end = info["data_offsets"]
            found[str(slot)] = Source(file, name, info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)
    return found


def _skeleton(config, task: str):
    """A model without memory: its parameters' names, order and shapes."""
    with torch.device("meta"):
        return build_model(config, task)


def _identity(spaces: dict) -> bool:
    return all(sp.units == list(range(len(sp.units))) for sp in spaces.values())


def plan(
    src: str | Path,
    *,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    ffn: int | None = None,
    layers: int | None = None,
    width: str = "exact",
    depth: str = "identity",
    placement: str = "even",
    noise: float = 0.0,
    seed: int = 0,
    shard_size: int = 2 * 10**9,
) -> Plan:
    """Everything `write` needs, from config.json and the tensor headers; no weight is read."""
    _width.check(width)
    _depth.check(depth)
    src = Path(src)
    config = load_config(src)
    anat = anatomy(config)
    target = targets(anat, hidden, heads, kv_heads, ffn, layers)
    stack = DEPTH[depth](anat.layers, target["layers"], placement)
    check_checkpoint(src, config, anat.task)
    found = _sources(src, anat)

    # An operator given no tensors returns just its maps: the same code picks the same units.
    _, spaces, notes = WIDTH[width]({}, anat, target, torch.Generator())
    shape = {**target, "head_dim": anat.head_dim}
    new_config = grown_config(anat, shape, eps_factor(spaces), [s for s, _ in stack])

    # Source order = the in-memory path's parameter order, in which width operators draw randoms.
    old_params = dict(_skeleton(config, anat.task).named_parameters())
    units = {}
    for name, slot in anat.slots(old_params).items():
        if str(slot) not in found:
            raise BequestError(f"{src}: no tensor for {name}; the checkpoint is incomplete, re-save or re-download it")
        units[str(slot)] = Unit(found[str(slot)], _role_keys(slot.layer, slot.role, slot.kind))

    new_model = _skeleton(new_config, anat.task)
    new_params = dict(new_model.named_parameters())
    new_anat = anatomy(new_model, anat.task)
    plain = _identity(spaces)
    noisy = new_blocks(stack) if noise else set()
    scale = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
    outputs = []
    for name, slot in new_anat.slots(new_params).items():
        j, role = slot.layer, slot.role
        src_layer, fresh = (None, False) if j is None else stack[j]
        unit = units[join_key(src_layer, role, slot.kind)]
        if not plain or j in noisy or (scale and role in ("attn.q", "attn.qkv") and j != src_layer):
            how = "compute"
        elif fresh and role in WRITERS:
            how = "zeros"
        else:
            how = "copy"
        out = Output(name, tuple(new_params[name].shape), unit.source.dtype, _role_keys(j, role, slot.kind), how)
        if how == "copy" and out.shape != unit.source.shape:  # a bug in this module, never a user error
            raise BequestError(f"internal: {name} would copy {unit.source.name} of another shape; please report this")
        unit.outputs.append(out)
        outputs.append(out)

    keys = [k for u in units.values() for k in u.keys]
    maps = growth_maps(width, depth, anat, spaces, stack, notes, _width.is_pooled(keys))
    return Plan(src, anat, new_anat, stack, spaces, notes, maps, list(units.values()),
                _layout(outputs, shard_size), noise, seed, expand_options(anat, keys), noisy, scale)


def _role_keys(layer: int | None, role: str, kind: str) -> list[str]:
    roles = ("attn.q", "attn.k", "attn.v") if role == "attn.qkv" else (role,)
    return [join_key(layer, r, kind) for r in roles]


def _layout(outputs: list[Output], shard_size: int) -> list[list[Output]]:
    """Outputs in model order cut into shards of at most `shard_size` bytes (a bigger tensor gets a
    shard of its own); inside a shard the widest dtype goes first so every tensor stays aligned."""
    shards, size = [[]], 0
    for out in outputs:
        if shards[-1] and size + out.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    for i, shard in enumerate(shards):
        shard.sort(key=lambda o: -DTYPES[o.dtype].itemsize)
        offset = 0
        for out in shard:
            out.shard, out.offset = i, offset
            offset += out.nbytes
    return shards


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


# ---------------------------------------------------------------- the writing


class _Reader:
    """Source files opened once. Tensors are read into memory of their own rather than through an
    mmap: pages of a long-lived mapping count as resident until it closes, so reading a whole
    model through mmaps would look (and be accounted) as big as the model."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.fds = stack, {}

    def _fd(self, s: Source) -> int:
        if s.file not in self.fds:
            self.fds[s.file] = os.open(s.file, os.O_RDONLY)
            self.stack.callback(os.close, self.fds[s.file])
        return self.fds[s.file]

    def tensor(self, s: Source) -> torch.Tensor:
        buf = torch.empty(s.nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < s.nbytes:
            n = os.preadv(self._fd(s), [view[done:]], s.start + done)
            if n == 0:
                raise BequestError(f"{s.file}: ended inside tensor {s.name}; the file changed while growing")
            done += n
        return buf.view(DTYPES[s.dtype]).reshape(s.shape)  # safetensors is little-endian, as torch on x86/ARM

    def prefetch(self, s: Source) -> None:
        """Ask the kernel to start reading `s` now, so the disk works while the tensor before it is copied."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(s), s.start, s.nbytes, os.POSIX_FADV_WILLNEED)

    def copy(self, s: Source, fd: int, pos: int) -> None:
        done = 0
        try:
            os.lseek(fd, pos, os.SEEK_SET)
            while done < s.nbytes:  # sendfile: no user-space buffer, the path shutil.copyfile takes
                n = os.sendfile(fd, self._fd(s), s.start + done, s.nbytes - done)
                if n == 0:
                    raise BequestError(f"{s.file}: ended inside tensor {s.name}; the file changed while growing")
                done += n
        except OSError:  # a system whose sendfile only writes to sockets: through a small buffer instead
            while done < s.nbytes:
                chunk = os.pread(self._fd(s), min(s.nbytes - done, 2**24), s.start + done)
                if not chunk:
                    raise BequestError(f"{s.file}: ended inside tensor {s.name}; the file changed while growing")
                _pwrite(fd, chunk, pos + done)
                done += len(chunk)


def _pwrite(fd: int, data, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _widen(p: Plan, unit: Unit, read, gen) -> tuple[dict, dict]:
    """The unit's role tensors after the width operator (fp32), and their shapes before it."""
    old = to_roles({unit.source.name: read(unit.source)}, p.anat)
    state = {k: expand(k, t, p.spaces, gen, **p.options) for k, t in old.items()}
    donors = p.notes.get("new_units_from_layer")
    layer = split_key(unit.keys[0])[0]
    if donors and layer is not None and donors[layer] != layer:
        # AKI: new units come from the layer above, as widened by FPI (which draws no randoms).
        _, role, kind = split_key(next(iter(old)))
        donor = p.unit(join_key(donors[layer], role, kind))
        above = to_roles({donor.source.name: read(donor.source)}, p.anat)
        for (k, t), (dk, a) in zip(list(state.items()), above.items()):
            mask = later_mask(t.shape, axes(k, p.options["pooled"]), p.spaces)
            state[k] = torch.where(mask, expand(dk, a, p.spaces, torch.Generator(), **p.options), t)
    return state, {k: t.shape for k, t in old.items()}


def _finish(p: Plan, out: Output, state: dict, old_shapes: dict) -> torch.Tensor:
    """`out` from its source's widened role tensors: moved to its block, noised, re-fused, cast."""
    grown = {}
    for key in out.keys:
        j, role, kind = split_key(key)
        src_key = key if j is None else join_key(p.stack[j][0], role, kind)
        t = state[src_key] if j is None else moved(state[src_key], role, j, *p.stack[j], p.inverse_scale)
        if p.noise and (j in p.noisy or t.shape != old_shapes[src_key]):
            t = add_noise(key, t, p.noise, p.seed)
        grown[key] = t
    t = from_roles(grown, p.new_anat, [out.name])[out.name]
    if tuple(t.shape) != out.shape:
        raise BequestError(f"internal: grown {out.name} is {tuple(t.shape)}, planned {out.shape}; please report this")
    return t.to(DTYPES[out.dtype]).contiguous()


@contextlib.contextmanager
def _progress(total: int, show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = (TextColumn("growing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (show and console.is_terminal)) as bar:
        task = bar.add_task("grow", total=total)
        yield lambda n: bar.advance(task, n)


def _header(shard: list[Output]) -> bytes:
    table = {"__metadata__": {"format": "pt"}}
    for o in shard:
        table[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [o.offset, o.offset + o.nbytes]}
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write(p: Plan, folder: Path, progress: bool = True) -> None:
    """The grown weights (shards, then the index) and config into `folder`, normally an atomic_dir."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        fds, bases = [], []
        for name, shard in zip(p.files, p.shards):
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, fd)
            header = _header(shard)
            # Full size at once: unwritten bytes read as zeros, so zero tensors need no writing;
            # fallocate also reserves the blocks, where the filesystem can.
            size = len(header) + sum(o.nbytes for o in shard)
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, size)
            _pwrite(fd, header, 0)
            fds.append(fd)
            bases.append(len(header))
        reader = _Reader(stack)
        gen = torch.Generator().manual_seed(p.seed)
        plain = _identity(p.spaces)
        with _progress(p.nbytes, progress) as advance:
            for i, unit in enumerate(p.units):
                if i + 1 < len(p.units):
                    reader.prefetch(p.units[i + 1].source)
                # Every unit is widened in order when width changes, used or not: that keeps the
                # random draws in step with the in-memory path. At unchanged width nothing is drawn.
                widened = None if plain else _widen(p, unit, reader.tensor, gen)
                for out in unit.outputs:
                    fd, pos = fds[out.shard], bases[out.shard] + out.offset
                    if out.how == "copy":
                        reader.copy(unit.source, fd, pos)
                    elif out.how == "compute":  # ("zeros" need nothing: the shard was sized with zeros)
                        widened = widened or _widen(p, unit, reader.tensor, gen)
                        _pwrite(fd, _finish(p, out, *widened).view(-1).view(torch.uint8).numpy(), pos)
                    advance(out.nbytes)
    if len(p.shards) > 1:  # last: a folder with an index has every shard it names
        weight_map = {o.name: p.files[o.shard] for shard in p.shards for o in shard}
        n_params = sum(prod(o.shape) for shard in p.shards for o in shard)
        index = {"metadata": {"total_parameters": n_params, "total_size": p.nbytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_config(p, folder)


def _write_config(p: Plan, folder: Path) -> None:
    config = p.new_anat.config
    by_dtype = {}
    for shard in p.shards:
        for o in shard:
            by_dtype[o.dtype] = by_dtype.get(o.dtype, 0) + o.nbytes
    config.dtype = DTYPES[max(by_dtype, key=by_dtype.get)]  # what from_pretrained(dtype="auto") loads
    config.save_pretrained(folder)
    generation = p.src / "generation_config.json"
    if generation.exists():  # sampling defaults belong to the checkpoint, not its size
        shutil.copy2(generation, folder / generation.name)


def copy_tokenizer(src: str | Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, folder / name)
