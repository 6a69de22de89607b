"""`bequest finetune`: tune a model on one classification task, in full or as a PEFT module.

The task weights that recyclable tuning (`bequest recycle`) carries to an upgraded base come from here:
a full fine-tune is a normal `seq_cls` model folder, a PEFT module (LoRA by default) a peft adapter
folder whose classifier head is saved beside it. An LM checkpoint gets a fresh, seeded head.
"""

from __future__ import annotations

import json

import torch
from pydantic import Field

from bequest.anatomy import anatomy, name_labels
from bequest.data.prepare import check_room, task_sets
from bequest.engine import prepare_work, processes, train, train_flops_per_token
from bequest.io import atomic_dir, check_output, load_config, load_model, load_tokenizer
from bequest.peft import new_config, save_tuned, virtual_tokens, with_module
from bequest.recipe import ModelFolder, OutputFields, PeftFields, PeftKind, TaskFields, TrainFields, TuningFields
from bequest.report import write_report


class FinetuneRecipe(TaskFields, TuningFields, PeftFields, TrainFields, OutputFields):
    model: ModelFolder = Field(..., description="model folder or cached hub id to tune (an LM gets a fresh "
                              "classifier head)")
    out: str = Field(..., description="output: a seq_cls model folder, or an adapter folder with --peft")
    peft: PeftKind | None = Field(None, description="train a PEFT module instead of every weight")


def finetune(r: FinetuneRecipe, *, progress: bool = True) -> dict:
    """Fine-tune a model on a classification task (every weight, or a PEFT module plus the head)."""
    state = processes()
    check_output(r.out, r.overwrite)
    virtual = virtual_tokens(r.peft, r) if r.peft else 0
    check_room(anatomy(load_config(r.model)), r.max_len + virtual, "--max-len (with virtual tokens)", r.model)
    train_set, eval_set, labels = task_sets(r, load_tokenizer(r.model, required="fine-tuning"))
    model, tokenizer = load_model(r.model, "seq_cls", num_labels=labels, seed=r.seed)
    name_labels(model.config, train_set.features["label"].names)
    if r.peft:
        torch.manual_seed(r.seed)
        model = with_module(model, new_config(r.peft, model, r))
    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    flops = train_flops_per_token(anatomy(load_config(r.model), "seq_cls"), r.max_len)
    metrics = train(model, tokenizer, "seq_cls", train_set, eval_set, work, r, flops_per_token=flops, progress=progress)
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            save_tuned(folder, model, tokenizer, parent=r.model, operation="finetune", recipe=recipe)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
            write_report(folder, r.out)
        print(f"saved {r.out}: eval accuracy {metrics['eval_accuracy']:.3f}")
    state.wait_for_everyone()
    return metrics
