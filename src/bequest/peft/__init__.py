"""PEFT modules as bequest handles them: a kind, a config and named tensors.

Each kind is one module of this package (`kind.py` says what one holds): peft's LoRA, IA3, prefix and
prompt tuning and bequest's own bottleneck adapters. Over them, one interface: read and write a module
folder, list the tensors a host expects (from a weightless skeleton of it), build a fresh module on a
host, and attach a saved one, refusing any load that would leave a tensor unplaced or a place without
its tensor (peft loads what matches and is silent about the rest). Folders are in peft's layout or,
for bottleneck adapters, bequest's own format; `bequest.io.adapters` is the one place that knows them.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bequest.anatomy import AUTO_CLASSES, anatomy, build_model, family_of, label_names, name_labels, task_of
from bequest.errors import BequestError
from bequest.io import (
    read_adapter_config, read_header, reference, save_recipe, save_tokenizer, write_adapter_config, write_card, write_model,
)
from bequest.peft.kind import Kind, as_dict, target_regex

LABELS = "labels.json"  # a classifier module's classes, which its host's head is built with: {num_labels, names}
HOST_TASKS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "FEATURE_EXTRACTION": "base", None: "base"}
PEFT_TASKS = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "base": "FEATURE_EXTRACTION", "masked_lm": None}


def _registry() -> dict[str, Kind]:
    """{name: kind} of every module here that registers a `KIND`, in their listing order."""
    found = {m.name: getattr(importlib.import_module(f"{__name__}.{m.name}"), "KIND", None) for m in pkgutil.iter_modules(__path__)}
    found.pop("kind")
    for module, k in found.items():  # bequest.recipe lists the kinds by module name without importing them
        if k is None or k.name != module:
            raise RuntimeError(f"bequest.peft.{module} must register a KIND named {module!r}")
    kinds = sorted(found.values(), key=lambda k: k.order)
    for attr in ("name", "peft_type", "order"):
        values = [getattr(k, attr) for k in kinds]
        if len(set(values)) != len(values):
            raise RuntimeError(f"two PEFT kinds share a {attr}: {values}")
    return {k.name: k for k in kinds}


KINDS = _registry()
BY_TYPE = {k.peft_type: k for k in KINDS.values()}


@dataclass
class Module:
    kind: str  # a name in KINDS
    config: dict  # its adapter config (bequest.io.adapters: the layouts on disk)
    tensors: dict[str, torch.Tensor]  # its safetensors file
    labels: list[str] | None = None  # labels.json: the classes of the classifier trained with it, in id order

    def host_task(self, host_config) -> str:
        """The head the host needs: a classifier for SEQ_CLS modules, an LM head for CAUSAL_LM ones; a
        module saved without a task type (plain peft's PeftModel) sits on the host as the host is saved."""
        task_type = self.config.get("task_type")
        return HOST_TASKS.get(task_type, "base") if task_type else task_of(host_config)

    def num_labels(self, family) -> int | None:
        """Labels of the classifier saved with the module (None without one)."""
        path = family.heads.get("classifier")
        for key, t in self.tensors.items():
            if path and (key == f"{path}.weight" or key.endswith(f".{path}.weight")):
                return t.shape[0]
        return None


def virtual_tokens(kind: str, settings) -> int:
    """Sequence positions a fresh module of `kind` takes before the text (`settings`: `PeftFields`)."""
    return settings.virtual_tokens if KINDS[kind].takes_positions else 0


# ---------------------------------------------------------------- folders


def read_module(folder: str | Path) -> Module:
    """A module folder in any layout bequest reads (`bequest.io.adapters`), validated: a known type, a
    readable config, safetensors only (never unpickled)."""
    folder = Path(folder)
    config, weights = read_adapter_config(folder)
    kind = BY_TYPE.get(config.get("peft_type"))
    if kind is None:
        raise BequestError(
            f"{folder}: peft type {config.get('peft_type')!r} cannot be ported; bequest ports " + ", ".join(BY_TYPE)
        )
    if not weights.exists():
        pickled = weights.with_suffix(".bin")
        note = f" (only {pickled.name}: bequest never unpickles, re-save with safe_serialization=True)"
        raise BequestError(f"{folder}: no {weights.name}{note if pickled.exists() else ''}")
    read_header(weights)  # a truncated file fails here with a clear message, not inside safetensors
    return Module(kind.name, config, load_file(str(weights)), _read_labels(folder / LABELS))


def _read_labels(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text())["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("names is not a list of strings")
        return names
    except (ValueError, KeyError, TypeError) as e:
        raise BequestError(f"{path}: unreadable classes ({type(e).__name__}: {e}); fix or delete it") from None


def write_module(folder: str | Path, module: Module) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = write_adapter_config(folder, as_dict(module.config))
    save_file({k: t.contiguous() for k, t in module.tensors.items()}, str(weights))
    if module.labels is not None:
        (folder / LABELS).write_text(json.dumps({"num_labels": len(module.labels), "names": module.labels}, indent=1))


def write_adapter(folder: str | Path, module: Module, host_config, tokenizer=None, *, operation: str, parent: str,
                  recipe: dict | None = None, lineage: dict | None = None) -> None:
    """An adapter folder other tools read fully: the module with its host as a reference they can
    follow, a classifier's classes (labels.json), the tokenizer limited to the positions the text
    has beside any virtual tokens, the recipe and a lineage card. `host_config`: the host it was
    trained or placed on; `lineage`: fields the operation adds to the card."""
    folder = Path(folder)
    task = module.host_task(host_config)
    labels = module.labels or (_classes(module, host_config) if task == "seq_cls" else None)
    config = {**module.config, "base_model_name_or_path": reference(parent)}
    write_module(folder, Module(module.kind, config, module.tensors, labels))
    if tokenizer is not None:
        room = anatomy(host_config, task).usable_positions
        save_tokenizer(folder, tokenizer, room and room - (config.get("num_virtual_tokens") or 0))
    if recipe is not None:
        save_recipe(folder, recipe)
    kind = KINDS[module.kind]
    write_card(folder, operation=operation, parent=str(parent), recipe=recipe, lineage=lineage, task=task,
               library=kind.library, note=_loading(kind, task, config))


def _classes(module: Module, host_config) -> list[str]:
    """The classes of a module's classifier: the host's names when the counts agree (LABEL_i otherwise)."""
    n = module.num_labels(family_of(host_config)) or host_config.num_labels
    names = label_names(host_config) if host_config.num_labels == n else []
    return names or [f"LABEL_{i}" for i in range(n)]


def _loading(kind: Kind, task: str, config: dict) -> str:
    """How the folder loads: with plain peft (a classifier's host built with the classes in labels.json),
    or, for a kind of bequest's own, with bequest; and whether `bequest export` folds it into its base."""
    auto, base, labels = AUTO_CLASSES[task], config["base_model_name_or_path"], ""
    if kind.library == "peft":
        lines = ["import json", "from peft import PeftModel", f"from transformers import {auto}", ""]
        if task == "seq_cls":
            lines.append('names = json.load(open("FOLDER/labels.json"))["names"]')
            labels = ", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}"
        lines += [f"host = {auto}.from_pretrained({base!r}{labels})", 'model = PeftModel.from_pretrained(host, "FOLDER")']
        how = "Load it with plain peft"
    else:
        lines = ["from bequest.io import load_model", "from bequest.peft import attach, read_module", "",
                 'module = read_module("FOLDER")']
        if task == "seq_cls":
            labels = ", num_labels=len(module.labels)"
        lines += [f"host, tokenizer = load_model({base!r}, {task!r}{labels})", "model = attach(host, module)"]
        how = (f"This is bequest's own {kind.name} format (docs/bottleneck-format.md in bequest's repository), not a "
               "peft folder. Load it with bequest")
    text = f"\n{how}:\n\n```python\n" + "\n".join(lines) + "\n```\n"
    if kind.unmergeable(config) is None:
        text += "\n`bequest export FOLDER OUT` folds it into the base's weights: a plain transformers model folder.\n"
    return text


def new_config(kind: str, model, settings=None, **overrides) -> dict:
    """A fresh module's config for `model`, its targets named through the anatomy roles.

    `settings`: a recipe carrying `PeftFields` (default: their defaults); `overrides` replace its values."""
    from bequest.recipe import PeftFields  # the recipe reads KINDS: imported late, not at load

    if kind not in KINDS:
        raise BequestError(f"unknown PEFT type {kind!r}; choose one of: {', '.join(KINDS)}")
    given = settings.model_dump(include=set(PeftFields.model_fields)) if settings is not None else {}
    anat = anatomy(model)
    return KINDS[kind].config(anat.family, PEFT_TASKS[anat.task], PeftFields(**{**given, **overrides}))


# ---------------------------------------------------------------- modules on hosts


def with_module(model, config: dict, *, trainable: bool = True):
    """`model` carrying a freshly initialised module of `config` (peft's PeftModel, or the host itself
    with bequest's own kinds hooked in). Seed the global RNG first for a reproducible init."""
    # A copy: peft extends the lists it is given (modules_to_save) in place, and the caller's module keeps its own.
    config = copy.deepcopy({k: v for k, v in config.items() if k not in ("peft_version", "auto_mapping")})
    return BY_TYPE[config["peft_type"]].wrap(model, {**config, "inference_mode": not trainable}, trainable)


def _carrier(model) -> tuple[Kind, dict] | None:
    """(the kind of module `model` carries, its config), or None for a bare model."""
    for kind in KINDS.values():
        config = kind.carried(model)
        if config is not None:
            return kind, config
    return None


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if t.is_meta else t.detach().cpu().clone()  # a skeleton's stay shapes


def module_of(model) -> Module:
    """The module a model carries, as it would be saved."""
    kind, config = _carrier(model)
    tensors = {k: _copy(t) for k, t in kind.state(model).items()}
    config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or config.get("base_model_name_or_path")
    return Module(kind.name, config, tensors)


def expected(config: dict, host_config, task: str, num_labels: int | None) -> tuple[dict, dict[str, tuple]]:
    """(the config refilled for this host, {tensor name: shape} a module of `config` has on it).

    Built on a weightless (meta) skeleton of the host: nothing is loaded or allocated.
    """
    kind = BY_TYPE[config["peft_type"]]
    host_config = copy.deepcopy(host_config)
    if task == "seq_cls" and num_labels:
        host_config.num_labels = num_labels
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = with_module(build_model(host_config, task), kind.skeleton(dict(config)), trainable=False)
        module = module_of(model)
    refilled = {**config, **{k: module.config[k] for k in kind.host_fields if k in config}}
    return refilled, {k: tuple(t.shape) for k, t in module.tensors.items()}


def misfits(tensors: dict[str, torch.Tensor], want: dict[str, tuple]) -> list[str]:
    """Every way `tensors` fails to fill the places `want` lists, one line each (empty: a perfect fit)."""
    lines = [f"{k} is {list(t.shape)}, the host needs {list(want[k])}"
             for k, t in tensors.items() if k in want and tuple(t.shape) != want[k]]
    lines += [f"{k} has no place on the host" for k in tensors if k not in want]
    lines += [f"the host's {k} has no tensor in the module" for k in want if k not in tensors]
    return lines


def attach(model, module: Module, *, trainable: bool = False):
    """`model` carrying the saved `module`; refuses a partial fit instead of loading what matches. A
    classifier host takes on the module's class names."""
    if module.labels and task_of(model.config) == "seq_cls" and model.config.num_labels == len(module.labels):
        name_labels(model.config, module.labels)
    carrier = with_module(model, module.config, trainable=trainable)
    want = {k: tuple(t.shape) for k, t in module_of(carrier).tensors.items()}
    problems = misfits(module.tensors, want)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BequestError(f"the {module.kind} module does not fit this host: {problems[0]}{more}; port it with `bequest port`")
    KINDS[module.kind].load(carrier, module.tensors)
    return carrier


def save_tuned(folder: Path, model, tokenizer, *, parent: str, operation: str, recipe: dict,
               lineage: dict | None = None) -> None:
    """A full fine-tune as a model folder; a PEFT module as an adapter folder (tokenizer beside it);
    `lineage`: fields the operation adds to the card."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    card = dict(operation=operation, parent=str(parent), recipe=recipe, lineage=lineage)
    if _carrier(model) is not None:
        write_adapter(folder, module_of(model), model.config, tokenizer, **card)
    else:
        write_model(folder, model, tokenizer, **card)


__all__ = ["KINDS", "LABELS", "Kind", "Module", "as_dict", "attach", "expected", "misfits",
           "module_of", "new_config", "read_module", "save_tuned", "target_regex", "virtual_tokens", "with_module",
           "write_adapter", "write_module"]
