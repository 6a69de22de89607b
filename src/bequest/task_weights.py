"""Task weights (a full fine-tune or a PEFT module) moved onto another base, and the old tuned model
as a teacher: the pieces `bequest recycle` and `bequest upgrade` share.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from bequest.anatomy import TASK_ROLES, anatomy
from bequest.engine.kd import KD, KDTrainer, TeacherMeter
from bequest.errors import BequestError
from bequest.io import load_config
from bequest.peft import expected, misfits


def _by_slot(model) -> dict[str, torch.Tensor]:
    a = anatomy(model)
    params = dict(model.named_parameters())
    return {str(slot): params[name].detach() for name, slot in a.slots(params).items()}


@torch.no_grad()
def delta_init(old_base, new_base, tuned):
    """A copy of `tuned` moved to the new base: theta_{i+1} + (theta_i^task - theta_i), head as tuned.

    Matched by anatomy slot, so an LM base and a classifier (or BERT's prefixed names) line up.
    """
    old, new = _by_slot(old_base), _by_slot(new_base)
    model = copy.deepcopy(tuned)
    a = anatomy(model)
    params = dict(model.named_parameters())
    for name, slot in a.slots(params).items():
        if slot.role in TASK_ROLES:  # never pre-trained: a delta against the base's copy would be noise
            continue
        key, p = str(slot), params[name]
        for base, which in ((old, "old"), (new, "new")):
            if key not in base:
                raise BequestError(f"the {which} base has no {key}; recycling needs bases of the tuned model's shape")
            if base[key].shape != p.shape:
                raise BequestError(
                    f"{key} is {list(base[key].shape)} in the {which} base but {list(p.shape)} in the task weights; "
                    "recycling needs bases of the tuned model's shape"
                )
        # tuned + (new - old), in this order: with new == old the delta is exactly 0 and so is the change.
        p.copy_(p + (new[key] - old[key]))
    return model


def check_module_fits(module, host: str | Path, labels: int | None) -> None:
    """Every tensor of the module has a place of its shape on `host`, before anything loads or is written."""
    config = load_config(host)
    _, want = expected(module.config, config, module.host_task(config), labels)
    problems = misfits(module.tensors, want)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BequestError(f"the {module.kind} module does not fit {host}: {problems[0]}{more}; "
                           "recycle onto a base of the old base's shape (or `bequest port` it first)")


def kd_trainer(teacher, r, meter: TeacherMeter | None = None):
    """The engine's KDTrainer with a constant alpha, for `engine.train` (alpha = beta = 0: plain
    cross-entropy). `r` carries `KDFields` (and `beta`, when the recipe has one)."""
    kd = KD(alpha=r.alpha, schedule="constant", tau=r.tau, beta=getattr(r, "beta", 0.0))
    return functools.partial(KDTrainer, teacher=teacher, kd=kd, meter=meter)
