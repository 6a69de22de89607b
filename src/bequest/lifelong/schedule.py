"""How training changes from stage to stage: the growth schedule, growing, each stage's step count, and the
re-warmed learning rate of `rewarm`."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from bequest.anatomy import anatomy
from bequest.engine import train_flops_per_token

if TYPE_CHECKING:
    from bequest.lifelong.recipe import LifelongRecipe

SIZES = ("hidden", "heads", "kv_heads", "ffn", "layers")


def parse_schedule(text: str) -> list[list[tuple[str, str, int]]]:
    """'hidden+32,layers+1;layers=6' -> one list of (key, op, n) per growth."""
    out = []
    for stage in text.split(";"):
        steps = []
        for item in filter(None, (s.strip() for s in stage.split(","))):
            m = re.fullmatch(r"(\w+)\s*([+=])\s*(\d+)", item)
            if not m or m[1] not in SIZES:
                raise ValueError(f"{item!r} is not KEY+N or KEY=N with KEY one of {', '.join(SIZES)}")
            steps.append((m[1], m[2], int(m[3])))
        out.append(steps)
    return out


def next_shape(anat, growth: list[tuple[str, str, int]]) -> dict:
    """The target sizes of one growth; the MLP keeps its ratio to the hidden size unless it is set."""
    shape = {k: getattr(anat, k) for k in SIZES}
    for key, op, n in growth:
        shape[key] = shape[key] + n if op == "+" else n
    if not any(k == "ffn" for k, _, _ in growth):
        shape["ffn"] = anat.ffn * shape["hidden"] // anat.hidden
    if not any(k in ("heads", "kv_heads") for k, _, _ in growth):  # let grow keep the head size and group
        shape.pop("heads"), shape.pop("kv_heads")
    return shape


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
