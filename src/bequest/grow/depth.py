"""Depth operators: L -> L' blocks. Each returns a plan, one (source layer, fresh) pair per new block;
`restack` carries it out. A fresh block is an identity block: a copy whose writers into the residual
stream are zero."""

from __future__ import annotations

from bequest.errors import BequestError
from bequest.grow.state import join_key, split_key

WRITERS = ("attn.o", "mlp.down")  # a block's only writers into the residual stream

DEPTH = {}


def depth(name: str):
    def register(fn):
        if name in DEPTH:
            raise ValueError(f"depth operator {name!r} is registered twice")
        DEPTH[name] = fn
        return fn

    return register


def after_each(layers: int, new: int, placement: str) -> list[int]:
    """How many new blocks go right after each old layer."""
    if new == 0:
        return [0] * layers
    if placement == "even":
        return [(i + 1) * new // layers - i * new // layers for i in range(layers)]
    if placement == "top":
        return [0] * (layers - 1) + [new]
    try:
        picks = [int(x) for x in placement.split(",")]
    except ValueError:
        raise BequestError(
            f"placement {placement!r} is not 'even', 'top' or comma-separated layer indices like '0,1'"
        ) from None
    if len(picks) != new or not all(0 <= i < layers for i in picks):
        raise BequestError(
            f"placement {placement!r} must list {new} old layer indices in 0..{layers - 1} "
            "(a new block goes right after each listed layer)"
        )
    return [picks.count(i) for i in range(layers)]


@depth("identity")
def identity(layers: int, target: int, placement: str) -> list[tuple[int, bool]]:
    """LLaMA Pro / Net2DeeperNet: new blocks copy the layer below them, with zero writers."""
    plan = []
    for i, n in enumerate(after_each(layers, target - layers, placement)):
        plan += [(i, False)] + [(i, True)] * n
    return plan


@depth("interleave")
def interleave(layers: int, target: int, placement: str) -> list[tuple[int, bool]]:
    """ELLE: a full copy of a chosen layer right after it."""
    plan = []
    for i, n in enumerate(after_each(layers, target - layers, placement)):
        plan += [(i, False)] * (1 + n)
    return plan


@depth("stack")
def stack(layers: int, target: int, placement: str) -> list[tuple[int, bool]]:
    """StackingBERT: the stack on top of itself (layer i -> i + L), truncated at the target."""
    return [(j % layers, False) for j in range(target)]


@depth("solar")
def solar(layers: int, target: int, placement: str) -> list[tuple[int, bool]]:
    """SOLAR depth up-scaling: the first ceil(L'/2) layers, then the last floor(L'/2)."""
    if target > 2 * layers:
        raise BequestError(
            f"solar joins two overlapping copies of the {layers} layers, so at most {2 * layers}; "
            f"pass --layers <= {2 * layers} or use --depth stack"
        )
    low, high = (target + 1) // 2, target // 2
    return [(i, False) for i in range(low)] + [(i, False) for i in range(layers - high, layers)]


def restack(state: dict, plan: list[tuple[int, bool]], inverse_layer_scale: bool) -> dict:
    """The new stack: block j copies block plan[j][0]; fresh blocks have zero writers.

    `inverse_layer_scale` (GPT-2's scale_attn_by_inverse_layer_idx) divides attention scores by the
    layer number, so a block that moves rescales its queries to keep its attention pattern.
    """
    out = {k: t for k, t in state.items() if split_key(k)[0] is None}
    for j, (src, fresh) in enumerate(plan):
        for key, t in state.items():
            layer, role, kind = split_key(key)
            if layer == src:
                out[join_key(j, role, kind)] = moved(t, role, j, src, fresh, inverse_layer_scale)
    return out


def moved(t, role: str, j: int, src: int, fresh: bool, inverse_layer_scale: bool):
    """Block `src`'s `role` tensor as it lands at new index j (a copy; the caller's stays intact)."""
    t = t.clone()
    if fresh and role in WRITERS:
        t.zero_()
    if inverse_layer_scale and role == "attn.q" and j != src:
        t = t * ((j + 1) / (src + 1))
    return t


def new_blocks(plan: list[tuple[int, bool]]) -> set[int]:
    """New block indices that are fresh or a second (third, ...) copy of their source."""
    seen, out = set(), set()
    for j, (src, fresh) in enumerate(plan):
        if fresh or src in seen:
            out.add(j)
        seen.add(src)
    return out


def check(name: str) -> None:
    if name not in DEPTH:
        raise BequestError(f"unknown depth operator {name!r}; use one of: {', '.join(DEPTH)}")
