"""A PEFT module carried onto an unrelated NEW model (docs/methods.md, section 8).

Every tensor of the module is placed by anatomy role: a tensor on block j's projection comes from the
same projection of the OLD block j takes after, each axis carried by the site it reads, writes or
scales (the kind's `axes`); a prefix's keys and values through that block's k and v maps; prompt
vectors through the embedding map; a saved head through the final (or pooled) map. When k NEW blocks
take after one OLD block, each gets 1/k of its additive effect (what writes is divided by k, a scaling
vector becomes its k-th root); prefixes, which add keys and values rather than a change, are repeated.
"""

from __future__ import annotations

import time

import torch

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.peft import KINDS, Module, expected, misfits
from bequest.transfer.alignment import SCALE, SITES, WRITE, Alignment, head_axes, report

PREFIXES = ("base_model.model.", "base_model.")
FREE = "prompt_embeddings"  # prompt learning's one tensor outside the host


def transfer_module(module: Module, alignment: Alignment, new_config) -> tuple[Module, dict]:
    """(the module for NEW, fitting it exactly, the report)."""
    start = time.perf_counter()
    kind = KINDS[module.kind]
    old_task, task = module.host_task(alignment.old), module.host_task(new_config)
    old, new = anatomy(alignment.old, old_task), anatomy(new_config, task)
    _same_layout(old.family, new.family)
    labels = module.num_labels(old.family)
    _, old_want = expected(module.config, alignment.old, old_task, labels)
    problems = misfits(module.tensors, old_want)
    if problems:
        raise BequestError(f"the {module.kind} module does not fit OLD: {problems[0]}; measure against the model it was trained on")
    sources = {_place(kind, key, old): key for key in module.tensors}
    config, want = expected(_placed(module, sources, old, new, alignment.layers), new_config, task, labels)
    carried = {place[1] for place in sources if place[0] == "head"}
    fits, tensors, used, fresh = {}, {}, set(), 0
    gen = torch.Generator().manual_seed(0)
    for key, shape in want.items():
        place = _place(kind, key, new)
        if place[0] == "block":
            _, j, role, what = place
            src = sources.get(("block", alignment.layers[j], role, what))
            if src is None:  # a projection OLD's module left alone
                tensors[key] = kind.fresh(what, shape, gen)
                fresh += 1
                continue
            tensors[key] = _block(kind, what, role, module.tensors[src].double(), j, alignment, fits)
        elif place[0] == "head":
            src = sources[place]
            tensors[key] = alignment.carry(module.tensors[src].double(), head_axes(new.family, *place[1:], carried), None, fits)
        elif kind.virtual_kv:
            src = FREE
            tensors[key] = _prefix(module.tensors[src].double(), old.layers, alignment, fits)
        else:
            src = FREE
            axes = [None if a is None else (("embed",), a[1]) for a in kind.free_axes(key)]  # token embeddings' space
            tensors[key] = alignment.carry(module.tensors[src].double(), axes, None, fits)
        used.add(src)
        tensors[key] = tensors[key].to(module.tensors[src].dtype).contiguous()

    left = misfits(tensors, want)
    if left:  # the maps produced something NEW does not take: a bug, never a user error
        raise BequestError(f"internal: transferred module misfits: {left[0]}; please report this")
    skipped = sorted(set(module.tensors) - used)
    counts = {"mapped": len(want) - fresh, "fresh": fresh, "skipped": len(skipped), "skipped_tensors": skipped}
    config = {**config, "base_model_name_or_path": getattr(new_config, "_name_or_path", None) or config.get("base_model_name_or_path")}
    return Module(module.kind, config, tensors, module.labels), {"type": module.kind, **report(alignment, fits, counts, time.perf_counter() - start)}


def _block(kind, what: str, role: str, t: torch.Tensor, j: int, alignment: Alignment, fits: dict) -> torch.Tensor:
    if role not in SITES:
        raise BequestError(f"a module on {role} cannot be transferred; bequest transfers modules on attention and MLP projections")
    writes, reads = SITES[role]
    axes = kind.axes(what, tuple(t.shape), writes, reads)
    t = alignment.carry(t, axes, j, fits)
    share = alignment.sharing(j)
    sides = {a[1] for a in axes if a is not None}
    if share > 1 and WRITE in sides:
        t = t / share
    if share > 1 and SCALE in sides:
        t = t.sign() * t.abs() ** (1 / share)
    return t


def _prefix(t: torch.Tensor, old_layers: int, alignment: Alignment, fits: dict) -> torch.Tensor:
    """[tokens, layers x (key, value) x KV heads x head_dim]: each NEW block's keys and values are its
    OLD block's, through the maps of what k and v write."""
    t = t.view(t.shape[0], old_layers, 2, -1)
    blocks = [torch.stack([alignment.carry(t[:, a, 0], [None, (("attn.k",), WRITE)], j, fits),
                           alignment.carry(t[:, a, 1], [None, (("attn.v",), WRITE)], j, fits)], 1)
              for j, a in enumerate(alignment.layers)]
    return torch.stack(blocks, 1).reshape(t.shape[0], -1)


def _place(kind, key: str, anat) -> tuple:
    """("block", layer, role, what) | ("head", role, weight or bias) | ("free",): where a module
    tensor sits, by anatomy role."""
    if key == FREE:
        return ("free",)
    name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
    for what in kind.tensors:
        if name.endswith("." + what):
            host = name[: -len(what) - 1] + ".weight"
            slot = anat.slots([host])[host]
            return ("block", slot.layer, slot.role, what)
    slot = anat.slots([name])[name]
    return ("head", slot.role, slot.kind)


def _placed(module: Module, sources: dict, old, new, layers: list[int]) -> dict:
    """The module's config for NEW. One that puts the module on every block the same way (bequest's
    own regex, a suffix list) stays; one that names blocks (peft's per-layer names, a layer regex,
    layers_to_transform) names, on NEW, every block whose OLD block the module was on."""
    config = module.config
    on = {place[1:3] for place in sources if place[0] == "block"}
    per_block = [{role for layer, role in on if layer == a} for a in range(old.layers)]
    if not on or (all(b == per_block[0] for b in per_block) and config.get("layers_to_transform") is None):
        return config

    def names(pairs) -> list[str]:
        fam = new.family
        return sorted({f"{fam.layer_path.format(i=j)}.{fam.layer[role]}" for j, a in enumerate(layers) for layer, role in pairs if layer == a})

    out = {**config, "target_modules": names(on), "layers_to_transform": None, "layers_pattern": None}
    if config.get("feedforward_modules") is not None:  # IA3: the modules whose inputs ([1, n] vectors) it scales
        out["feedforward_modules"] = names({place[1:3] for place, key in sources.items()
                                            if place[0] == "block" and module.tensors[key].shape[0] == 1})
    return out


def _same_layout(old, new) -> None:
    if (old.layer, old.layer_path, old.heads) != (new.layer, new.layer_path, new.heads):
        raise BequestError(f"a PEFT module cannot be transferred from {old.name} to {new.name} (their blocks or heads "
                           "are built differently); use --method distill")
