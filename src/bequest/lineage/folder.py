"""One folder of a family, read from what bequest, transformers and peft leave on disk: the model card's
lineage block (with the growths of a run that grew while training), `growth.json`, `port.json`,
`recipe.yaml`, an adapter's config (peft's `adapter_config.json` or bequest's `bottleneck_config.json`, read
by `bequest.io.adapters`) and `config.json`. Nothing is loaded but small text files; no weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.io import cached_snapshot, is_adapter, load_config, read_adapter_config, read_lineage

MODEL = "config.json"
# Operations that tune a model for tasks rather than make a new base (and recycle-*). `bequest upgrade`
# moves fine-tunes and adapters onto a new base, `bequest export` folds an adapter into its base: what
# they write is one of them too.
TUNING = ("finetune", "learn", "upgrade", "export")


@dataclass
class Node:
    path: Path  # resolved: one folder, one node, however its children spelled it
    kind: str  # "model" (a base), "fine-tune" (a tuned model), "adapter" (a PEFT module)
    operation: str | None  # what made it; None: no record (a plain transformers or peft folder)
    recorded: str | None  # the parent (for an adapter: its host) as the record spells it
    parent: Path | None  # that parent resolved; None with `recorded` set: the parent folder is gone
    source: Path | None = None  # the module or fine-tune a ported or recycled one was carried from
    shape: dict | None = None  # family, task and sizes (models and fine-tunes)
    peft_type: str | None = None  # adapters
    maps: dict | None = None  # growth.json's index maps (grown models)
    growth: list[dict] | None = None  # the card's growths during training (pretrain --grow-at): step, from, to, ...
    problem: str | None = None  # why part of the folder could not be read

    @property
    def missing(self) -> bool:
        return self.recorded is not None and self.parent is None


def is_node(folder: Path) -> bool:
    return is_adapter(folder) or (folder / MODEL).is_file()


def resolve(recorded: str, child: Path) -> Path | None:
    """A parent as recorded: absolute, or relative to where the command ran (the current folder, then,
    failing that, the child's parent folder and the folders above it), or else a hub id in the local
    Hugging Face cache. None when none of these exists."""
    tries = [Path(recorded), child.parent / recorded, *(up / recorded for up in child.parent.parents)]
    for p in [*tries, cached_snapshot(recorded)]:
        if p is not None and is_node(p):
            return p.resolve()
    return None


def read_node(folder: str | Path) -> Node:
    folder = Path(folder)
    if not is_node(folder):
        raise BequestError(f"{folder}: neither {MODEL} nor an adapter config; give a model, fine-tune or adapter folder")
    path = folder.resolve()
    try:
        card = read_lineage(path)
    except (UnicodeDecodeError, AttributeError):  # a README that is not text, or front matter that is no mapping
        card = None
    card = card if isinstance(card, dict) else {}
    recipe = _read(path / "recipe.yaml", yaml.safe_load)
    port = _read(path / "port.json", json.loads)
    if is_adapter(path):
        node = _adapter(path, card, recipe, port)
    else:
        node = _model(path, card)
    source = card.get("source") or port.get("source") or recipe.get("task_weights")
    if isinstance(source, str) and source:
        node.source = resolve(source, path)
    if node.recorded is not None:
        node.parent = resolve(node.recorded, path)
    return node


def _adapter(path: Path, card: dict, recipe: dict, port: dict) -> Node:
    try:
        config, problem = read_adapter_config(path)[0], None
    except BequestError as e:  # reported on the node: lineage shows the rest of the family
        config, problem = {}, str(e)
    operation = card.get("operation") or (
        "port" if port else f"recycle-{recipe['method']}" if "task_weights" in recipe and "method" in recipe
        else "finetune" if recipe.get("peft") else None
    )
    host = card.get("parent") or port.get("host") or config.get("base_model_name_or_path")
    return Node(path, "adapter", operation, _text(host), None, peft_type=config.get("peft_type"), problem=problem)


def _model(path: Path, card: dict) -> Node:
    operation = card.get("operation")
    node = Node(path, "model", operation, _text(card.get("parent")), None)
    growth = card.get("growth")
    if isinstance(growth, list) and all(isinstance(g, dict) for g in growth):
        node.growth = growth
    try:
        a = anatomy(load_config(path))
        node.shape = {"family": a.family.name, "task": a.task, "layers": a.layers, "hidden": a.hidden,
                      "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "ffn": a.ffn, "vocab": a.vocab}
    except BequestError as e:  # one unreadable folder should not hide the rest of the family
        node.problem = str(e)
    tuned = operation in TUNING or (operation or "").startswith("recycle-")
    if tuned or (node.shape or {}).get("task") == "seq_cls":
        node.kind = "fine-tune"
    if (path / "growth.json").is_file():
        growth = _read(path / "growth.json", json.loads)
        node.maps = growth.get("maps") or None
        node.operation = operation or "grow"
        if node.maps is None:
            node.problem = node.problem or "growth.json holds no index maps"
    return node


def _read(file: Path, parse) -> dict:
    """A small record file as a mapping; {} when absent or unreadable (lineage reports, it does not refuse)."""
    try:
        data = parse(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _text(value) -> str | None:
    return str(value) if value else None


def describe(shape: dict | None) -> str:
    """'gpt2 2x32 (4 heads, ffn 64)': what a model's shape looks like in text."""
    if not shape:
        return "shape unknown"
    kv = f", {shape['kv_heads']} KV heads" if shape["kv_heads"] != shape["heads"] else ""
    return f"{shape['family']} {shape['layers']}x{shape['hidden']} ({shape['heads']} heads{kv}, ffn {shape['ffn']})"


def growth_text(growth: list[dict]) -> str:
    """'1 -> 2 -> 4 layers at steps 200, 400 (stack)': how a model grew while it trained."""
    try:
        layers = " -> ".join(str(n) for n in [growth[0]["from"]["layers"], *(g["to"]["layers"] for g in growth)])
        steps = ", ".join(str(g["step"]) for g in growth)
        how = ", ".join(dict.fromkeys(str(g.get("depth")) for g in growth))
    except (KeyError, TypeError):
        return "record unreadable"
    return f"{layers} layers at step{'s' if len(growth) > 1 else ''} {steps} ({how})"
