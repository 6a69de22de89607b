"""Lineage: how the models, fine-tunes and adapters of a family descend from one another, read from the
records bequest (and plain transformers and peft) leave in their folders; no weights are loaded.

- `folder`: one folder as a `Node` (kind, operation, recorded and resolved parent, shape, growth maps).
- `graph`: `scan(dirs)`, the family tree of every folder in or under `dirs` (and the ancestors they
  record) as a `Graph` of nodes and edges, as text or JSON; `draw`: the same as a PNG.
- `relation`: `relation(old, new)`, how NEW descends from OLD (same, continued, grown with the composed
  index maps, or unrelated), what `bequest upgrade` decides its path from.
- `command`: the `bequest lineage` verb.
"""

from bequest.lineage.folder import Node, read_node, resolve
from bequest.lineage.graph import Edge, Graph, scan
from bequest.lineage.relation import Growth, Relation, compose, relation

__all__ = ["Edge", "Graph", "Growth", "Node", "Relation", "compose", "read_node", "relation", "resolve", "scan"]
