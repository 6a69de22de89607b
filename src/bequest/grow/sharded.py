"""Sharded growth: grow a safetensors checkpoint tensor by tensor, never holding the whole model.

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

Neither the plan nor the copying needs torch or transformers (the anatomy knows every parameter from
the config; the grown config.json is the source's with new sizes): torch is imported only when a
tensor has to be computed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from bequest.anatomy import Anatomy, anatomy
from bequest.errors import BequestError
from bequest.grow.depth import DEPTH, WRITERS, moved, new_blocks
from bequest.grow.maps import growth_maps
from bequest.grow.noise import add_noise, expanded, finite
from bequest.grow.spec import GrowSpec, target_shape
from bequest.grow.state import QKV, from_roles, grown_config, join_key, split_key, to_roles
from bequest.grow.width import WIDTH, WidthOperator, eps_factor, expand_options, is_pooled
from bequest.io import (
    DTYPES, StoredTensor, TensorReader, check_checkpoint, create_file, encode_header, pwrite, read_config, shard_names,
    stored_tensors, torch_dtype, weight_files, write_index,
)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)


# ---------------------------------------------------------------- the plan


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
        return prod(self.shape) * DTYPES[self.dtype].size


@dataclass
class Unit:
    """One source tensor, its role keys, and the outputs made from it."""

    source: StoredTensor
    keys: list[str]
    outputs: list[Output] = field(default_factory=list)


@dataclass
class Plan:
    src: Path
    spec: GrowSpec
    anat: Anatomy  # the source's
    new_anat: Anatomy  # the grown model's (its config is the one to save)
    stack: list[tuple[int, bool]]  # per new block: (source layer, fresh)
    width: WidthOperator
    spaces: dict
    notes: dict
    maps: dict
    units: list[Unit]  # in the order the in-memory path expands them
    shards: list[list[Output]]  # each in its data order
    options: dict  # what `expand` needs besides the tensor
    noisy: set[int]  # new blocks that take noise

    @property
    def source_bytes(self) -> int:
        return sum(u.source.nbytes for u in self.units)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for shard in self.shards for o in shard)

    @property
    def files(self) -> list[str]:
        return shard_names(len(self.shards))

    def unit(self, key: str) -> Unit:
        return next(u for u in self.units if key in u.keys)


def _slot(anat: Anatomy, name: str):
    try:
        return anat.slots([name])[name]
    except BequestError:  # a buffer (check_checkpoint refused anything else without a role)
        return None


def _sources(path: Path, anat: Anatomy) -> dict[str, StoredTensor]:
    """Every source tensor with a role, by slot ('layer.3.attn.qkv.weight'), from the headers."""
    found = {}
    for file in weight_files(path):
        for name, stored in stored_tensors(file).items():
            slot = _slot(anat, name)
            if slot is None:
                continue
            if stored.dtype not in DTYPES:
                raise BequestError(f"{file}: {name} is stored as {stored.dtype}, which bequest cannot grow; "
                                   "convert the checkpoint to bf16, fp16 or fp32")
            found[str(slot)] = stored
    return found


def _identity(spaces: dict) -> bool:
    return all(sp.units == list(range(len(sp.units))) for sp in spaces.values())


def plan(src: str | Path, spec: GrowSpec, shard_size: int = 2 * 10**9) -> Plan:
    """Everything `write` needs to grow the checkpoint in `src` as `spec` asks, from config.json and
    the tensor headers; no weight is read. Outputs are cut into shards of at most `shard_size` bytes."""
    src = Path(src)
    config = read_config(src)
    anat = anatomy(config)
    target = target_shape(anat, spec)
    stack = DEPTH[spec.depth](anat.layers, target["layers"], spec.placement)
    check_checkpoint(src, config, anat.task)
    found = _sources(src, anat)

    op = WIDTH[spec.width]
    spaces, notes = op.spaces(anat, target)
    shape = {**target, "head_dim": anat.head_dim}
    new_config = grown_config(anat, shape, eps_factor(spaces), [s for s, _ in stack])

    # Source order = the in-memory path's parameter order, in which width operators draw randoms.
    old_params = anat.parameters()
    units = {}
    for name, slot in anat.slots(old_params).items():
        if str(slot) not in found:
            raise BequestError(f"{src}: no tensor for {name}; the checkpoint is incomplete, re-save or re-download it")
        units[str(slot)] = Unit(found[str(slot)], _role_keys(slot.layer, slot.role, slot.kind))

    new_anat = anatomy(new_config, anat.task)
    new_params = new_anat.parameters()
    plain = _identity(spaces)
    noisy = new_blocks(stack) if spec.noise else set()
    scale = anat.inverse_layer_scale
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
        out = Output(name, new_params[name], unit.source.dtype, _role_keys(j, role, slot.kind), how)
        if how == "copy" and out.shape != unit.source.shape:  # a bug in this module, never a user error
            raise BequestError(f"internal: {name} would copy {unit.source.name} of another shape; please report this")
        unit.outputs.append(out)
        outputs.append(out)

    keys = [k for u in units.values() for k in u.keys]
    maps = growth_maps(spec.width, spec.depth, anat, spaces, stack, notes, is_pooled(keys))
    return Plan(src, spec, anat, new_anat, stack, op, spaces, notes, maps, list(units.values()),
                _layout(outputs, shard_size), expand_options(anat, keys), noisy)


def _role_keys(layer: int | None, role: str, kind: str) -> list[str]:
    roles = QKV if role == "attn.qkv" else (role,)
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
        shard.sort(key=lambda o: -DTYPES[o.dtype].size)
        offset = 0
        for out in shard:
            out.shard, out.offset = i, offset
            offset += out.nbytes
    return shards


# ---------------------------------------------------------------- the writing


def _widen(p: Plan, unit: Unit, read, gen) -> tuple[dict, dict]:
    """The unit's role tensors after the width operator (fp32), and their shapes before it."""
    old = to_roles({unit.source.name: read(unit.source)}, p.anat)
    donors = {}
    for key in old:
        donor = p.width.donor(key, p.notes)
        if donor is not None and donor not in donors:  # AKI: new units from another layer's source tensor
            above = p.unit(donor).source
            donors.update(to_roles({above.name: read(above)}, p.anat))
    state = {k: p.width.expand(k, t, p.spaces, gen, p.options, donors.get(p.width.donor(k, p.notes)))
             for k, t in old.items()}
    return state, {k: t.shape for k, t in old.items()}


def _finish(p: Plan, out: Output, state: dict, old_shapes: dict):
    """The bytes of `out` from its source's widened role tensors: moved to its block, noised, re-fused, cast."""
    grown = {}
    for key in out.keys:
        j, role, kind = split_key(key)
        src_key = key if j is None else join_key(p.stack[j][0], role, kind)
        t = state[src_key] if j is None else moved(state[src_key], role, j, *p.stack[j], p.anat.inverse_layer_scale)
        if p.spec.noise and expanded(j, t.shape, old_shapes[src_key], p.noisy):
            t = add_noise(key, t, p.spec.noise, p.spec.seed)
        grown[key] = t
    t = from_roles(grown, p.new_anat, [out.name])[out.name]
    if tuple(t.shape) != out.shape:
        raise BequestError(f"internal: grown {out.name} is {tuple(t.shape)}, planned {out.shape}; please report this")
    cause = f"--noise {p.spec.noise:g} in {out.dtype}" if p.spec.noise else f"casting to {out.dtype}"
    t = finite(out.name, t.to(torch_dtype(out.dtype)), cause).contiguous()  # fp16's range is small
    return t.view(-1).view(torch_dtype("U8")).numpy()


@contextlib.contextmanager
def _progress(total: int, show: bool):
    if not (show and sys.stderr.isatty()):  # nobody to see a bar: rich is not even imported
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("growing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("grow", total=total)
        yield lambda n: bar.advance(task, n)


def write(p: Plan, folder: Path, progress: bool = True, on_read=None) -> None:
    """The grown weights (shards, then the index) and config into `folder`, normally an atomic_dir.
    `on_read(source, copy=None)`, when given, hears of each source tensor once it is read, with each
    tensor written as a copy of its bytes."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        fds, bases = [], []
        for name, shard in zip(p.files, p.shards):
            header = encode_header({o.name: (o.dtype, o.shape, o.offset, o.offset + o.nbytes) for o in shard})
            fds.append(create_file(folder / name, header, sum(o.nbytes for o in shard), stack))
            bases.append(len(header))
        reader = TensorReader(stack)
        plain = _identity(p.spaces)
        gen = None if plain else _generator(p.spec.seed)
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
                        if on_read is not None:
                            on_read(unit.source, StoredTensor(folder / p.files[out.shard], out.name, out.dtype,
                                                              out.shape, pos, out.nbytes))
                    elif out.how == "compute":  # ("zeros" need nothing: the shard was sized with zeros)
                        widened = widened or _widen(p, unit, reader.tensor, gen)
                        pwrite(fd, _finish(p, out, *widened), pos)
                    advance(out.nbytes)
                if on_read is not None and widened is not None:
                    on_read(unit.source)
    if len(p.shards) > 1:
        weight_map = {o.name: p.files[o.shard] for shard in p.shards for o in shard}
        write_index(folder, weight_map, sum(prod(o.shape) for shard in p.shards for o in shard), p.nbytes)
    _write_config(p, folder)


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _write_config(p: Plan, folder: Path) -> None:
    """The source's config.json with the grown sizes, written as transformers writes it."""
    by_dtype = {}
    for shard in p.shards:
        for o in shard:
            by_dtype[o.dtype] = by_dtype.get(o.dtype, 0) + o.nbytes
    settings = p.new_anat.config.to_dict()
    settings.pop("torch_dtype", None)  # dtype's old name
    settings["dtype"] = DTYPES[max(by_dtype, key=by_dtype.get)].name  # what from_pretrained(dtype="auto") loads
    (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = p.src / "generation_config.json"
    if generation.exists():  # sampling defaults belong to the checkpoint, not its size
        shutil.copy2(generation, folder / generation.name)


def copy_tokenizer(src: str | Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, folder / name)
