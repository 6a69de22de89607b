"""How training changes from stage to stage: growing (the schedule's grammar is `bequest.grow.spec`'s),
each stage's step count, and the re-warmed learning rate of `rewarm`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bequest.anatomy import anatomy
from bequest.engine import train_flops_per_token
from bequest.grow.spec import next_shape

if TYPE_CHECKING:
    from bequest.lifelong.recipe import LifelongRecipe

def stage_steps(r: LifelongRecipe, model, per_step: int, seq: int, recover: int) -> tuple[int, int, int]:
    """(recovery steps, training steps, FLOPs per token) of a stage; a FLOP budget sets the steps."""
    fpt = train_flops_per_token(anatomy(model), seq)
    if r.budget_flops is None:
        return recover, r.steps, fpt
    total = int(r.budget_flops // (per_step * seq * fpt))
    recover = min(recover, total // 2)
    return recover, max(1, total - recover), fpt


def rewarm_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    """The learning rate at `step` of a stage of `steps`, as a share of the peak (Ibrahim et al. 2024): a linear
    re-warm from `floor` over `warmup` steps, then a cosine re-decay that reaches `floor` as the stage ends, so the
    next stage re-warms from where this one stopped."""
    if step < warmup:
        return floor + (1 - floor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def grow_stage(model, growth, r: LifelongRecipe, k: int):
    """The model grown for stage k by one step of the schedule."""
    from bequest.grow import GrowSpec, grow

    spec = GrowSpec.from_recipe(r, next_shape(anatomy(model), growth), seed=r.seed + k)
    return grow(model, spec).model.train()


def check_growth(model, schedule, r: LifelongRecipe) -> None:
    """The first growth's sizes, refused before any stage trains (the recipe already checked the operators)."""
    from bequest.grow import GrowSpec, target_shape

    target_shape(anatomy(model), GrowSpec.from_recipe(r, next_shape(anatomy(model), schedule[0])))
