"""How far a grown model's function moved: max |Δ logits| against its source on a fixed probe batch."""

from __future__ import annotations

import math

import torch

from bequest.anatomy import anatomy
from bequest.errors import BequestError

PROBE = (2, 16)  # sequences x tokens of the fixed probe batch


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
            change = (a - b).abs().max().item()
            if not math.isfinite(change):  # max() would keep the old value past a NaN
                raise BequestError("the grown model's outputs are not finite on the probe; its weights are broken "
                                   "(a noise std too large for the checkpoint's dtype?)")
            worst = max(worst, change)
        return worst
    finally:
        old.train(modes[0])
        new.train(modes[1])


def probe_ids(model, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random token ids that fits the model's vocabulary and positions."""
    anat = anatomy(model)
    length = PROBE[1]
    if anat.positions:
        length = min(length, anat.usable_positions)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, anat.vocab, (PROBE[0], length), generator=g)


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if "logits" in out else out.last_hidden_state
