"""Grow a PEFT module along its host's growth maps, so that on the grown host it computes what it
computed on the old one (docs/methods.md, sections 1 and 4).

Every axis of a module tensor lives in one of the host's unit spaces (hidden coordinates, heads, KV
heads, FFN units, pooler units) and, like the host's own weights in `bequest.grow.width`, either
READS it (copies divide by their copy count, fresh units read 0), WRITES it (copies copy; a fresh
hidden coordinate gets what every writer puts there in the growth construction - the mean of the old
ones under LayerNorm, 0 under RMSNorm - and other fresh units 0) or SCALES it (copies copy, fresh
units 1). Each PEFT kind (`bequest.peft`) says which for its tensors; head modules saved whole grow
like the host's own heads.

New blocks (identity blocks, whose writers into the residual stream are zero) take what a fresh
module holds there, as each kind says. Whatever they hold, the block's zero writers keep it out of
the output; the fresh values are the ones that can learn.
"""

from __future__ import annotations

import copy
import re

import torch

from bequest.anatomy import anatomy, family_of, task_of
from bequest.errors import BequestError
from bequest.grow.width import AXES, Space, axes
from bequest.peft import KINDS, Module
from bequest.peft.kind import READ, SCALE, WRITE, Kind

TAKE = "read, already divided"  # copies taken as they are: what they read was divided upstream
# A linear role -> (spaces its output writes, spaces its input reads); GPT-2's fused qkv writes three.
LINEAR = {role: ((ax[0][0],), (ax[1][0],)) for role, ax in AXES.items() if role.startswith(("attn.", "mlp."))}
LINEAR["attn.qkv"] = (("heads", "kv_heads", "kv_heads"), ("hidden",))
PREFIXES = ("base_model.model.", "base_model.")


def source_config(config, maps: dict):
    """The config of the host a grown host was grown from: its shape read off the maps."""
    fam = family_of(config)
    old = copy.deepcopy(config)

    def size(units):  # every old unit keeps a place in the new space, so the largest index tells
        return max(u for u in units if u is not None) + 1

    shape = {"hidden": size(maps["hidden"]), "heads": size(maps["heads"][0]), "kv_heads": size(maps["kv_heads"][0]),
             "ffn": size(maps["ffn"][0]), "layers": size(maps["layers"])}
    for key, value in shape.items():
        if key in fam.config_keys and key != "head_dim":
            setattr(old, fam.config_keys[key], value)
    return old


def spaces(maps: dict, norm: str, layer: int) -> dict[str, Space]:
    hd = maps["head_dim"]
    # What the host's writers put into fresh hidden coordinates, as recorded (growth.json files older
    # than maps["fill"] are re-derived from the norm); other fresh units a module writes get 0.
    fill = maps["fill"]["hidden"]["write"] if "fill" in maps else "mean" if norm == "layernorm" else "zero"
    out = {
        "hidden": Space(maps["hidden"], write="mean" if fill == "mean" else "zero"),
        "heads": Space(maps["heads"][layer], hd, write="zero"),
        "kv_heads": Space(maps["kv_heads"][layer], hd, write="zero"),
        "ffn": Space(maps["ffn"][layer], write="zero"),
    }
    # A host grown without a pooler (an MLM checkpoint) gets a fresh one when it classifies: its old
    # units first, as `exact` would have placed them.
    old = max(u for u in maps["hidden"] if u is not None) + 1
    pool = maps.get("pool", list(range(old)) + [None] * (len(maps["hidden"]) - old))
    out["pool"] = Space(pool, write="zero")
    return out


def _old_size(sp: Space) -> int:
    return (max(u for u in sp.units if u is not None) + 1) * sp.size


def along(t: torch.Tensor, dim: int, parts: list[Space], side: str) -> torch.Tensor:
    """`t` with axis `dim` re-indexed from the old spaces `parts` (concatenated) to the new ones."""
    src, counts, offset = [], [], 0
    for sp in parts:
        src += [None if s is None else s + offset for s in sp.entries()]
        counts.append(sp.counts())
        offset += _old_size(sp)
    if t.shape[dim] != offset:
        raise BequestError(f"internal: axis of {t.shape[dim]} entries, the maps describe {offset}; please report this")
    t = t.index_select(dim, torch.tensor([s or 0 for s in src]))
    view = [1] * t.ndim
    view[dim] = -1
    if side == READ:
        t = t / torch.cat(counts).view(view)
    fresh = torch.tensor([s is None for s in src]).view(view)
    if not fresh.any():
        return t
    if side == SCALE:
        fill = torch.ones(())
    elif side == WRITE and all(sp.write == "mean" for sp in parts):
        old = torch.tensor([j for j, s in enumerate(src) if s is not None])
        fill = t.index_select(dim, old).mean(dim, keepdim=True)
    else:
        fill = torch.zeros(())
    return torch.where(fresh, fill, t)


def _param(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _module_path(kind: Kind, name: str) -> tuple[str, str | None]:
    """(the host module a module tensor belongs to, what the tensor is there; None: none of the kind's)."""
    for what in kind.tensors:
        if name.endswith("." + what):
            return name[: -len(what) - 1], what
    return name, None


def tensor_axes(kind: Kind, key: str, shape: tuple, anat, divided: bool) -> tuple[int | None, list]:
    """(block index or None, per dimension: None or (space names, side)) of one module tensor.

    `divided`: the host's final norm divides copied coordinates by their count (a tied LM grown by
    copies, see `bequest.grow.width.expand`), so a classifier reading it must not divide again."""
    free = kind.free_axes(key)
    if free is not None:
        return None, free
    path, what = _module_path(kind, _param(key))
    if what is None:  # a head module saved whole (modules_to_save): it grows like the host's own
        try:
            slot = anat.slots([path])[path]
        except BequestError:
            raise BequestError(f"{key}: bequest cannot grow this tensor; port the module to a host of its own shape") from None
        pooled = any(r in ("pooler", "classifier.dense") for r in {**anat.family.final, **anat.family.heads})
        ax = axes(str(slot), pooled)
        read = TAKE if divided and ax[-1] == ("hidden", "read") else READ
        return slot.layer, [None if a is None else ((a[0],), read if a[1] == "read" else WRITE) for a in ax]
    slot = anat.slots([path + ".weight"])[path + ".weight"]
    if slot.role not in LINEAR:
        raise BequestError(f"{key}: a module on {slot.role} cannot follow growth maps; port it to a host of its own shape")
    return slot.layer, kind.axes(what, shape, *LINEAR[slot.role])


def _block(fam, i: int) -> str:
    return "." + fam.layer_path.format(i=i) + "."


def follow_config(module: Module, old_keys, new_keys, maps: dict, fam) -> dict:
    """The module's config for the grown host. A config that puts the module on every block the same
    way, old host and grown host alike (bequest's own regex, a suffix list), stays: new blocks get
    fresh modules. Any other (per-layer names, as peft saves even `all-linear`; a layer regex;
    layers_to_transform) names the modules explicitly on the grown host, on the copies of the blocks
    the module was on: index 1 may be an identity block after growth.

    `old_keys`, `new_keys`: the tensor names the config gives on the host it was grown from and on
    the grown host."""
    kind, config = KINDS[module.kind], module.config
    if not kind.tensors or "target_modules" not in config:
        return config  # prefix, prompt, bottleneck: every block, by construction
    block = re.compile(r"(^|\.)" + re.escape(fam.layer_path).replace(r"\{i\}", r"(\d+)") + r"\.")
    def modules(keys) -> set[str]:
        return {_module_path(kind, _param(k))[0] for k in keys if _module_path(kind, _param(k))[1]}

    def per_block(paths, layers: int) -> list[set]:
        out = [set() for _ in range(layers)]
        for path in paths:
            m = block.search(path)
            if m:
                out[int(m[2])].add(path[m.end():])
        return out

    paths = modules(old_keys)
    old = per_block(paths, max(s for s in maps["layers"] if s is not None) + 1)
    new = per_block(modules(new_keys), len(maps["layers"]))
    if all(b == old[0] for b in old + new) and config.get("layers_to_transform") is None:
        return config

    def placed(path_set):
        out = set()
        for path in path_set:
            m = block.search(path)
            if m is None:  # outside the blocks: stays where it is
                out.add(path)
                continue
            i = int(m[2])
            out.update(path[: m.start(2)] + str(j) + path[m.end(2):] for j, s in enumerate(maps["layers"]) if s == i)
        return sorted(out)

    out = {**config, "target_modules": placed(paths), "layers_to_transform": None, "layers_pattern": None}
    if config.get("feedforward_modules") is not None:  # IA3: the modules whose inputs it scales
        ff = {_module_path(kind, _param(k))[0] for k, t in module.tensors.items()
              if _module_path(kind, _param(k))[1] and t.ndim == 2 and t.shape[0] == 1}
        out["feedforward_modules"] = placed(ff)
    return out


def follow(module: Module, want: dict[str, tuple], host_config, task: str, maps: dict, seed: int = 0):
    """(tensors for the grown host: every key of `want`, counts {matched, grown, fresh}). Every tensor
    of the module must find a place: one left over is an error, never a silent drop."""
    anat = anatomy(host_config, task)
    fam, kind = anat.family, KINDS[module.kind]
    divided = anat.tied and task_of(host_config) in ("causal_lm", "masked_lm")
    gen = torch.Generator().manual_seed(seed)
    out, counts, used = {}, {"matched": 0, "grown": 0, "fresh": 0}, set()
    for key, shape in want.items():
        grown = kind.grow(key, module.tensors.get(key), maps)
        if grown is not None:
            out[key] = grown
            counts["grown"] += 1
            used.add(key)
            continue
        layer, ax = tensor_axes(kind, key, shape, anat, divided)
        src = None if layer is None else maps["layers"][layer]
        if layer is not None and src is None:
            out[key] = kind.fresh(_module_path(kind, _param(key))[1], shape, gen)
            counts["fresh"] += 1
            continue
        source = key if layer is None else key.replace(_block(fam, layer), _block(fam, src), 1)
        used.add(source)
        t = module.tensors[source].float()
        sp = spaces(maps, fam.norm, layer or 0)
        # Readers first, as the host's own weights grow: a writer's mean then covers the new columns.
        order = sorted(range(len(ax)), key=lambda d: ax[d] is None or ax[d][1] == WRITE)
        for dim in order:
            if ax[dim] is not None:
                t = along(t, dim, [sp[name] for name in ax[dim][0]], ax[dim][1])
        # GPT-2 may divide attention scores by the layer number: a moved block rescales its queries.
        path, what = _module_path(kind, _param(key))
        if anat.inverse_layer_scale and layer != src and what in kind.query_rows and path.endswith(fam.layer.get("attn.qkv", "-")):
            t[: len(sp["heads"].entries())] *= (layer + 1) / (src + 1)
        changed = source != key or tuple(t.shape) != tuple(module.tensors[source].shape) or not torch.equal(t, module.tensors[source])
        counts["grown" if changed else "matched"] += 1
        out[key] = t.to(module.tensors[source].dtype)
    left = sorted(set(module.tensors) - used)
    if left:
        raise BequestError(f"{left[0]} (and {len(left) - 1} more) would have no place on the grown host; bequest "
                           "cannot port this module along the growth maps, port it to a host of its own shape")
    return out, counts
