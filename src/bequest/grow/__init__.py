"""Growth: start a bigger model from a smaller trained one (docs/methods.md, section 1).

- `spec`: `GrowSpec`, what a growth asks for, and `target_shape`, the sizes it comes to.
- `width`, `depth`: the operators (`WIDTH`, `DEPTH`), registered by name.
- `model`: `grow(model, spec)`, in memory; `sharded`: the same growth of a safetensors checkpoint,
  tensor by tensor; `optim`: optimizer states along the growth maps; `probe`: max |Δ logits|.
"""

from bequest.grow.depth import DEPTH
from bequest.grow.model import Grown, grow
from bequest.grow.optim import grow_optimizer_state
from bequest.grow.probe import max_abs_logit_change
from bequest.grow.spec import GrowSpec, target_shape
from bequest.grow.width import WIDTH

__all__ = [
    "DEPTH",
    "WIDTH",
    "GrowSpec",
    "Grown",
    "grow",
    "grow_optimizer_state",
    "max_abs_logit_change",
    "target_shape",
]
