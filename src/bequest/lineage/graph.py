"""The family tree of a set of folders: every model, fine-tune and adapter found under them, the
ancestors their records name (found on disk even outside the folders given), and the edges between
them, as text or as JSON."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from bequest.errors import BequestError
from bequest.io import hub_id
from bequest.lineage.folder import Node, describe, growth_text, is_node, read_node

CHECKPOINT = re.compile(r"checkpoint-\d+")  # Trainer's intermediate saves: not members of the family
ORDER = {"adapter": 0, "fine-tune": 1, "model": 2}  # what hangs on a model is listed before its successors


@dataclass
class Edge:
    parent: Path
    child: Path
    operation: str | None  # what made the child
    role: str  # "parent": the child's base or predecessor; "source": the module a ported or recycled one came from


@dataclass
class Graph:
    nodes: dict[Path, Node]
    edges: list[Edge]
    generations: dict[Path, int | None]  # base-model depth from a root (1); what hangs on a model: its host's

    def children(self, path: Path) -> list[Path]:
        kids = [e.child for e in self.edges if e.parent == path and e.role == "parent"]
        return sorted(kids, key=lambda p: (ORDER[self.nodes[p].kind], name(p)))

    def roots(self) -> list[Path]:
        return sorted((p for p, n in self.nodes.items() if n.parent not in self.nodes), key=name)

    def text(self) -> str:
        kinds = [n.kind for n in self.nodes.values()]
        count = ", ".join(f"{kinds.count(k)} {k}{'s' if kinds.count(k) != 1 else ''}" for k in reversed(ORDER))
        lines, shown = [f"lineage of {len(self.nodes)} folders: {count}"], set()

        def walk(path: Path, lead: str, branch: str) -> None:
            shown.add(path)
            lines.append(f"{lead}{branch}{self.line(path)}")
            lead += {"": "", "├── ": "│   ", "└── ": "    "}[branch]
            kids = [k for k in self.children(path) if k not in shown]
            for i, kid in enumerate(kids):
                walk(kid, lead, "└── " if i == len(kids) - 1 else "├── ")

        for root in self.roots():
            walk(root, "", "")
        for path in sorted(set(self.nodes) - shown, key=name):  # in a loop of records: listed, not lost
            lines.append(f"{self.line(path)}  (in a loop of parent records)")
        return "\n".join(lines)

    def line(self, path: Path) -> str:
        """'zoo/g3  gpt2 6x64 (8 heads, ffn 128) · generation 4 · grow from zoo/g2b'."""
        n = self.nodes[path]
        if n.kind == "adapter":
            parts = [f"{name(path)}  adapter {n.peft_type or '?'}"]
            on = "on" if n.operation is None else f"{n.operation} onto"
        else:
            what = describe(n.shape)
            if n.kind == "fine-tune":
                what = f"fine-tune ({(n.shape or {}).get('task')}) {what}"
            parts = [f"{name(path)}  {what}"] + ([f"generation {self.generations[path]}"] if n.kind == "model" else [])
            on = "from" if n.kind == "model" else "of"
            on = on if n.operation is None else f"{n.operation} {on}"
        if n.parent is not None:
            parts.append(f"{on} {name(n.parent)}")
        elif n.missing:
            parts.append(f"{on} {n.recorded}, not found")
        else:
            parts.append(n.operation or "no lineage record")
        if n.parent is not None and n.operation is None:
            parts[-1] += " (no lineage record)"
        if n.growth:
            parts.append(f"grown while training: {growth_text(n.growth)}")
        if n.source is not None:
            parts.append(f"carried from {name(n.source)}")
        if n.problem:
            parts.append(f"unreadable: {n.problem}")
        return " · ".join(parts)

    def as_dict(self) -> dict:
        nodes = [{"path": str(p), "name": name(p), "kind": n.kind, "operation": n.operation,
                  "generation": self.generations[p], "parent": _str(n.parent), "recorded_parent": n.recorded,
                  "missing_parent": n.missing, "source": _str(n.source), "shape": n.shape, "peft_type": n.peft_type,
                  "grown": n.maps is not None, "growth": n.growth, "problem": n.problem}
                 for p, n in sorted(self.nodes.items(), key=lambda kv: name(kv[0]))]
        edges = [{"parent": str(e.parent), "child": str(e.child), "operation": e.operation, "role": e.role}
                 for e in self.edges]
        return {"nodes": nodes, "edges": edges}


def scan(dirs) -> Graph:
    """Every model, fine-tune and adapter folder in or under `dirs`, and the ancestors they record."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise BequestError(f"{d}: no such folder; give model folders or folders that hold them")
        for root, subdirs, _ in os.walk(d):
            # Hidden work folders (.OUT.partial) and Trainer checkpoints are not members of the family.
            subdirs[:] = sorted(s for s in subdirs if not s.startswith(".") and not CHECKPOINT.fullmatch(s))
            if is_node(Path(root)):
                found.append(Path(root))
    if not found:
        raise BequestError(f"no model or adapter folders in {', '.join(map(str, dirs))}; give folders holding a "
                           "config.json or an adapter config (adapter_config.json, bottleneck_config.json)")
    nodes: dict[Path, Node] = {}
    todo = [f.resolve() for f in found]
    while todo:  # the ancestors and sources the records name join the family, wherever they are
        path = todo.pop()
        if path in nodes:
            continue
        node = nodes[path] = read_node(path)
        todo += [p for p in (node.parent, node.source) if p is not None]
    edges = [Edge(n.parent, p, n.operation, "parent") for p, n in nodes.items() if n.parent is not None]
    edges += [Edge(n.source, p, n.operation, "source") for p, n in nodes.items() if n.source is not None]
    edges.sort(key=lambda e: (e.role != "parent", name(e.parent), name(e.child)))
    return Graph(nodes, edges, _generations(nodes))


def _generations(nodes: dict[Path, Node]) -> dict[Path, int | None]:
    """A model's generation is one more than its parent model's (a root is 1); a fine-tune or adapter
    takes its host's, None when the host is unknown."""
    out: dict[Path, int | None] = {}

    def gen(path: Path, seen: frozenset) -> int | None:
        if path not in out:
            n = nodes[path]
            up = gen(n.parent, seen | {path}) if n.parent in nodes and n.parent not in seen else None
            out[path] = (1 if up is None else up + 1) if n.kind == "model" else up
        return out[path]

    for path in nodes:
        gen(path, frozenset())
    return out


def name(path: Path) -> str:
    """A folder as the user would type it from here: a cached hub model's id, else relative when it is
    under the current folder."""
    if hub_id(path):
        return hub_id(path)
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
