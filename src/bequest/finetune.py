"""`bequest finetune`: tune a model on one classification task, in full or as a PEFT module.

The task weights that recyclable tuning (`bequest recycle`) carries to an upgraded base come from here:
a full fine-tune is a normal `seq_cls` model folder, a PEFT module (LoRA by default) a peft adapter
folder whose classifier head is saved beside it. An LM checkpoint gets a fresh, seeded head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
import yaml
from pydantic import Field

from bequest import data
from bequest.anatomy import anatomy
from bequest.engine import TrainFields, labelled, prepare_work, processes, train, train_flops_per_token
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_config, write_model
from bequest.port.modules import KINDS, load_host, module_of, new_config, with_module, write_module


class TaskFields(TrainFields):
    """What every verb that tunes on a classification task reads its data with."""

    data: str = Field("domain", description=f"embedded task ({', '.join(data.TASKS)}) or a labelled data file")
    max_len: int = Field(64, ge=8, description="tokens per example (texts are truncated)")
    train_examples: int | None = Field(None, ge=1, description="training examples (default: all)")
    eval_examples: int = Field(200, ge=1, description="validation examples in each evaluation")


class FinetuneRecipe(TaskFields):
    model: str = Field(..., description="model folder to tune (an LM gets a fresh classifier head)")
    out: str = Field(..., description="output: a seq_cls model folder, or an adapter folder with --peft")
    peft: str | None = Field(None, description=f"train a PEFT module instead of every weight: {', '.join(KINDS)}")
    rank: int = Field(8, ge=1, description="LoRA rank")
    virtual_tokens: int = Field(8, ge=1, description="virtual tokens of prefix and prompt tuning")
    overwrite: bool = Field(False, description="replace an existing output folder")


def task_splits(name_or_path: str, *, train_examples: int | None = None, eval_examples: int | None = None):
    """(train, validation) Datasets with text and label, from an embedded task name or a labelled file."""
    if name_or_path in data.TASKS:
        train_set, eval_set = data.load_task(name_or_path, "train"), data.load_task(name_or_path, "validation")
    elif Path(name_or_path).exists():
        train_set = data.load_labeled_files(name_or_path, "train")
        eval_set = data.load_labeled_files(name_or_path, "validation")
    else:
        raise BequestError(f"--data {name_or_path!r} is neither an embedded task ({', '.join(data.TASKS)}) nor a file")
    if train_examples:
        train_set = train_set.select(range(min(train_examples, len(train_set))))
    if eval_examples:
        eval_set = eval_set.select(range(min(eval_examples, len(eval_set))))
    return train_set, eval_set


def tokenized(r: TaskFields, tokenizer) -> tuple:
    """(train, eval, number of labels) ready for the engine."""
    train_set, eval_set = task_splits(r.data, train_examples=r.train_examples, eval_examples=r.eval_examples)
    labels = train_set.features["label"].num_classes
    return labelled(train_set, tokenizer, r.max_len), labelled(eval_set, tokenizer, r.max_len), labels


def load_tokenizer(model_dir: str | Path):
    if not (Path(model_dir) / "tokenizer.json").exists():
        raise BequestError(f"{model_dir} has no tokenizer.json; save the tokenizer beside the weights")
    return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def check_length(model_dir: str, max_len: int, virtual: int = 0) -> None:
    a = anatomy(load_config(model_dir))
    room = a.positions - a.family.position_offset
    if a.positions and max_len + virtual > room:
        raise BequestError(f"--max-len {max_len} (+{virtual} virtual tokens) exceeds {model_dir}'s {room} positions")


def curve(work: Path) -> list[tuple[int, float]]:
    """(step, eval accuracy) of a run, read back from its metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    return sorted({r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}.items())


def save_tuned(folder: Path, model, tokenizer, *, parent: str, operation: str, recipe: dict) -> None:
    """A full fine-tune as a model folder; a PEFT module as an adapter folder (tokenizer beside it)."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    if hasattr(model, "peft_config") or getattr(model, "bottleneck_config", None) is not None:
        module = module_of(model)
        module.config["base_model_name_or_path"] = str(parent)
        write_module(folder, module)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    else:
        write_model(folder, model, tokenizer, operation=operation, parent=str(parent), recipe=recipe)


def finetune(r: FinetuneRecipe, *, progress: bool = True) -> dict:
    """Fine-tune a model on a classification task (every weight, or a PEFT module plus the head)."""
    state = processes()
    check_output(r.out, r.overwrite)
    if r.peft is not None and r.peft not in KINDS:
        raise BequestError(f"--peft {r.peft!r} is not a PEFT type; choose one of: {', '.join(KINDS)}")
    check_length(r.model, r.max_len, r.virtual_tokens if r.peft in ("prefix", "prompt") else 0)
    train_set, eval_set, labels = tokenized(r, load_tokenizer(r.model))
    model, tokenizer = load_host(r.model, "seq_cls", labels, seed=r.seed)
    if r.peft:
        torch.manual_seed(r.seed)
        model = with_module(model, new_config(r.peft, model, rank=r.rank, virtual_tokens=r.virtual_tokens))
    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    flops = train_flops_per_token(anatomy(load_config(r.model), "seq_cls"), r.max_len)
    metrics = train(model, tokenizer, "seq_cls", train_set, eval_set, work, r, flops_per_token=flops, progress=progress)
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            save_tuned(folder, model, tokenizer, parent=r.model, operation="finetune", recipe=recipe)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
        print(f"saved {r.out}: eval accuracy {metrics['eval_accuracy']:.3f}")
    state.wait_for_everyone()
    return metrics
