"""In-memory growth: `grow(model, spec)` returns a bigger copy of a loaded model and its growth maps.

The model is read into a role-keyed state, widened tensor by tensor (a WIDTH operator), restacked (a
DEPTH operator), noised if asked, and copied into a fresh model of the target shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bequest.anatomy import anatomy
from bequest.grow.depth import DEPTH, new_blocks, restack
from bequest.grow.maps import growth_maps
from bequest.grow.noise import add_noise, expanded
from bequest.grow.probe import max_abs_logit_change
from bequest.grow.spec import GrowSpec, target_shape
from bequest.grow.state import build_grown, grown_config, join_key, split_key, to_roles
from bequest.grow.width import WIDTH, eps_factor, expand_options, is_pooled, widen


@dataclass
class Grown:
    model: torch.nn.Module
    maps: dict  # JSON-serialisable: which new unit / layer came from which old one (None: fresh)
    max_abs_logit_change = staticmethod(max_abs_logit_change)


def grow(model, spec: GrowSpec) -> Grown:
    """A bigger copy of `model` as `spec` asks: widened by WIDTH[spec.width], deepened by DEPTH[spec.depth]."""
    anat = anatomy(model)
    target = target_shape(anat, spec)
    stack = DEPTH[spec.depth](anat.layers, target["layers"], spec.placement)
    op = WIDTH[spec.width]
    spaces, notes = op.spaces(anat, target)

    old = to_roles(dict(model.named_parameters()), anat)
    state = widen(op, old, spaces, notes, torch.Generator().manual_seed(spec.seed), expand_options(anat, old))
    state = restack(state, stack, anat.inverse_layer_scale)
    if spec.noise:
        state = _noise(state, old, stack, spec.noise, spec.seed)

    shape = {**target, "head_dim": anat.head_dim}
    config = grown_config(anat, shape, eps_factor(spaces), [src for src, _ in stack])
    new = build_grown(anat, config, state, next(model.parameters()))
    new.train(model.training)
    return Grown(new, growth_maps(spec.width, spec.depth, anat, spaces, stack, notes, is_pooled(old)))


def _noise(state: dict, old: dict, stack: list, std: float, seed: int) -> dict:
    blocks = new_blocks(stack)
    out = {}
    for key, t in state.items():
        layer, role, kind = split_key(key)
        source = key if layer is None else join_key(stack[layer][0], role, kind)
        out[key] = add_noise(key, t, std, seed) if expanded(layer, t.shape, old[source].shape, blocks) else t
    return out
