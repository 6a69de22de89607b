"""`bequest study port`: the portability grid of Sabry & Belz (EACL 2024) on bequest hosts.

PEFT type x host pair x init x seed. For each pair's source host and each type, one module is trained
on the task first (once; kept under `sources/`). Each run then puts a module on the pair's target host
- the source module ported (`ported`), a fresh one (`scratch`) or the ported tensors redrawn from
their own statistics (`sampled`) - and fine-tunes it there for the same steps, evaluating accuracy on
the way. A finished run leaves `runs/ID/row.json` and is skipped when the study runs again (an
interrupted run starts over); `results.jsonl`, `results.csv`, `report.md` and `report.png` are rebuilt
from every finished row at the end (`bequest.port.report`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import transformers
from pydantic import Field, field_validator

from bequest import data
from bequest.anatomy import anatomy
from bequest.data.prepare import check_room
from bequest.engine import curve, labelled, train
from bequest.errors import BequestError
from bequest.io import atomic_dir, load_config, load_model, save_recipe
from bequest.peft import KINDS, attach, module_of, new_config, read_module, virtual_tokens, with_module, write_module
from bequest.port.carry import INITS, Init, port_module
from bequest.port.report import write_report
from bequest.recipe import ModelFolder, PeftFields, PeftKind, Recipe, TrainFields, TuningFields, without


class Pair(Recipe):
    name: str = Field(..., description="the pair's label in tables and plots")
    source: ModelFolder = Field(..., description="host folder (or cached hub id) the modules are trained on (A)")
    target: ModelFolder = Field(..., description="host folder (or cached hub id) they are ported to (B)")


# Runs restart instead of resuming: they write no checkpoints; and their folders go, event files and all.
@without("save_every", "report_to")
class StudyRecipe(TuningFields, PeftFields, TrainFields):
    out: str = Field(..., description="study folder: sources/, runs/, results.jsonl/.csv, report.md/.png")
    pairs: list[Pair] = Field(..., description="host pairs (YAML: a list of {name, source, target})")
    types: list[PeftKind] = Field(list(KINDS), description="PEFT types, comma-separated on the command line")
    inits: list[Init] = Field(list(INITS), description="ported (the module carried over), scratch, sampled")
    seeds: list[int] = Field([0, 1, 2], description="seeds per condition (fresh units, baselines, data order)")
    data: str = Field("domain", description="embedded classification task")
    source_steps: int = Field(200, ge=1, description="steps training each source module on its source host")
    lrs: dict[PeftKind, float] = Field({}, description="learning rate per PEFT type (YAML mapping; others use --lr)")
    OLD_NAMES: ClassVar[dict[str, str]] = {"task": "data"}

    @field_validator("types", "inits", "seeds", mode="before")
    @classmethod
    def _commas(cls, v):  # the command line gives lists as "lora,ia3"
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("data")
    @classmethod
    def _known_task(cls, v):
        if v not in data.TASKS:
            raise ValueError(f"unknown task {v!r}; choose one of: {', '.join(data.TASKS)}")
        return v


class _NoSaves(transformers.TrainerCallback):
    """Runs restart instead of resuming, so the Trainer's checkpoints are only time spent."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = False


def _slug(path: str) -> str:
    return f"{Path(path).name}-{hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:6]}"


_DATA: dict[tuple, tuple] = {}  # tokenized task splits, shared by the runs of one process


def _datasets(r: StudyRecipe, tokenizer):
    if tokenizer is None:
        raise BequestError("a study host needs its tokenizer (tokenizer.json) beside the weights")
    key = (tokenizer.name_or_path, len(tokenizer), r.data, r.max_len, r.train_examples, r.eval_examples)
    if key not in _DATA:
        _DATA[key] = _tokenized(r, tokenizer)
    return _DATA[key]


def _tokenized(r: StudyRecipe, tokenizer):
    train_set = data.load_task(r.data, "train")
    evals = data.load_task(r.data, "validation")
    if r.train_examples:
        train_set = train_set.select(range(min(r.train_examples, len(train_set))))
    evals = evals.select(range(min(r.eval_examples, len(evals))))
    return labelled(train_set, tokenizer, r.max_len), labelled(evals, tokenizer, r.max_len)


def _spec(r: StudyRecipe, kind: str, steps: int, seed: int) -> TrainFields:
    fields = r.model_dump(include=set(TrainFields.model_fields))
    return TrainFields(**{**fields, "steps": steps, "seed": seed, "lr": r.lrs.get(kind, r.lr)})


def _check_positions(r: StudyRecipe, host: str, kind: str) -> None:
    """Virtual tokens take positions too (prompt tuning's inputs, prefix tuning's cache)."""
    extra = virtual_tokens(kind, r)
    check_room(anatomy(load_config(host)), r.max_len + extra, f"--max-len + {extra} virtual tokens", host)


def _fit(model, tokenizer, r: StudyRecipe, kind: str, steps: int, seed: int, work: Path) -> tuple[dict, list]:
    """Fine-tune the model's module on the task; (final metrics, [(step, accuracy), ...])."""
    train_set, eval_set = _datasets(r, tokenizer)
    final = train(model, tokenizer, "seq_cls", train_set, eval_set, work, _spec(r, kind, steps, seed),
                  callbacks=[_NoSaves()], resume=False, progress=False)
    accuracies = curve(work)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return final, accuracies


def source_module(r: StudyRecipe, host: str, kind: str) -> Path:
    """The module of `kind` trained on `host` for the task (trained once, then reused)."""
    folder = Path(r.out) / "sources" / _slug(host) / kind
    if folder.exists():
        return folder
    _check_positions(r, host, kind)
    labels = len(data.task_labels(r.data))
    model, tokenizer = load_model(host, "seq_cls", num_labels=labels, seed=r.seed)
    torch.manual_seed(r.seed)
    config = new_config(kind, model, r)
    model = with_module(model, config)
    work = folder.parent / f".{kind}.work"
    shutil.rmtree(work, ignore_errors=True)
    tick = time.perf_counter()
    final, curve = _fit(model, tokenizer, r, kind, r.source_steps, r.seed, work)
    module = module_of(model)
    module.config["base_model_name_or_path"] = str(host)
    with atomic_dir(folder) as tmp:
        write_module(tmp, module)
        (tmp / "source.json").write_text(json.dumps(
            {"host": str(host), "accuracy": final["eval_accuracy"], "curve": curve, "seconds": time.perf_counter() - tick}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"source {kind} on {host}: accuracy {final['eval_accuracy']:.3f}")
    return folder


def run(r: StudyRecipe, pair: Pair, kind: str, init: str, seed: int) -> dict:
    """One cell of the grid; its row (read back when it already finished)."""
    rid = f"{pair.name}-{kind}-{init}-s{seed}"
    folder = Path(r.out) / "runs" / rid
    if (folder / "row.json").exists():
        return json.loads((folder / "row.json").read_text())
    _check_positions(r, pair.target, kind)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tick = time.perf_counter()
    source = read_module(source_module(r, pair.source, kind))
    module, report = port_module(source, pair.target, init=init, seed=seed)
    write_module(folder / "module", module)
    model, tokenizer = load_model(pair.target, "seq_cls", num_labels=len(data.task_labels(r.data)), seed=seed)
    model = attach(model, module, trainable=True)
    final, curve = _fit(model, tokenizer, r, kind, r.steps, seed, folder)
    accs = [a for _, a in curve]
    row = {"id": rid, "pair": pair.name, "type": kind, "init": init, "seed": seed, "steps": r.steps,
           "accuracy_start": accs[0], "accuracy_final": final["eval_accuracy"], "accuracy_best": max(accs),
           "accuracy_mean": float(np.mean(accs)), "train_loss": final.get("train_loss"),
           "seconds": time.perf_counter() - tick, "mode": report["mode"], "tensors": report["tensors"], "curve": curve}
    tmp = folder / "row.json.tmp"
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, folder / "row.json")  # the row appears whole or not at all: that marks the run done
    print(f"{rid}: accuracy {row['accuracy_start']:.3f} -> {row['accuracy_final']:.3f} ({row['seconds']:.1f} s)")
    return row


def _same_settings(r: StudyRecipe, out: Path) -> None:
    """Finished runs are reused, so a study folder takes more cells of the grid, never other settings."""
    settings = r.model_dump(exclude={"out", "pairs", "types", "inits", "seeds"})
    pairs = {p.name: [p.source, p.target] for p in r.pairs}
    saved = out / "study.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        changed = sorted(k for k in settings if old["settings"].get(k) != settings[k])
        moved = sorted(n for n in pairs if n in old["pairs"] and old["pairs"][n] != pairs[n])
        if changed or moved:
            what = f"settings ({', '.join(changed)})" if changed else f"hosts of pair {moved[0]!r}"
            raise BequestError(f"{out} holds runs made with other {what}; use another --out or the same recipe")
        pairs = {**old["pairs"], **pairs}
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"settings": settings, "pairs": pairs}, indent=1))


def study(r: StudyRecipe) -> dict:
    """Run the portability grid (resumable: finished runs are skipped) and write its table and report."""
    out = Path(r.out)
    names = [p.name for p in r.pairs]
    if len(set(names)) != len(names):
        raise BequestError("two pairs share a name; give each pair its own name")
    _same_settings(r, out)
    save_recipe(out, r.model_dump())
    rows = [run(r, pair, kind, init, seed)
            for pair in r.pairs for kind in r.types for init in r.inits for seed in r.seeds]
    result = write_report(out, rows)
    print(f"study {out}: {len(rows)} runs; report in {out / 'report.md'}")
    return result
