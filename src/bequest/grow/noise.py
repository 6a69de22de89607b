"""Symmetry-breaking noise (GrowSpec.noise): N(0, std^2) on every expanded tensor, the same whichever
path grows the model and in whatever order it visits the tensors."""

from __future__ import annotations

import zlib

import torch


def expanded(layer: int | None, shape, old_shape, new_blocks: set[int]) -> bool:
    """Whether a grown tensor takes noise: its shape grew, or it belongs to a new block."""
    return layer in new_blocks or tuple(shape) != tuple(old_shape)


def add_noise(key: str, t: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """t + N(0, std^2), drawn from a generator of its own per (seed, key): the draw does not depend on
    which tensors came before, so the sharded path, which visits tensors in another order, adds the same."""
    gen = torch.Generator().manual_seed((seed * 2**32 + zlib.crc32(key.encode())) % 2**64)
    return t + torch.randn(t.shape, generator=gen) * std
