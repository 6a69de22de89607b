"""How is NEW related to OLD? Walked up NEW's recorded parents until OLD turns up.

- same: one folder (however spelled), or the same config and the same weight bytes;
- continued: NEW descends from OLD through training that kept the shape (continue-pretrain, lifelong
  stages without growth, inherit onto the same shape, fine-tuning, ...);
- grown: NEW descends from OLD through one or more `bequest grow` steps, shape-keeping training
  allowed between them; the steps (each grown folder and its growth.json maps) are listed in order
  and composed into one set of index maps OLD -> NEW;
- unrelated: no path of weights from OLD to NEW: none recorded, or one through a shape change that
  recorded no maps (lifelong growth, inherit onto another shape). `reason` says which, and `missing`
  names a parent a card records but that is gone, where the walk stopped there.

The composed maps keep growth.json's layout ("hidden": per NEW hidden unit, "heads" / "kv_heads" /
"ffn": per NEW block, per unit; "layers": per NEW block) and give, for every NEW unit, the OLD unit it
comes from, or None for a fresh one; every unit of a fresh block is None. They are for reports: a
module ports exactly only step by step (copies divide at each step, which composed maps do not replay),
so `steps` is what porting follows.
"""

from __future__ import annotations

import filecmp
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bequest.errors import BequestError
from bequest.io import weight_files
from bequest.lineage.folder import Node, describe, read_node

MAX_HOPS = 256  # a lineage longer than this is a loop in the records
SPACES = ("heads", "kv_heads", "ffn")
SIZES = ("family", "layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")


@dataclass
class Growth:
    folder: Path  # the grown folder (growth.json beside its weights)
    maps: dict  # growth.json's index maps, from its parent's shape to its own


@dataclass
class Relation:
    kind: Literal["same", "continued", "grown", "unrelated"]
    old: Path
    new: Path
    path: list[Path] = field(default_factory=list)  # folders from OLD to NEW, both ends included
    operations: list[str | None] = field(default_factory=list)  # what made each folder after the first
    steps: list[Growth] = field(default_factory=list)  # grown: the growth steps, in order
    maps: dict | None = None  # grown: the index maps OLD -> NEW, composed over the steps
    missing: str | None = None  # unrelated: the parent, as recorded, whose folder is gone where the walk stopped
    reason: str = ""  # one line: why this kind


def relation(old: str | Path, new: str | Path) -> Relation:
    old_node, new_node = _model(old), _model(new)
    if old_node.path == new_node.path or _identical(old_node.path, new_node.path):
        return Relation("same", Path(old), Path(new), [old_node.path], [],
                        reason="one folder" if old_node.path == new_node.path else "same config and weight bytes")
    chain = _ancestry(new_node)
    missing = chain[-1].recorded if chain[-1].missing else None
    at = next((i for i, n in enumerate(chain) if n.path == old_node.path), None)
    if at is None:  # OLD copied elsewhere: an ancestor with its config and bytes is OLD
        at = next((i for i, n in enumerate(chain[1:], 1) if _identical(n.path, old_node.path)), None)
    if at is None:
        return Relation("unrelated", Path(old), Path(new), missing=missing, reason=_no_path(old_node, new_node, chain[-1]))
    hops = list(reversed(chain[: at + 1]))  # OLD (or its copy) first
    rel = Relation("continued", Path(old), Path(new), [old_node.path] + [n.path for n in hops[1:]],
                   [n.operation for n in hops[1:]])
    for parent, child in itertools.pairwise(hops):
        if (child.path / "growth.json").is_file() and child.maps is None:
            raise BequestError(f"{child.path}: {child.problem}; grow it again from its parent")
        if child.maps is not None:
            was = _checked(_grown_from, child.maps, f"{child.path}/growth.json")
            if any(parent.shape[k] != was[k] for k in was):
                rel.kind = "unrelated"
                rel.reason = (f"{child.path}/growth.json grows a {_size(was)} model but its parent {parent.path} is "
                              f"{describe(parent.shape)}; the maps do not describe this lineage")
                return rel
            rel.steps.append(Growth(child.path, child.maps))
        elif any(parent.shape[k] != child.shape[k] for k in SIZES):
            rel.kind = "unrelated"
            rel.reason = (f"{child.path} ({child.operation or 'no record'}) changed shape from "
                          f"{describe(parent.shape)} to {describe(child.shape)} without growth maps")
            return rel
    if rel.steps:
        rel.kind = "grown"
        rel.maps = _checked(compose, [s.maps for s in rel.steps], f"a growth.json between {old} and {new}")
        rel.reason = f"{len(rel.steps)} growth step(s) over {len(hops) - 1} lineage step(s)"
    else:
        rel.reason = f"shape kept over {len(hops) - 1} lineage step(s)"
    return rel


def compose(steps: list[dict]) -> dict:
    """Per-step growth maps (each from the previous step's shape) as one set OLD -> NEW."""
    out = _fresh_blocks(steps[0])
    for maps in steps[1:]:
        maps = _fresh_blocks(maps)
        out = {
            "head_dim": maps["head_dim"],
            "hidden": [_at(out["hidden"], u) for u in maps["hidden"]],
            "layers": [_at(out["layers"], src) for src in maps["layers"]],
            # A NEW block's units index the units of the block it was copied from.
            **{k: [[None] * len(units) if src is None else [_at(out[k][src], u) for u in units]
                   for src, units in zip(maps["layers"], maps[k])] for k in SPACES},
        }
    return out


def _checked(read, maps, where: str):
    """`read(maps)`; malformed maps are one line that says where."""
    try:
        return read(maps)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BequestError(f"malformed index maps in {where} ({type(e).__name__}: {e}); grow that model again") from None


def _fresh_blocks(maps: dict) -> dict:
    """growth.json's maps with every unit of a fresh block marked fresh (the file lists, for every block
    alike, how its units were laid out)."""
    return {"head_dim": maps["head_dim"], "hidden": list(maps["hidden"]), "layers": list(maps["layers"]),
            **{k: [[None] * len(units) if src is None else list(units) for src, units in zip(maps["layers"], maps[k])]
               for k in SPACES}}


def _at(units: list, i: int | None):
    return None if i is None else units[i]


def _grown_from(maps: dict) -> dict:
    """The sizes a growth started from: every old unit keeps a place, so the largest index tells."""
    def size(units):
        return max(u for u in units if u is not None) + 1
    was = {"hidden": size(maps["hidden"]), "layers": size(maps["layers"]), "heads": size(maps["heads"][0]),
           "kv_heads": size(maps["kv_heads"][0]), "ffn": size(maps["ffn"][0])}
    return was


def _size(was: dict) -> str:
    return f"{was['layers']}x{was['hidden']} ({was['heads']} heads, ffn {was['ffn']})"


def _model(folder: str | Path) -> Node:
    folder = Path(folder)
    if not folder.is_dir():
        raise BequestError(f"{folder}: no such folder; give a model folder")
    node = read_node(folder)
    if node.kind == "adapter":
        raise BequestError(f"{folder} is an adapter; relations are between models, give the model it hangs on")
    if node.shape is None:
        raise BequestError(f"{folder}: {node.problem}")
    return node


def _ancestry(node: Node) -> list[Node]:
    """[node, its parent, ...] as far as the records reach (the last one's parent: none, or gone)."""
    chain, seen = [node], {node.path}
    for _ in range(MAX_HOPS):
        if node.parent is None or node.parent in seen:
            break
        node = read_node(node.parent)
        if node.shape is None:  # an adapter or an unreadable folder is no base model to descend from
            break
        chain.append(node)
        seen.add(node.path)
    return chain


def _no_path(old: Node, new: Node, last: Node) -> str:
    if last.missing:
        return (f"no recorded lineage from OLD to NEW; it stops at {last.path}, whose parent {last.recorded} "
                "(as its card records it) is gone")
    if any(n.path == new.path for n in _ancestry(old)):
        return "NEW is an ancestor of OLD, not a successor"
    return "no recorded lineage from OLD to NEW"


def _identical(a: Path, b: Path) -> bool:
    """Same config and byte-identical weights (a copy of one model in another folder)."""
    try:
        if json.loads((a / "config.json").read_text()) != json.loads((b / "config.json").read_text()):
            return False
        fa, fb = weight_files(a), weight_files(b)
    except (OSError, ValueError, BequestError):
        return False
    return ([f.name for f in fa] == [f.name for f in fb]
            and all(filecmp.cmp(x, y, shallow=False) for x, y in zip(fa, fb)))
