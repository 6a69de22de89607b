"""Grow an optimizer's state along the growth maps, so training goes on where it stopped.

Moments (AdamW's exp_avg, exp_avg_sq) follow the same index maps as the weights: a copied unit
inherits its source's history, a fresh unit or identity block starts from 0. A copy whose weight was
divided keeps its source's moments undivided: its gradient equals the source's gradient.
"""

from __future__ import annotations

import torch

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.grow.state import from_roles, join_key, split_key, to_roles
from bequest.grow.width import Space, axes, gather, is_pooled, later_mask


def layer_spaces(maps: dict, j: int) -> dict[str, Space]:
    """The unit spaces of new layer j (non-layer tensors only use hidden and pool)."""
    hd = maps["head_dim"]
    return {
        "hidden": Space(maps["hidden"]),
        "heads": Space(maps["heads"][j], hd),
        "kv_heads": Space(maps["kv_heads"][j], hd),
        "ffn": Space(maps["ffn"][j]),
        "pool": Space(maps.get("pool", [])),
    }


def carry(old: dict, maps: dict) -> dict:
    """A role state (of moments, say) moved along `maps`: copies follow, fresh entries are 0."""
    pooled = is_pooled(old)
    out = {k: gather(t, axes(k, pooled), layer_spaces(maps, 0)) for k, t in old.items() if split_key(k)[0] is None}
    block = [split_key(k)[1:] for k in old if split_key(k)[0] == 0]
    donors = maps.get("new_units_from_layer")
    for j, src in enumerate(maps["layers"]):
        spaces = layer_spaces(maps, j)
        for role, kind in block:
            key = join_key(j, role, kind)
            ax = axes(key, pooled)
            t = gather(old[join_key(0 if src is None else src, role, kind)], ax, spaces)
            if src is None:  # an identity block has no history
                t = torch.zeros_like(t)
            elif donors and donors[j] != src:  # AKI: new units came from another layer
                donor = gather(old[join_key(donors[j], role, kind)], ax, spaces)
                t = torch.where(later_mask(t.shape, ax, spaces), donor, t)
            out[key] = t
    return out


def grow_optimizer_state(opt_state: dict, old_model, new_model, maps: dict, groups=None) -> dict:
    """A state_dict for `torch.optim.X(new_model.parameters())` from one of `X(old_model.parameters())`.

    `groups`: (old, new) parameter names per param group, in order, for an optimizer built on groups of
    named parameters (the Trainer's: decayed, not decayed); new group k takes old group k's settings."""
    saved = opt_state["param_groups"]
    old_params, new_params = dict(old_model.named_parameters()), dict(new_model.named_parameters())
    old_groups, new_groups = groups or ([list(old_params)], [list(new_params)])
    if [len(g["params"]) for g in saved] != [len(g) for g in old_groups] or len(new_groups) != len(saved):
        raise BequestError(
            "grow_optimizer_state needs the optimizer's parameter groups: one group holding model.parameters() in "
            "order, or the names of each group's parameters"
        )
    old_names = [n for g in old_groups for n in g]
    states = dict(zip(old_names, (opt_state["state"].get(i, {}) for g in saved for i in g["params"])))
    moments = sorted({k for s in states.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim > 0})
    scalars = next(({k: v for k, v in s.items() if k not in moments} for s in states.values() if s), {})
    new_names = [n for g in new_groups for n in g]
    new_state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()} for i in range(len(new_names))
    }
    old_anat, new_anat = anatomy(old_model), anatomy(new_model)
    for m in moments:
        named = {n: states[n].get(m, torch.zeros_like(p)) for n, p in old_params.items() if n in states}
        grown = from_roles(carry(to_roles(named, old_anat), maps), new_anat, new_names)
        for i, n in enumerate(new_names):
            p = new_params[n]
            new_state[i][m] = grown[n].to(device=p.device, dtype=p.dtype)
    starts = [sum(map(len, new_groups[:k])) for k in range(len(new_groups))]
    param_groups = [{**g, "params": list(range(start, start + len(names)))}
                    for g, start, names in zip(saved, starts, new_groups)]
    return {"state": new_state, "param_groups": param_groups}
