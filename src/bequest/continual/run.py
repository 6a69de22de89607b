"""`bequest learn` itself: the task loop, then how the model, its Trainer and its output are made."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from bequest.anatomy import anatomy, build_model, family_of, name_labels
from bequest.continual.evaluate import accuracy
from bequest.continual.metrics import continual_metrics, heatmap
from bequest.continual.recipe import METHODS, LearnRecipe
from bequest.continual.tasks import Task, encode_generate, encode_head, padder
from bequest.data.prepare import check_room
from bequest.engine import prepare_work, processes, train, train_flops_per_token
from bequest.engine.migu import MIGU, MIGUTrainer
from bequest.engine.replay import Memory
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_config, load_model, write_model
from bequest.peft import KINDS, module_of, with_module, write_adapter
from bequest.peft.kind import head_modules
from bequest.report import write_report


def learn(r: LearnRecipe, *, progress: bool = True) -> dict:
    """Fine-tune a model through a stream of tasks; write the accuracy matrix (and every task's accuracy before
    training), ACC/BWT/FWT/forgetting and the model."""
    state = processes()
    check_output(r.out, r.overwrite)
    plan = METHODS[r.method]
    model, tokenizer, tasks = _prepare(r)
    flops = train_flops_per_token(anatomy(model), r.max_len)
    roots = _head_roots(model)
    if r.lora:
        model = _with_lora(model, r, r.classify == "head")
    trainer = _trainer(r, tasks, tokenizer)
    engine_task = "seq_cls" if r.classify == "head" else "causal_lm"
    memory = Memory(seed=r.seed, size=r.replay_memory)

    work = prepare_work(r.out, r.model_dump(exclude={"overwrite"}), r.overwrite)
    started = time.perf_counter()
    initial = [accuracy(model, u, tokenizer, r.classify) for u in tasks]  # before training: FWT's baseline
    if progress and state.is_main_process:
        print("before training: " + ", ".join(f"{u.name} {a:.3f}" for u, a in zip(tasks, initial)))
    matrix, runs = [], []
    for i, t in enumerate(tasks):
        folder = work / "tasks" / f"{i + 1}-{t.name}"
        if state.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)  # a stream always starts over: no stale rows
            folder.mkdir(parents=True)
        state.wait_for_everyone()
        train_set = memory.mix(t.train, r.replay_fraction, r.seed + i) if plan["replay"] else t.train
        callbacks = [_OnlyEverySave(r.save_every)]
        if plan["mask"] and i > 0:  # MIGU masks from the second task on; the first task learns freely
            callbacks.append(MIGU(model, r.threshold, random=plan["mask"] == "random", skip=roots, seed=r.seed + i,
                                  hold=r.hold, scope=r.scope))
        tick = time.perf_counter()
        final = train(model, tokenizer, engine_task, train_set, t.engine_eval, folder, r, flops_per_token=flops,
                      callbacks=callbacks, trainer_class=trainer, resume=False, progress=progress)
        trained = time.perf_counter() - tick
        matrix.append([accuracy(model, u, tokenizer, r.classify) for u in tasks])
        runs.append({"task": t.name, "train_seconds": trained, "examples": len(train_set),
                     **{k: final.get(k) for k in ("train_loss", "tokens", "flops")}})
        if plan["replay"]:
            memory.add(t.train)
        if progress and state.is_main_process:
            print(f"after {t.name}: " + ", ".join(f"{u.name} {a:.3f}" for u, a in zip(tasks, matrix[-1])))

    names = [t.name for t in tasks]
    metrics = {**continual_metrics(matrix, initial), "method": r.method, "lora": r.lora, "classify": r.classify,
               "tasks": names, "final_accuracy": dict(zip(names, matrix[-1])),
               "seconds": time.perf_counter() - started, "runs": runs}
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            for ckpt in folder.glob("tasks/*/checkpoints"):
                shutil.rmtree(ckpt, ignore_errors=True)
            labels = {t.name: t.labels for t in tasks}
            (folder / "matrix.json").write_text(json.dumps({"tasks": names, "labels": labels, "accuracy": matrix,
                                                            "initial": initial}, indent=1))
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
            title = f"{r.method}{' + LoRA' if r.lora else ''}: ACC {100 * metrics['average_accuracy']:.1f}"
            heatmap(matrix, names, folder / "heatmap.png", title, initial)
            _save(folder, model, tokenizer, r, r.model_dump())
            write_report(folder, r.out)
        bwt, fwt = ("n/a" if metrics[k] is None else f"{100 * metrics[k]:+.1f}" for k in ("bwt", "fwt"))
        print(f"saved {r.out}: average accuracy {100 * metrics['average_accuracy']:.1f}, BWT {bwt}, FWT {fwt}")
    state.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------- the model and its tasks


def _prepare(r: LearnRecipe):
    """(model, tokenizer, tasks): the model ready to train, every task tokenized, all checked up front."""
    listed = r.task_list()
    if r.classify == "generate":
        family = family_of(load_config(r.model))
        if "causal_lm" not in family.tasks:
            raise BequestError(f"{family.name} has no causal LM head to generate labels with; use --classify head")
    tasks, offset = [], 0
    for name, source in listed:
        tasks.append(Task(name, source, offset, r))
        offset += len(tasks[-1].labels)
    # Head mode loads the checkpoint as it was saved (no head left "newly initialised"), then swaps the head.
    model, tokenizer = load_model(r.model, task=None if r.classify == "head" else "causal_lm")
    a = anatomy(model)
    if tokenizer is None:
        raise BequestError(f"{r.model} has no tokenizer.json; save the tokenizer beside the model")
    check_room(a, r.max_len, "--max-len")
    if r.classify == "head":
        model = _union_head(model, [f"{t.name}:{label}" for t in tasks for label in t.labels], r.seed)
    encode = encode_head if r.classify == "head" else encode_generate
    return model, tokenizer, [encode(t, tokenizer, r) for t in tasks]


def _union_head(model, label_names: list[str], seed: int):
    """A classifier over the union of the stream's labels, with `model`'s body (any head it had is dropped)."""
    a = anatomy(model)
    config = copy.deepcopy(model.config)
    config.num_labels = len(label_names)
    name_labels(config, label_names)
    config.problem_type = "single_label_classification"
    transformers.set_seed(seed)
    fresh = build_model(config, "seq_cls")
    # Matched by role, not by name, so a base model's unprefixed names find their place too.
    names = anatomy(fresh).names(n for n, _ in fresh.named_parameters())
    slots = a.slots(n for n, _ in model.named_parameters())
    body = {names[str(s)]: p.detach() for n, p in model.named_parameters()
            if (s := slots[n]).role not in a.family.heads and str(s) in names}
    fresh.load_state_dict(body, strict=False)
    return fresh


def _head_roots(model) -> tuple[str, ...]:
    """Top modules of every task head (MIGU leaves them alone; LoRA trains the classifier in full)."""
    return tuple(sorted({path.split(".")[0] for path in anatomy(model).family.heads.values()}))


def _with_lora(model, r: LearnRecipe, head: bool):
    """LoRA on every block linear (the registry's LoRA), the union head trained in full beside it."""
    fam = anatomy(model).family
    keep = head_modules(fam) if head else None
    return with_module(model, KINDS["lora"].config(fam, None, r, modules_to_save=keep))


# ---------------------------------------------------------------- training


def _trainer(r: LearnRecipe, tasks: list[Task], tokenizer):
    """The Trainer class for every task: the union head's per-task softmax, or generate mode's padding."""
    if r.classify == "generate":
        return functools.partial(TaskTrainer, collate=padder(tokenizer.pad_token_id))
    n = tasks[-1].offset + len(tasks[-1].labels)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in tasks:
        allowed[t.offset : t.offset + len(t.labels), t.offset : t.offset + len(t.labels)] = True
    return functools.partial(TaskTrainer, allowed=allowed)


class TaskTrainer(MIGUTrainer):
    """MIGUTrainer that scores each example within its own task: the union head's per-task softmax, or the
    generate mode's collator."""

    def __init__(self, *args, allowed: torch.Tensor | None = None, collate=None, **kwargs):
        if collate is not None:  # the engine picks the collator by task; generate mode pads its own labels
            kwargs["data_collator"] = collate
        super().__init__(*args, **kwargs)
        self.allowed = allowed
        if allowed is not None:
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.allowed is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        # Each example's label says its task (label ranges do not overlap): other tasks' logits drop out.
        logits = outputs.logits.float().masked_fill(~self.allowed.to(labels.device)[labels], float("-inf"))
        outputs["logits"] = logits  # the engine's own evaluation then scores within the task too
        loss = F.cross_entropy(logits, labels)
        return (loss, outputs) if return_outputs else loss


class _OnlyEverySave(transformers.TrainerCallback):
    """The Trainer also saves at a run's last step; a stream never resumes, so keep only --save-every's."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            control.should_save = False


# ---------------------------------------------------------------- output


def _save(folder: Path, model, tokenizer, r: LearnRecipe, recipe: dict) -> None:
    """The final model as a plain HF folder; under LoRA also the adapter (adapter/), then merged."""
    if r.lora:
        write_adapter(folder / "adapter", module_of(model), model.config, tokenizer, operation="learn",
                      parent=str(r.model), recipe=recipe)
        model = model.merge_and_unload()
    write_model(folder, model, tokenizer, operation="learn", parent=str(r.model), recipe=recipe)
