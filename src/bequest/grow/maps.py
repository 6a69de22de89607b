"""The growth maps (growth.json's "maps"): which new unit and layer came from which old one, and how
fresh units were filled, so adapters, optimizer states and ported modules can follow the growth."""

from __future__ import annotations

from bequest.anatomy import Anatomy
from bequest.grow.width import fills


def growth_maps(width: str, depth: str, anat: Anatomy, spaces: dict, stack: list, notes: dict, pooled: bool) -> dict:
    """JSON-serialisable: per unit space, new unit -> old unit (None: fresh); per new block, its source
    layer (None: a fresh identity block); per space, its fill rule."""
    kept = ("hidden", "heads", "kv_heads", "ffn", *(("pool",) if pooled else ()))
    maps = {
        "width": width,
        "depth": depth,
        "head_dim": anat.head_dim,
        "hidden": list(spaces["hidden"].units),
        # Per new block (every block grows the same way today; adapters should not assume it).
        **{k: [list(spaces[k].units) for _ in stack] for k in ("heads", "kv_heads", "ffn")},
        "layers": [None if fresh else src for src, fresh in stack],
    }
    if pooled:
        maps["pool"] = list(spaces["pool"].units)
    if "new_units_from_layer" in notes:
        maps["new_units_from_layer"] = [notes["new_units_from_layer"][src] for src, _ in stack]
    maps["fill"] = fills({k: spaces[k] for k in kept})
    return maps
