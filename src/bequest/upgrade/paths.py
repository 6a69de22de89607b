"""Where a source starts on NEW, one function per path (`recipe.PATHS`): each returns the model on NEW
that carries the source (trainable), and what it measured on the way."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from bequest.data.corpus import corpus_docs
from bequest.data.prepare import task_splits
from bequest.errors import BequestError
from bequest.grow import GrowSpec, grow
from bequest.grow.spec import SIZES
from bequest.io import load_config, load_model
from bequest.lineage import Relation
from bequest.peft import attach, new_config, with_module
from bequest.port.carry import port_module
from bequest.recipe import PeftFields, read_yaml
from bequest.task_weights import check_module_fits, delta_init
from bequest.upgrade.sources import Source, TaskData, shape


@dataclass
class Move:
    """One source on its way from OLD to NEW."""

    source: Source
    old: Path
    new: Path
    relation: Relation
    labels: int | None
    seed: int
    task: TaskData | None  # its task data (a transfer measures both models on its inputs)
    tokenizers: tuple  # (OLD's, NEW's)


def start(path: str, move: Move):
    """(the source's model on NEW, a report) along `path`."""
    return STARTS[path](move)


def _host(move: Move):
    host, _ = load_model(move.new, move.source.task(move.new), num_labels=move.labels, seed=move.seed,
                         with_tokenizer=False)
    return host


def _base(path: Path):
    return load_model(path, with_tokenizer=False)[0]


def reuse(move: Move):
    """PortLLM's patch: the module as it is; a full fine-tune's task delta added to NEW."""
    if shape(load_config(move.old)) != shape(load_config(move.new)):
        raise BequestError(f"reuse needs NEW of OLD's shape, and {move.new} has another; use --method port or transfer")
    if move.source.module is not None:
        check_module_fits(move.source.module, move.new, move.labels)
        return attach(_host(move), move.source.module, trainable=True), {}
    tuned = load_model(move.source.path, with_tokenizer=False)[0]
    return delta_init(_base(move.old), _base(move.new), tuned).train(), {}


def port(move: Move):
    """Along the growth maps of every grow between OLD and NEW, one growth after the other."""
    steps = move.relation.steps
    if not steps:
        raise BequestError(f"{move.new} was not grown from {move.old} (it is {move.relation.kind}); use --method "
                           "transfer")
    if move.source.module is not None:
        module, reports = move.source.module, []
        for step in steps:
            module, report = port_module(module, step.folder, seed=move.seed)
            reports.append(report)
        check_module_fits(module, move.new, move.labels)  # NEW may be the last grown model trained further
        return attach(_host(move), module, trainable=True), {"ports": reports}
    # A full fine-tune grows as its base grew (same operators, seed and fills), so the two growths differ
    # only by the task delta; NEW's own training since is added as in recycling.
    tuned, old = load_model(move.source.path, with_tokenizer=False)[0], _base(move.old)
    for step in steps:
        spec = _spec(step.folder)
        tuned, old = grow(tuned, spec).model, grow(old, spec).model
    return delta_init(old, _base(move.new), tuned).train(), {"grown": [str(s.folder) for s in steps]}


def _spec(folder: Path) -> GrowSpec:
    recipe = read_yaml(folder / "recipe.yaml")
    if not {"width", "depth", "seed"} <= set(recipe):
        raise BequestError(f"{folder}/recipe.yaml does not say how {folder} was grown; a full fine-tune follows "
                           "the growth only with it")
    fields = SimpleNamespace(**{"placement": "even", "noise": 0.0, **recipe})
    return GrowSpec.from_recipe(fields, {k: recipe.get(k) for k in SIZES})


def transfer(move: Move):
    """Mapped into NEW's spaces, measured on text both models read (bequest.transfer)."""
    from bequest.transfer import measure, transfer_full, transfer_module

    old, new = _base(move.old), _base(move.new)
    alignment = measure(old, new, *move.tokenizers, _texts(move.task))
    if move.source.module is not None:
        module, report = transfer_module(move.source.module, alignment, load_config(move.new))
        return attach(_host(move), module, trainable=True), report
    tuned = load_model(move.source.path, with_tokenizer=False)[0]
    model, report = transfer_full(tuned, old, new, alignment)
    return model.train(), report


def _texts(task: TaskData | None) -> list[str]:
    """What a transfer measures OLD and NEW on: the task's training inputs, else the embedded corpus."""
    if task is not None:
        train_set, _ = task_splits(task.data, train_examples=512, files=task)
        return list(train_set["text"])
    return [d.text for d in corpus_docs(None, "train")[:512]]


def fresh(move: Move):
    """A fresh module of the source's kind and settings on NEW (a full fine-tune: NEW with a fresh head)."""
    host = _host(move)
    module = move.source.module
    if module is None:
        return host.train(), {}
    torch.manual_seed(move.seed)
    return with_module(host, new_config(module.kind, host, _settings(module.config))), {}


def _settings(config: dict) -> PeftFields:
    """The source's own settings, where its kind has them (rank, virtual tokens, bottleneck)."""
    pairs = {"r": "lora_rank", "lora_alpha": "lora_alpha", "num_virtual_tokens": "virtual_tokens",
             "size": "bottleneck", "style": "style", "nonlinearity": "nonlinearity"}
    return PeftFields(**{mine: copy.copy(config[theirs]) for theirs, mine in pairs.items()
                         if config.get(theirs) is not None})


STARTS = {"reuse": reuse, "port": port, "transfer": transfer, "distill": fresh, "fresh": fresh}
