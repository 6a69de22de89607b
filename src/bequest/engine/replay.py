"""Replay (rehearsal): earlier sources' examples kept in a bounded memory and trained on again.

A source is one task (`bequest learn`) or one domain (`bequest lifelong`) of a stream. `Memory` keeps a
seeded random sample of every source it is given and hands it back in one of two ways:
- `mix`: the new source's examples plus replayed ones making up a fraction of the result, for a Trainer
  that shuffles (learn);
- `windows`: examples in a fixed order, batch by batch, every batch holding exactly
  `memory_share(fraction, batch)` replayed ones, for a Trainer that keeps that order (lifelong).

The two verbs bound their memory differently, and each draws its samples as it always has, so runs
reproduce exactly: a total `size` shared equally by the sources seen keeps every sample in random order
(a prefix of it is then a smaller random sample when the shares shrink; Python's `random`); a
`per_source` cap keeps each sample in corpus order (numpy's generator seeded by (seed, source)).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
from datasets import Dataset, concatenate_datasets

from bequest.errors import BequestError


class Memory:
    """Earlier sources' examples: at most `size` in all shared equally, or at most `per_source` of each."""

    def __init__(self, *, seed: int, size: int | None = None, per_source: int | None = None):
        if (size is None) == (per_source is None):
            raise ValueError("Memory takes one bound: size (shared by the sources) or per_source")
        self.seed, self.size, self.per_source, self.kept = seed, size, per_source, []

    def add(self, examples: Dataset) -> None:
        k = len(self.kept)
        if self.per_source is not None:
            keep = np.random.default_rng([self.seed, k]).permutation(len(examples))[: self.per_source]
            self.kept.append(examples.select(sorted(keep.tolist())))
            return
        rng = random.Random(self.seed + k)
        self.kept.append(examples.select(rng.sample(range(len(examples)), min(len(examples), self.size))))
        share = max(1, self.size // len(self.kept))
        self.kept = [d.select(range(min(share, len(d)))) for d in self.kept]

    def pool(self) -> Dataset | None:
        """Everything kept, source after source (None before the first source)."""
        return concatenate_datasets(self.kept) if self.kept else None

    def mix(self, examples: Dataset, fraction: float, seed: int) -> Dataset:
        """`examples` plus replayed ones making up `fraction` of the result (repeated if memory is short)."""
        if not self.kept:
            return examples
        pool = self.pool()
        n = round(fraction / (1 - fraction) * len(examples))
        rng = random.Random(seed)
        picks = [i for _ in range(n // len(pool) + 1) for i in rng.sample(range(len(pool)), len(pool))][:n]
        return concatenate_datasets([examples, pool.select(picks)])

    def windows(self, examples: Dataset | None, batch: int, batches: int, fraction: float, seed: int) -> Dataset:
        """`batches` consecutive windows of `batch` examples, each with exactly `memory_share(fraction, batch)`
        from memory and the rest from `examples`; memory only when `examples` is None (a warm-up on it)."""
        if examples is None:
            pool = self.pool()
            return pool.select(replay_order(0, len(pool), batch, batches, 1.0, seed))
        pool = concatenate_datasets([examples, self.pool()]) if fraction and self.kept else examples
        n = len(examples)
        return pool.select(replay_order(n, len(pool) - n, batch, batches, fraction, seed))


def memory_share(fraction: float, batch: int) -> int:
    """Replayed examples in every batch: round(fraction * batch), refused where that rounds a replay to none."""
    m = round(fraction * batch)
    if fraction and not m:
        need = next(b for b in itertools.count(batch) if round(fraction * b))
        raise BequestError(f"--replay-fraction {fraction} of a batch of {batch} rounds to no replayed example; "
                           f"raise --batch-size to {need} or more, or the fraction")
    return m


def replay_order(n_new: int, n_memory: int, batch: int, batches: int, fraction: float, seed: int) -> list[int]:
    """Indices into new (0 .. n_new-1) + memory (n_new ..) examples, batch by batch: each consecutive `batch`
    window holds exactly memory_share(fraction, batch) memory examples, at shuffled places (every one when
    n_new is 0). Both pools are walked through fresh permutations, so every example is seen before any repeats."""
    rng = np.random.default_rng(seed)
    m = memory_share(fraction, batch) if n_memory else 0
    if n_new == 0:
        m = batch

    def cycle(n, offset):
        while True:
            yield from (offset + rng.permutation(n)).tolist()

    new, mem = cycle(n_new, 0) if n_new else None, cycle(n_memory, n_new) if m else None
    order = []
    for _ in range(batches):
        window = [next(mem) for _ in range(m)] + [next(new) for _ in range(batch - m)]
        order += [window[i] for i in rng.permutation(batch)]
    return order
