"""Symmetry-breaking noise (GrowSpec.noise): N(0, std^2) on every expanded tensor, the same whichever
path grows the model and in whatever order it visits the tensors."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from bequest.errors import BequestError

if TYPE_CHECKING:
    import torch


def expanded(layer: int | None, shape, old_shape, new_blocks: set[int]) -> bool:
    """Whether a grown tensor takes noise: its shape grew, or it belongs to a new block."""
    return layer in new_blocks or tuple(shape) != tuple(old_shape)


def add_noise(key: str, t: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """t + N(0, std^2), drawn from a generator of its own per (seed, key): the draw does not depend on
    which tensors came before, so the sharded path, which visits tensors in another order, adds the same."""
    import torch

    gen = torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(key.encode())) % 2**64)
    return finite(key, t + torch.randn(t.shape, generator=gen) * std, f"--noise {std:g}")


def finite(key: str, t: torch.Tensor, cause: str) -> torch.Tensor:
    """`t`, refused when growth made any of it inf or NaN (a silently broken model is worse than none)."""
    import torch

    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BequestError(f"{cause} makes {key} non-finite; use a noise std far below the weights' scale (e.g. 1e-3)")
    return t
