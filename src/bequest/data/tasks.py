"""Small text-classification tasks derived from the corpus documents.

Each task labels a document by something we know about where it came from, so no
annotation is needed. A document keeps its corpus split, so a model pretrained on the
corpus train split never saw a task's validation texts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache

from bequest.data.corpus import DOMAINS, Doc, build_docs, check_split, split_of, stable_fraction
from bequest.errors import BequestError

TASKS: tuple[str, ...] = ("domain", "kind", "module", "arity", "visibility")
MAX_CHARS = 512
CAPS = {"train": 3000, "validation": 1000}  # keeps fine-tuning on a task to seconds
TOP_MODULES = 8


def _visibility(doc: Doc) -> str | None:
    if doc.kind == "topic":
        return None
    leaf = doc.name.rsplit(".", 1)[-1]
    if leaf.startswith("__") and leaf.endswith("__"):
        return "dunder"
    return "private" if leaf.startswith("_") else "public"


def _arity(doc: Doc) -> str | None:
    if doc.kind not in ("function", "method") or doc.arity is None:
        return None
    return str(doc.arity) if doc.arity < 3 else "3+"


@lru_cache(maxsize=1)
def _top_modules() -> tuple[str, ...]:
    counts = Counter(d.module for d in build_docs() if d.kind != "topic")
    ranked = sorted(counts, key=lambda m: (-counts[m], m))  # name breaks ties, for determinism
    return tuple(sorted(ranked[:TOP_MODULES]))


def _spec(name: str) -> tuple[list[str], Callable[[Doc], str | None]]:
    """Label names and a function giving a document's label (None: not in the task)."""
    if name == "domain":
        return list(DOMAINS), lambda d: d.domain
    if name == "kind":
        kinds = ["module", "class", "function", "method"]
        return kinds, lambda d: d.kind if d.kind in kinds else None
    if name == "module":
        top = _top_modules()
        return list(top), lambda d: d.module if d.module in top and d.kind != "topic" else None
    if name == "arity":
        return ["0", "1", "2", "3+"], _arity
    if name == "visibility":
        return ["public", "private", "dunder"], _visibility
    raise BequestError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")


def task_labels(name: str) -> list[str]:
    """The label names of a task; label id i means task_labels(name)[i]."""
    return _spec(name)[0]


def task_examples(name: str, split: str = "train") -> list[tuple[str, int]]:
    """(text, label id) pairs, at most CAPS[split] of them, in a fixed shuffled order."""
    names, label_of = _spec(name)
    check_split(split)
    picked = [(d, label_of(d)) for d in build_docs() if split_of(d.name) == split]
    picked = [(d, lab) for d, lab in picked if lab is not None]
    # Salting the key with the task name gives each task its own fixed shuffle.
    picked.sort(key=lambda p: stable_fraction(f"{name}:{p[0].name}"))
    return [(d.text[:MAX_CHARS], names.index(lab)) for d, lab in picked[: CAPS[split]]]


def load_task(name: str, split: str = "train"):
    """A task as a `datasets.Dataset` with columns text and label (a ClassLabel)."""
    import datasets

    names = task_labels(name)
    examples = task_examples(name, split)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    columns = {"text": [t for t, _ in examples], "label": [y for _, y in examples]}
    return datasets.Dataset.from_dict(columns, features=features)

