"""Width operators: hidden d -> d', heads h -> h', KV heads, FFN f -> f', one tensor at a time.

Each unit space (hidden coordinates, heads, KV heads, FFN units, pooler units) gets an index map: a
new unit is a copy of an old one, or None (a fresh unit). Every tensor axis either WRITES a space (its
entries produce those units: q rows produce heads, o rows and embedding columns produce hidden
coordinates) or READS one (its entries consume them). Copies follow Net2Net: writers copy, readers
divide by the copy count. Fresh units follow the space's fill rules (see `Exact`).

An operator (`WIDTH`, a `WidthOperator`) picks the spaces once per model and expands one role tensor
at a time, so the in-memory and the sharded path run the very same code. torch is imported by the
functions that touch tensors: picking the spaces (all that planning a growth needs) never pays for it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bequest.anatomy import Anatomy
from bequest.errors import BequestError
from bequest.grow.state import join_key, split_key

if TYPE_CHECKING:
    import torch

WRITE, READ, NORM = "write", "read", "norm"

# role -> per dimension of its weight: None (vocab, positions, labels) or (space, side).
# A bias has the weight's first dimension.
AXES = {
    "embed.token": (None, ("hidden", WRITE)),
    "embed.position": (None, ("hidden", WRITE)),
    "embed.type": (None, ("hidden", WRITE)),
    "attn.q": (("heads", WRITE), ("hidden", READ)),
    "attn.k": (("kv_heads", WRITE), ("hidden", READ)),
    "attn.v": (("kv_heads", WRITE), ("hidden", READ)),
    "attn.o": (("hidden", WRITE), ("heads", READ)),
    "mlp.gate": (("ffn", WRITE), ("hidden", READ)),
    "mlp.up": (("ffn", WRITE), ("hidden", READ)),
    "mlp.down": (("hidden", WRITE), ("ffn", READ)),
    "pooler": (("pool", WRITE), ("hidden", READ)),
    "classifier.dense": (("pool", WRITE), ("hidden", READ)),
    "lm_head.dense": (("hidden", WRITE), ("hidden", READ)),
    "lm_head": (None, ("hidden", READ)),
    "classifier": (None, ("hidden", READ)),
}
NORMS = {"embed.norm", "norm.attn", "norm.mlp", "final_norm", "lm_head.norm"}
LAST_NORMS = {"final_norm", "lm_head.norm"}


@dataclass
class Space:
    units: list[int | None]  # new unit -> the old unit it copies, or None for a fresh unit
    size: int = 1  # tensor entries per unit (head_dim for heads)
    write: str = "random"  # what writers put into a fresh unit: random | mean | zero
    read: str = "zero"  # what readers take from a fresh unit: zero | random

    def entries(self) -> list[int | None]:
        return [None if u is None else u * self.size + e for u in self.units for e in range(self.size)]

    def counts(self) -> torch.Tensor:
        """Per new entry, how many new entries copy its source (1 for fresh ones)."""
        import torch

        src = self.entries()
        n = Counter(src)
        return torch.tensor([1.0 if s is None else float(n[s]) for s in src])

    def later(self) -> torch.Tensor:
        """Per new entry: fresh, or a second (third, ...) copy of its source."""
        import torch

        seen, out = set(), []
        for s in self.entries():
            out.append(s is None or s in seen)
            seen.add(s)
        return torch.tensor(out)


def axes(key: str, pooled: bool) -> tuple:
    _, role, kind = split_key(key)
    if role in NORMS:
        return (("hidden", NORM),)
    ax = AXES[role]
    if role == "classifier" and pooled:  # BERT-likes classify the pooler's units, not a norm's
        ax = (None, ("pool", READ))
    return ax if kind == "weight" else ax[:1]


def is_pooled(state) -> bool:
    return any(split_key(k)[1] in ("pooler", "classifier.dense") for k in state)


def gather(t: torch.Tensor, ax: tuple, spaces: dict[str, Space]) -> torch.Tensor:
    """Index every mapped dimension by its space; fresh entries are 0 (optimizer moments use this)."""
    import torch

    for dim, a in enumerate(ax):
        if a is not None:
            src = spaces[a[0]].entries()
            t = t.index_select(dim, torch.tensor([s or 0 for s in src]))
            fresh = torch.tensor([j for j, s in enumerate(src) if s is None], dtype=torch.long)
            t = t.index_fill(dim, fresh, 0.0)
    return t


def later_mask(shape, ax: tuple, spaces: dict[str, Space]) -> torch.Tensor:
    """True where any index is a fresh unit or a later copy: the part AKI takes from the next layer."""
    import torch

    mask = torch.zeros(shape, dtype=torch.bool)
    for dim, a in enumerate(ax):
        if a is not None:
            view = [1] * len(shape)
            view[dim] = -1
            mask = mask | spaces[a[0]].later().view(view)
    return mask


def _fill(t, dim, old, n, rule, kind, gen, std):
    import torch

    shape = list(t.shape)
    shape[dim] = n
    if rule == "mean":
        return t.index_select(dim, old).mean(dim, keepdim=True).expand(shape)
    if rule == "random" and kind == "weight":
        return torch.randn(shape, generator=gen) * std
    return torch.zeros(shape)  # new biases start at 0, as in a fresh model


def _norm(t: torch.Tensor, sp: Space, kind: str, divide: bool) -> torch.Tensor:
    import torch

    src = sp.entries()
    t = t[torch.tensor([s or 0 for s in src])]
    fresh = torch.tensor([s is None for s in src])
    if fresh.any():
        # Zero- or mean-padded residual: the variance (mean square) shrinks by d/d'; the config's
        # eps shrinks with it. Fresh coordinates normalise to exactly 0 whatever their gamma, so it
        # is set non-zero: with gamma 0 no gradient would ever reach them through this norm.
        if kind == "weight":
            t = t * math.sqrt((~fresh).sum().item() / len(src))
            t[fresh] = t[~fresh].mean()
        else:
            t[fresh] = 0.0
    return t / sp.counts() if divide else t


def expand(key: str, t: torch.Tensor, spaces: dict[str, Space], gen, std: float, pooled: bool, tied: bool):
    import torch

    _, role, kind = split_key(key)
    if role in NORMS:
        # A tied lm_head is the token embedding, a writer that copies; it cannot also divide as a
        # reader, so the norm it reads divides for it.
        return _norm(t, spaces["hidden"], kind, tied and role in LAST_NORMS)
    ax = axes(key, pooled)
    # Readers first: a writer's "mean" over old rows then also covers the new columns.
    for dim in sorted(range(len(ax)), key=lambda d: ax[d] is None or ax[d][1] == WRITE):
        if ax[dim] is None:
            continue
        name, side = ax[dim]
        sp = spaces[name]
        src = sp.entries()
        t = t.index_select(dim, torch.tensor([s or 0 for s in src]))
        if side == READ:
            view = [1] * t.ndim
            view[dim] = -1
            t = t / sp.counts().view(view)
        fresh = torch.tensor([j for j, s in enumerate(src) if s is None], dtype=torch.long)
        if len(fresh):
            old = torch.tensor([j for j, s in enumerate(src) if s is not None], dtype=torch.long)
            rule = sp.write if side == WRITE else sp.read
            t = t.index_copy(dim, fresh, _fill(t, dim, old, len(fresh), rule, kind, gen, std).contiguous())
    return t


def expand_options(anat: Anatomy, keys) -> dict:
    """What `expand` needs beyond one tensor: the init scale and two facts about the whole model
    (`keys`: every role key of the state), so tensor-by-tensor callers expand as whole-model ones."""
    return {
        "std": getattr(anat.config, "initializer_range", 0.02),
        "pooled": is_pooled(keys),
        "tied": anat.tied and anat.task in ("causal_lm", "masked_lm"),
    }


# ---------------------------------------------------------------- index maps


def appended(old: int, new: int) -> list[int | None]:
    return list(range(old)) + [None] * (new - old)


def round_robin(old: int, new: int) -> list[int]:
    return [j % old for j in range(new)]


def head_units(h: int, kv: int, h2: int, kv2: int, copy: bool) -> tuple[list, list]:
    """(q head map, KV head map). q head s reads KV head s // (h2 / kv2), so old heads keep their
    rank inside their old group, and new groups copy (or are fresh like) an old group."""
    g, g2 = h // kv, h2 // kv2
    kv_units = list(range(kv)) + [(j % kv if copy else None) for j in range(kv, kv2)]
    q_units = []
    for s in range(h2):
        group, rank = divmod(s, g2)
        old = kv_units[group]
        q_units.append(None if old is None or (rank >= g and not copy) else old * g + rank % g)
    return q_units, kv_units


def _spaces(anat: Anatomy, target: dict, copy: bool, hidden: Space) -> dict[str, Space]:
    hd = anat.head_dim
    q, kv = head_units(anat.heads, anat.kv_heads, target["heads"], target["kv_heads"], copy)
    units = round_robin if copy else appended
    return {
        "hidden": hidden,
        "heads": Space(q, hd),
        "kv_heads": Space(kv, hd),
        "ffn": Space(units(anat.ffn, target["ffn"])),
        "pool": Space(units(anat.hidden, target["hidden"])),
    }


# ---------------------------------------------------------------- operators


class WidthOperator:
    """How a width operator grows a model: `spaces` picks the unit spaces once per model, then
    `expand` grows one role tensor at a time. The in-memory and the sharded path both call it
    tensor by tensor, in parameter order, with one generator, so they draw the same randoms."""

    def spaces(self, anat: Anatomy, target: dict) -> tuple[dict[str, Space], dict]:
        """(unit spaces, notes): notes are what the operator records in the growth maps besides them."""
        raise NotImplementedError

    def donor(self, key: str, notes: dict) -> str | None:
        """The role key of another tensor `expand` needs for `key`, or None."""
        return None

    def expand(self, key: str, t: torch.Tensor, spaces: dict, gen, options: dict, donor=None) -> torch.Tensor:
        return expand(key, t, spaces, gen, **options)


class Exact(WidthOperator):
    """Function-preserving at any width for pre-norm models (LEMON / MSG in spirit).

    Fresh hidden coordinates hold the mean of the old ones (LayerNorm) or 0 (RMSNorm), so after the
    rescaled norm they are exactly 0 and may be read by random weights. Fresh heads and FFN units
    get random readers of the residual stream and zero writers back into it. Post-norm models keep
    their LayerNorm statistics only under a uniform copy, so they take FPI's hidden map at d' = k*d; at
    other widths they get the mean construction, which is not exact there (measure it).
    """

    def spaces(self, anat, target):
        d, d2 = anat.hidden, target["hidden"]
        if anat.family.norm_position == "post" and d2 % d == 0:
            hidden = Space(round_robin(d, d2))
        else:
            write = "mean" if anat.family.norm == "layernorm" else "zero"
            hidden = Space(appended(d, d2), write=write, read="random")
        return _spaces(anat, target, copy=False, hidden=hidden), {}


class FPI(WidthOperator):
    """bert2BERT function-preserving init: every new unit copies an old one round-robin.

    Exact when d' = k*d (each hidden coordinate copied k times keeps LayerNorm/RMSNorm statistics);
    heads and FFN units may be copied unevenly, their readers divide by each unit's own count.
    """

    def spaces(self, anat, target):
        return _spaces(anat, target, copy=True, hidden=Space(round_robin(anat.hidden, target["hidden"]))), {}


class AKI(FPI):
    """bert2BERT advanced knowledge init: FPI, then the new units of layer l come from layer l+1
    (the top layer from itself). Not function-preserving by design."""

    def spaces(self, anat, target):
        spaces, _ = super().spaces(anat, target)
        top = anat.layers - 1
        return spaces, {"new_units_from_layer": [min(i + 1, top) for i in range(anat.layers)]}

    def donor(self, key, notes):
        layer, role, kind = split_key(key)
        source = None if layer is None else notes["new_units_from_layer"][layer]
        return None if source in (None, layer) else join_key(source, role, kind)

    def expand(self, key, t, spaces, gen, options, donor=None):
        import torch

        t = super().expand(key, t, spaces, gen, options)
        if donor is None:
            return t
        # FPI only copies, so the donor's expansion draws nothing: a generator of its own keeps `gen` in step.
        mask = later_mask(t.shape, axes(key, options["pooled"]), spaces)
        return torch.where(mask, super().expand(key, donor, spaces, torch.Generator(), options), t)


WIDTH: dict[str, WidthOperator] = {"exact": Exact(), "fpi": FPI(), "aki": AKI()}


def widen(op: WidthOperator, state: dict, spaces: dict, notes: dict, gen, options: dict) -> dict:
    """Every tensor of a role state through `op`, in the state's order (which fixes the random draws)."""
    return {k: op.expand(k, t, spaces, gen, options, state.get(op.donor(k, notes))) for k, t in state.items()}


def fills(spaces: dict[str, Space]) -> dict[str, dict]:
    """Per unit space, what writers put into its fresh units and what readers take from them."""
    return {name: {"write": sp.write, "read": sp.read} for name, sp in spaces.items()}


def eps_factor(spaces: dict[str, Space]) -> float:
    """d/d' when fresh hidden coordinates pad the residual stream (see `_norm`), else 1."""
    src = spaces["hidden"].entries()
    return 1.0 if None not in src else (len(src) - src.count(None)) / len(src)


def check(name: str) -> None:
    if name not in WIDTH:
        raise BequestError(f"unknown width operator {name!r}; use one of: {', '.join(WIDTH)}")
