"""Growth: start a bigger model from a smaller trained one (docs/methods.md, section 1).

- `spec`: `GrowSpec`, what a growth asks for, and `target_shape`, the sizes it comes to.
- `width`, `depth`: the operators (`WIDTH`, `DEPTH`), registered by name.
- `model`: `grow(model, spec)`, in memory; `sharded`: the same growth of a safetensors checkpoint,
  tensor by tensor; `optim`: optimizer states along the growth maps; `probe`: max |Δ logits|.

The registries and the spec import without torch (recipes read the operators' names, and `bequest
grow` plans without it); what works on loaded models is imported on first use.
"""

import importlib

from bequest.grow.depth import DEPTH
from bequest.grow.spec import GrowSpec, target_shape
from bequest.grow.width import WIDTH

_ON_MODELS = {"Grown": "model", "grow": "model", "grow_optimizer_state": "optim", "max_abs_logit_change": "probe"}


def __getattr__(name: str):
    if name in _ON_MODELS:
        return getattr(importlib.import_module(f"bequest.grow.{_ON_MODELS[name]}"), name)
    raise AttributeError(f"module 'bequest.grow' has no attribute {name!r}")


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
