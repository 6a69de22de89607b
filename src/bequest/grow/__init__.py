"""Growth: start a bigger model from a smaller trained one (METHODS.md section 1).

`grow` reads the model into a role-keyed state, widens it (a WIDTH operator), deepens it (a DEPTH
operator), builds a fresh model of the target shape and copies the state in. It returns the model
and the index maps it used, so adapters and optimizer states can follow the same way.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from bequest.anatomy import Anatomy, anatomy
from bequest.errors import BequestError
from bequest.grow import depth as _depth
from bequest.grow import width as _width
from bequest.grow.depth import DEPTH, restack
from bequest.grow.optim import grow_optimizer_state
from bequest.grow.state import build_grown, grown_config, join_key, split_key, to_roles
from bequest.grow.width import WIDTH, eps_factor


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if "logits" in out else out.last_hidden_state


@torch.no_grad()
def max_abs_logit_change(old, new, probe_ids: torch.Tensor) -> float:
    """max |logits_new - logits_old| over `probe_ids`, in eval mode, one sequence at a time
    (sequence classifiers without a pad token refuse batches). Models without a head compare their
    last hidden states on the old model's coordinates."""
    modes = old.training, new.training
    old.eval()
    new.eval()
    try:
        worst = 0.0
        for row in probe_ids.to(next(old.parameters()).device):
            a = _outputs(old, row[None]).float()
            b = _outputs(new, row[None]).float()[..., : a.shape[-1]]
            worst = max(worst, (a - b).abs().max().item())
        return worst
    finally:
        old.train(modes[0])
        new.train(modes[1])


@dataclass
class Grown:
    model: torch.nn.Module
    maps: dict  # JSON-serialisable: which new unit / layer came from which old one (None: fresh)
    max_abs_logit_change = staticmethod(max_abs_logit_change)


def targets(anat: Anatomy, hidden=None, heads=None, kv_heads=None, ffn=None, layers=None) -> dict:
    """The validated target shape; unspecified sizes stay, heads follow hidden at the same head size."""
    hd = anat.head_dim
    coupled = anat.hidden == anat.heads * hd  # else head_dim is a free setting (Llama-like configs)
    hidden = anat.hidden if hidden is None else hidden
    if heads is None:
        heads = hidden // hd if coupled and hidden % hd == 0 else anat.heads
    group = anat.heads // anat.kv_heads
    gqa = "kv_heads" in anat.family.config_keys
    if kv_heads is None:
        kv_heads = heads // group if heads % group == 0 else anat.kv_heads
    elif not gqa and kv_heads != heads:
        raise BequestError(f"{anat.family.name} has no grouped KV heads; drop --kv-heads")
    target = {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads if gqa else heads,
        "ffn": anat.ffn if ffn is None else ffn,
        "layers": anat.layers if layers is None else layers,
    }
    for key, new in target.items():
        old = getattr(anat, key)
        if new < old:
            flag = "--" + key.replace("_", "-")
            raise BequestError(f"{flag} {new} is smaller than the source's {old}; growth only adds, pass >= {old}")
    if coupled and hidden != heads * hd:
        fix = f"pass --heads {hidden // hd}" if hidden % hd == 0 else f"pick --hidden a multiple of {hd}"
        raise BequestError(f"--hidden {hidden} with --heads {heads} changes the head size {hd}; {fix}")
    if heads % target["kv_heads"]:
        raise BequestError(f"--kv-heads {target['kv_heads']} must divide --heads {heads}")
    if heads // target["kv_heads"] < group:
        raise BequestError(
            f"--kv-heads {target['kv_heads']} would shrink the KV group size {group}; "
            f"keep heads / kv-heads >= {group}"
        )
    return target


def new_blocks(plan: list) -> set[int]:
    """New block indices that are fresh or a second (third, ...) copy of their source."""
    seen, out = set(), set()
    for j, (src, fresh) in enumerate(plan):
        if fresh or src in seen:
            out.add(j)
        seen.add(src)
    return out


def add_noise(key: str, t: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """t + N(0, std^2), drawn from a generator of its own per (seed, key): the draw does not depend on
    which tensors came before, so the streaming path, which visits tensors in another order, adds the same."""
    gen = torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(key.encode())) % 2**64)
    return t + torch.randn(t.shape, generator=gen) * std


def _noise(state: dict, old: dict, plan: list, std: float, seed: int) -> dict:
    """N(0, std^2) on every expanded tensor: those whose shape grew, and every new block."""
    blocks = new_blocks(plan)
    out = {}
    for key, t in state.items():
        layer, role, kind = split_key(key)
        source = key if layer is None else join_key(plan[layer][0], role, kind)
        grew = layer in blocks or t.shape != old[source].shape
        out[key] = add_noise(key, t, std, seed) if grew else t
    return out


def growth_maps(width: str, depth: str, anat: Anatomy, spaces: dict, plan: list, notes: dict, pooled: bool) -> dict:
    """JSON-serialisable: which new unit / layer came from which old one (None: fresh)."""
    maps = {
        "width": width,
        "depth": depth,
        "head_dim": anat.head_dim,
        "hidden": list(spaces["hidden"].units),
        # Per new block (every block grows the same way today; adapters should not assume it).
        **{k: [list(spaces[k].units) for _ in plan] for k in ("heads", "kv_heads", "ffn")},
        "layers": [None if fresh else src for src, fresh in plan],
    }
    if pooled:
        maps["pool"] = list(spaces["pool"].units)
    if "new_units_from_layer" in notes:
        maps["new_units_from_layer"] = [notes["new_units_from_layer"][src] for src, _ in plan]
    return maps


def grow(
    model,
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
) -> Grown:
    """A bigger copy of `model`: widened by WIDTH[width], deepened by DEPTH[depth]."""
    _width.check(width)
    _depth.check(depth)
    anat = anatomy(model)
    target = targets(anat, hidden, heads, kv_heads, ffn, layers)
    plan = DEPTH[depth](anat.layers, target["layers"], placement)
    gen = torch.Generator().manual_seed(seed)

    old = to_roles(dict(model.named_parameters()), anat)
    state, spaces, notes = WIDTH[width](old, anat, target, gen)
    state = restack(state, plan, bool(getattr(anat.config, "scale_attn_by_inverse_layer_idx", False)))
    if noise:
        state = _noise(state, old, plan, noise, seed)

    shape = {**target, "head_dim": anat.head_dim}
    config = grown_config(anat, shape, eps_factor(spaces), [src for src, _ in plan])
    new = build_grown(anat, config, state, next(model.parameters()))
    new.train(model.training)

    return Grown(new, growth_maps(width, depth, anat, spaces, plan, notes, _width.is_pooled(old)))


__all__ = [
    "DEPTH",
    "WIDTH",
    "Grown",
    "grow",
    "grow_optimizer_state",
    "max_abs_logit_change",
    "targets",
]
