"""The family tree as a picture: base models in rows by generation, what hangs on a model (fine-tunes,
adapters) in a column of its own to the right of its successors, arrows labelled by the operation that
made each child (dotted: where a ported or recycled module was carried from)."""

from __future__ import annotations

import os
from pathlib import Path

from bequest.lineage.folder import Node
from bequest.lineage.graph import Graph, name

COLORS = {"model": "#dbe9f6", "fine-tune": "#fde7c8", "adapter": "#e3f2dc"}


def draw(graph: Graph, png: str | Path) -> Path:
    """Write the picture to `png` whole or not at all (drawn to a hidden sibling, renamed into place)."""
    # No pyplot: no global state, no display; a bare Figure draws with Agg.
    from matplotlib.figure import Figure

    where = _layout(graph)
    columns = max(x for x, _ in where.values()) + 1
    rows = max(y for _, y in where.values()) + 1
    fig = Figure(figsize=(max(4.0, 2.2 * columns), max(2.5, 1.3 * rows)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.6, columns - 0.4)
    ax.set_ylim(rows - 0.4, -0.6)
    ax.axis("off")
    boxes = {}
    for path, (x, y) in where.items():
        node = graph.nodes[path]
        boxes[path] = ax.text(x, y, _label(graph, path, node), fontsize=7, ha="center", va="center", zorder=1, bbox={
            "boxstyle": "round,pad=0.4" if node.kind == "model" else "round4,pad=0.3",
            "fc": COLORS[node.kind], "ec": "#888888", "ls": "solid" if node.kind == "model" else "dashed"})
    for e in graph.edges:
        (x0, y0), (x1, y1) = where[e.parent], where[e.child]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2, arrowprops={
            "arrowstyle": "->", "color": "#555555", "linestyle": "solid" if e.role == "parent" else "dotted",
            "patchA": boxes[e.parent].get_bbox_patch(), "patchB": boxes[e.child].get_bbox_patch()})
        # Near the child on the fanning arrows to what hangs on a model, where the arrows are apart.
        at = 0.5 if graph.nodes[e.child].kind == "model" or e.role == "source" else 0.7
        ax.text(x0 + at * (x1 - x0), y0 + at * (y1 - y0), e.operation or "(no record)", fontsize=6.5, ha="center",
                va="center", color="#333333", zorder=3, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})
    png = Path(png)
    tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def _layout(graph: Graph) -> dict[Path, tuple[float, float]]:
    """(column, row) per node. A model's successors sit below it side by side, the model centred over
    them; what hangs on it is stacked, from half a row down, in the column right of its successors."""
    where: dict[Path, tuple[float, float]] = {}

    def place(path: Path, left: float, row: float) -> float:  # -> columns used
        where[path] = (left, row)
        kids = graph.children(path)
        bases = [k for k in kids if graph.nodes[k].kind == "model" and k not in where]
        hung = [k for k in kids if graph.nodes[k].kind != "model" and k not in where]
        x = left
        for kid in bases:
            x += place(kid, x, row + 1)
        width = max(1.0, x - left)
        where[path] = (left + (width - 1) / 2, row)
        # Stacked in a column of their own: no other node is ever placed there.
        if hung:
            width += max(place(kid, left + width, row + 0.5 + 0.5 * i) for i, kid in enumerate(hung))
        return width

    x = 0.0
    for root in graph.roots():
        x += place(root, x, 0.0 if graph.nodes[root].kind == "model" else 0.5)
    for path in graph.nodes:  # in a loop of parent records: placed on a row of their own
        if path not in where:
            x += place(path, x, 0.0)
    return where


def _label(graph: Graph, path: Path, node: Node) -> str:
    head = Path(name(path)).name
    if node.kind == "adapter":
        return f"{head}\nadapter {node.peft_type or '?'}"
    s = node.shape
    size = f"{s['family']} {s['layers']}x{s['hidden']}" if s else "shape unknown"
    if node.kind == "fine-tune":
        return f"{head}\nfine-tune, {size}"
    return f"{head}\n{size}\ngeneration {graph.generations[path]}"
