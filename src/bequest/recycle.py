"""`bequest recycle`: recyclable tuning (Qin et al., Findings ACL 2023; docs/methods.md, section 3).

The base M_i was upgraded to M_{i+1} by continual pre-training (`continue_pretrain`, `bequest
continue-pretrain`), and task weights tuned on M_i exist. Instead of tuning M_{i+1} afresh:

- init: start from the old task weights. A full fine-tune becomes theta_{i+1} + (theta_i^task - theta_i)
  on every shared parameter, its task head (classifier, pooler) carried over as is; a PEFT module is
  loaded onto the new base unchanged, after checking that every tensor fits.
- distill: tune M_{i+1} with the old tuned model as teacher, through the engine's KD loss:
  (1 - alpha) * CE + alpha * T^2 * KL + beta * MSE(last hidden states).
- combined: the init start trained with the distillation loss.
- fresh: plain tuning of M_{i+1}, the baseline every method is measured against.

The output is what fine-tuning would give: a seq_cls model folder, or a PEFT adapter folder.
"""

from __future__ import annotations

import json
import shutil
from typing import ClassVar, Literal

import torch
from pydantic import Field

from bequest.anatomy import anatomy, name_labels
from bequest.data import same_tokenizer
from bequest.data.prepare import check_room, lm_splits, task_sets, text_splits
from bequest.engine import curve, forward_flops_per_token, prepare_work, processes, train, train_flops_per_token
from bequest.engine.kd import TeacherMeter
from bequest.errors import BequestError
from bequest.io import (
    atomic_dir, check_model, check_output, is_adapter, load_config, load_lm, load_model, load_tokenizer, write_model,
)
from bequest.peft import attach, read_module, save_tuned, with_module
from bequest.recipe import (
    CorpusFields, KDFields, ModelFolder, OutputFields, TaskFields, TrainFields, TuningFields, defaults,
)
from bequest.report import write_report
from bequest.task_weights import check_module_fits, delta_init, kd_trainer

# What each method does: start from the old task weights (moved to the new base), and/or learn from
# the old tuned model as a teacher.
METHODS = {
    "init": dict(start_old=True, teacher=False),
    "distill": dict(start_old=False, teacher=True),
    "combined": dict(start_old=True, teacher=True),
    "fresh": dict(start_old=False, teacher=False),
}
Method = Literal[tuple(METHODS)]


# ---------------------------------------------------------------- M_i -> M_{i+1}


class ContinueRecipe(CorpusFields, TrainFields, OutputFields):
    model: ModelFolder = Field(..., description="trained LM folder (or cached hub id) to continue pre-training (M_i); "
                              "its tokenizer is kept")
    out: str = Field(..., description="output model folder (M_{i+1})")


def continue_pretrain(r: ContinueRecipe) -> dict:
    """Continue pre-training a model on more text (another domain): the upgraded base, lineage recorded."""
    state = processes()
    check_output(r.out, r.overwrite)
    model, tokenizer, a = load_lm(r.model, r.seq_len, "continue pre-training")
    # The old tokenizer is kept whatever the corpus: recycled task weights index the same vocabulary.
    train_text, eval_text = text_splits(r)
    train_set, eval_set = lm_splits(train_text, eval_text, tokenizer, a.task, r)
    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    metrics = train(model, tokenizer, a.task, train_set, eval_set, work, r,
                    flops_per_token=train_flops_per_token(a, r.seq_len))
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            write_model(folder, model, tokenizer, operation="continue-pretrain", parent=str(r.model), recipe=recipe)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
            write_report(folder, r.out)
        print(f"saved {r.out}: eval loss {metrics['eval_loss']:.4f}")
    state.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------- the recipe


@defaults(alpha=0.5)
class RecycleRecipe(TaskFields, TuningFields, KDFields, TrainFields, OutputFields):
    out: str = Field(..., description="output: a seq_cls model folder (full fine-tune) or an adapter folder (PEFT)")
    old_base: ModelFolder = Field(..., description="the base the task weights were tuned on (M_i): a folder or "
                                 "cached hub id")
    new_base: ModelFolder = Field(..., description="the upgraded base (M_{i+1}) to carry them to: a folder or "
                                 "cached hub id")
    task_weights: str = Field(..., description="old task weights: a fine-tuned seq_cls folder or a peft adapter folder")
    method: Method = Field(
        "combined", description="init (old weights as start), distill (old model teaches), combined, fresh (baseline)"
    )
    beta: float = Field(0.0, ge=0.0, description="weight of the last-hidden-state MSE towards the old tuned model")
    OLD_NAMES: ClassVar[dict[str, str]] = {"temperature": "tau"}


def _full(r: RecycleRecipe, labels: int):
    """(student, teacher) for full fine-tunes; the teacher is the old tuned model itself."""
    tuned, _ = load_model(r.task_weights)
    if anatomy(tuned).task != "seq_cls":
        raise BequestError(f"{r.task_weights} is not a sequence classifier; give a fine-tuned model or adapter folder")
    if tuned.config.num_labels != labels:
        raise BequestError(f"{r.task_weights} predicts {tuned.config.num_labels} labels but --data has {labels}")
    plan = METHODS[r.method]
    if plan["start_old"]:
        old, _ = load_model(r.old_base, with_tokenizer=False)
        new, _ = load_model(r.new_base, with_tokenizer=False)
        student = delta_init(old, new, tuned)
    else:
        student, _ = load_model(r.new_base, "seq_cls", num_labels=labels, seed=r.seed, with_tokenizer=False)
    return student.train(), tuned if plan["teacher"] else None


def _peft(r: RecycleRecipe, labels: int):
    """(student, teacher) for PEFT modules; the teacher is the old base carrying the old module."""
    module = read_module(r.task_weights)
    config = load_config(r.new_base)
    task = module.host_task(config)  # seq_cls: recycle() refused other task types
    saved = module.num_labels(anatomy(config, task).family)
    if saved not in (None, labels):
        raise BequestError(f"{r.task_weights} predicts {saved} labels but --data has {labels}")
    check_module_fits(module, r.new_base, labels)
    host, _ = load_model(r.new_base, task, num_labels=labels, seed=r.seed, with_tokenizer=False)
    plan = METHODS[r.method]
    if plan["start_old"]:
        student = attach(host, module, trainable=True)
    else:
        torch.manual_seed(r.seed)
        student = with_module(host, module.config, trainable=True)
    teacher = None
    if plan["teacher"]:
        check_module_fits(module, r.old_base, labels)
        old, _ = load_model(r.old_base, task, num_labels=labels, seed=r.seed, with_tokenizer=False)
        teacher = attach(old, module, trainable=False)
    return student, teacher


def recycle(r: RecycleRecipe, *, progress: bool = True) -> dict:
    """Carry task weights tuned on an old base to its upgrade: init, distill, combined (or fresh)."""
    state = processes()
    check_output(r.out, r.overwrite)
    for base in (r.old_base, r.new_base):  # every model argument, whichever the method reads later
        anatomy(check_model(base))
    tokenizer = load_tokenizer(r.new_base, required="recycling")
    old_tokenizer = load_tokenizer(r.old_base)
    if old_tokenizer is not None and not same_tokenizer(tokenizer, old_tokenizer):
        raise BequestError("the old and new bases have different vocabularies; recycling needs the same tokenizer")
    peft = is_adapter(r.task_weights)
    config = read_module(r.task_weights).config if peft else {}
    if peft and config.get("task_type") != "SEQ_CLS":
        raise BequestError(f"{r.task_weights} is a {config.get('task_type')} module; recycle tunes sequence classifiers")
    tokens = r.max_len + (config.get("num_virtual_tokens") or 0)
    check_room(anatomy(load_config(r.new_base)), tokens, "--max-len (with virtual tokens)", r.new_base)
    train_set, eval_set, labels = task_sets(r, tokenizer)
    # Everything is loaded and checked before the work folder exists: a misfit leaves nothing behind.
    student, teacher = (_peft if peft else _full)(r, labels)
    name_labels(student.config, train_set.features["label"].names)
    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    shape = anatomy(load_config(r.new_base), "seq_cls")
    flops = train_flops_per_token(shape, r.max_len)
    # The teacher's forward passes are part of distillation's price: counted, as knowledge inheritance does.
    meter = TeacherMeter(teacher_flops_per_token=forward_flops_per_token(shape, r.max_len), flops_per_token=flops)
    trainer = {} if teacher is None else {"trainer_class": kd_trainer(teacher, r, meter)}
    metrics = train(student, tokenizer, "seq_cls", train_set, eval_set, work, r, flops_per_token=flops,
                    progress=progress, **trainer)
    metrics.update(meter.fields(metrics["tokens"]), curve=curve(work))
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            save_tuned(folder, student, tokenizer, parent=r.new_base, operation=f"recycle-{r.method}", recipe=recipe)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
            write_report(folder, r.out)
        start = metrics["curve"][0][1] if metrics["curve"] else float("nan")
        print(f"saved {r.out}: {r.method}, eval accuracy {start:.3f} at step 0 -> {metrics['eval_accuracy']:.3f}")
    state.wait_for_everyone()
    return metrics
