"""Grow a PEFT module along its host's growth maps, so that on the grown host it computes what it
computed on the old one (METHODS.md sections 1 and 4).

Every axis of a module tensor lives in one of the host's unit spaces (hidden coordinates, heads, KV
heads, FFN units, pooler units) and, like the host's own weights in `bequest.grow.width`, either
READS it (LoRA A columns, a classifier's or a bottleneck's input weights: copies divide by their copy
count, fresh units read 0), WRITES it (LoRA B rows, prompt vectors, prefix keys and values, a
bottleneck's up-projection: copies copy; a fresh hidden coordinate gets what every writer puts there
in the growth construction - the mean of the old ones under LayerNorm, 0 under RMSNorm - and other
fresh units 0) or SCALES it (IA3 vectors: copies copy, fresh units 1).

New blocks (identity blocks, whose writers into the residual stream are zero) take a fresh module:
LoRA A random and B zero, IA3 ones, adapters with a zero up-projection, zero prefixes. Whatever they
hold, the block's zero writers keep it out of the output; the fresh values are the ones that can learn.
"""

from __future__ import annotations

import copy
import math

import torch

from bequest.anatomy import anatomy, family_of, task_of
from bequest.errors import BequestError
from bequest.grow.width import AXES, Space, axes
from bequest.port.modules import Module

READ, WRITE, SCALE = "read", "write", "scale"
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


def _module_path(name: str) -> tuple[str, str]:
    """(the host module a module tensor belongs to, what the tensor is there)."""
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".ia3_l", ".adapter.down.weight",
                   ".adapter.down.bias", ".adapter.up.weight", ".adapter.up.bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
    return name, "param"


def tensor_axes(key: str, shape: tuple, anat, divided: bool) -> tuple[int | None, list]:
    """(block index or None, per dimension: None or (space names, side)) of one module tensor.

    `divided`: the host's final norm divides copied coordinates by their count (a tied LM grown by
    copies, see `bequest.grow.width.expand`), so a classifier reading it must not divide again."""
    if key == "prompt_embeddings":
        return None, [None, (("hidden",), WRITE)]
    path, what = _module_path(_param(key))
    if what == "param":  # a head module saved whole (modules_to_save): it grows like the host's own
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
    out, inp = LINEAR[slot.role]
    table = {
        "lora_A.weight": [None, (inp, READ)],
        "lora_B.weight": [(out, WRITE), None],
        "lora_B.bias": [(out, WRITE)],
        # IA3 scales a module's outputs ([out, 1]) or, on feed-forward modules, its inputs ([1, in]).
        "ia3_l": [(out, SCALE), None] if shape[0] != 1 else [None, (inp, SCALE)],
        "adapter.down.weight": [None, (("hidden",), READ)],
        "adapter.down.bias": [None],
        "adapter.up.weight": [(("hidden",), WRITE), None],
        "adapter.up.bias": [(("hidden",), WRITE)],
    }
    return slot.layer, table[what]


def _fresh(key: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """A new block's tensor, initialised as a fresh module would be (see the module docstring)."""
    if key.endswith((".lora_A.weight", ".adapter.down.weight")):
        bound = 1 / math.sqrt(shape[1])  # nn.Linear's (and peft's LoRA A) default range
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    if key.endswith(".ia3_l"):
        return torch.ones(shape)
    return torch.zeros(shape)


def _block(fam, i: int) -> str:
    return "." + fam.layer_path.format(i=i) + "."


def _prefix(t: torch.Tensor, maps: dict, old_layers: int) -> torch.Tensor:
    """Prefix keys and values: [tokens, layers x (key, value) x KV heads x head_dim], each layer's
    following its KV-head map; a new block's are zero."""
    hd, n = maps["head_dim"], t.shape[0]
    kv_old = t.shape[1] // (old_layers * 2 * hd)
    t = t.view(n, old_layers, 2, kv_old, hd)
    out = torch.zeros(n, len(maps["layers"]), 2, len(maps["kv_heads"][0]), hd)
    for j, src in enumerate(maps["layers"]):
        for h, u in enumerate(maps["kv_heads"][j] if src is not None else []):
            if u is not None:
                out[:, j, :, h] = t[:, src, :, u]
    return out.reshape(n, -1)


def follow(module: Module, want: dict[str, tuple], host_config, task: str, maps: dict, seed: int = 0):
    """(tensors for the grown host: every key of `want`, counts {matched, grown, fresh})."""
    anat = anatomy(host_config, task)
    fam = anat.family
    divided = anat.tied and task_of(host_config) in ("causal_lm", "masked_lm")
    inverse_scale = bool(getattr(host_config, "scale_attn_by_inverse_layer_idx", False))
    gen = torch.Generator().manual_seed(seed)
    out, counts = {}, {"matched": 0, "grown": 0, "fresh": 0}
    for key, shape in want.items():
        if module.kind == "prefix" and key == "prompt_embeddings":
            old_layers = max(s for s in maps["layers"] if s is not None) + 1
            out[key] = _prefix(module.tensors[key], maps, old_layers)
            counts["grown"] += 1
            continue
        layer, ax = tensor_axes(key, shape, anat, divided)
        src = None if layer is None else maps["layers"][layer]
        if layer is not None and src is None:
            out[key] = _fresh(key, shape, gen)
            counts["fresh"] += 1
            continue
        source = key if layer is None else key.replace(_block(fam, layer), _block(fam, src), 1)
        t = module.tensors[source].float()
        sp = spaces(maps, fam.norm, layer or 0)
        # Readers first, as the host's own weights grow: a writer's mean then covers the new columns.
        order = sorted(range(len(ax)), key=lambda d: ax[d] is None or ax[d][1] == WRITE)
        for dim in order:
            if ax[dim] is not None:
                t = along(t, dim, [sp[name] for name in ax[dim][0]], ax[dim][1])
        # GPT-2 may divide attention scores by the layer number: a moved block rescales its queries.
        path, what = _module_path(_param(key))
        if inverse_scale and layer != src and what.startswith("lora_B") and path.endswith(fam.layer.get("attn.qkv", "-")):
            t[: len(sp["heads"].entries())] *= (layer + 1) / (src + 1)
        changed = source != key or tuple(t.shape) != tuple(module.tensors[source].shape) or not torch.equal(t, module.tensors[source])
        counts["grown" if changed else "matched"] += 1
        out[key] = t.to(module.tensors[source].dtype)
    return out, counts
