"""The sources an upgrade carries: what each one is (a PEFT module or a full fine-tune), the model it
computes on OLD, and the task data it is measured and tuned on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bequest.anatomy import anatomy, task_of
from bequest.errors import BequestError
from bequest.io import check_model, is_adapter, load_config, load_model
from bequest.peft import Module, attach, read_module
from bequest.recipe import TaskFields, TuningFields, read_yaml, resolve
from bequest.task_weights import check_module_fits


class TaskData(TaskFields, TuningFields):
    """One source's task: where its examples are and how they are read."""


@dataclass
class Source:
    path: Path
    kind: str  # a PEFT kind, or "full" for a fine-tuned model folder
    module: Module | None  # the PEFT module (None for a full fine-tune)
    recipe: dict  # the recipe.yaml bequest saved beside it (empty for a plain peft/transformers source)

    def task(self, host) -> str:
        """The head a host of this source carries (`host`: a model folder)."""
        return self.module.host_task(load_config(host)) if self.module else "seq_cls"

    def labels(self, old: str | Path) -> int | None:
        """The classes its classifier predicts (None: no classifier, e.g. a causal-LM LoRA)."""
        if self.module is None:
            return load_config(self.path).num_labels
        return self.module.num_labels(anatomy(load_config(old)).family)


def read_source(path: str | Path) -> Source:
    """A source folder, checked: an adapter (peft's or bequest's) or a full sequence-classification fine-tune."""
    path = Path(path)
    if not path.is_dir():
        raise BequestError(f"{path}: no such folder")
    recipe = read_yaml(path / "recipe.yaml") if (path / "recipe.yaml").exists() else {}
    if is_adapter(path):
        module = read_module(path)
        return Source(path, module.kind, module, recipe)
    if not (path / "config.json").exists():
        raise BequestError(f"{path}: neither an adapter (adapter_config.json or bottleneck_config.json) nor a model "
                           "folder (config.json)")
    config = check_model(path)
    if task_of(config) != "seq_cls":
        raise BequestError(f"{path} is a {task_of(config)} model; upgrade carries classifiers fine-tuned from OLD")
    return Source(path, "full", None, recipe)


def on_old(source: Source, old: str | Path, seed: int):
    """OLD computing with the source: the fine-tuned model itself, or OLD carrying the module."""
    if source.module is None:
        if shape(load_config(source.path)) != shape(load_config(old)):
            raise BequestError(f"{source.path} does not have {old}'s shape; give fine-tunes of --from")
        return load_model(source.path, with_tokenizer=False)[0].eval()
    labels = source.labels(old)
    check_module_fits(source.module, old, labels)
    host, _ = load_model(old, source.task(old), num_labels=labels, seed=seed, with_tokenizer=False)
    return attach(host, source.module, trainable=False).eval()


def shape(config) -> tuple:
    a = anatomy(config)
    return a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.ffn


def given_data(r) -> list[str | None]:
    """Per source (in order), the data --data names for it (None: not named)."""
    given = list(r.data)
    if len(given) == 1 and given[0].endswith((".yaml", ".yml")) and Path(given[0]).is_file():
        table = read_yaml(given[0])
        given = [table.get(s, table.get(Path(s).name)) for s in r.sources]
    elif len(given) == 1:
        given = given * len(r.sources)
    elif given and len(given) != len(r.sources):
        raise BequestError(f"--data given {len(given)} times for {len(r.sources)} sources; give it once, once per "
                           "source, or as a .yaml file mapping sources to data")
    return given or [None] * len(r.sources)


def task_data(r, source: Source, data: str | None) -> TaskData | None:
    """The source's task: `data` if given, else the data of the source's own recipe (None: none)."""
    settings = r.model_dump(include=set(TaskData.model_fields) - {"data"})
    if data is not None:
        return resolve(TaskData, **{**settings, "data": str(data)})
    if not source.recipe.get("data"):
        return None
    # The source's own reading of its files (its columns), with this run's example counts.
    files = {k: source.recipe[k] for k in ("label_column", "text_column", "validation_fraction") if k in source.recipe}
    return resolve(TaskData, **{**settings, **files, "data": source.recipe["data"]})
