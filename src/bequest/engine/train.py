"""The one training path: transformers.Trainer (and so accelerate), plus bequest's bookkeeping.

Every method trains through `train()`; it adds FLOP counting, metrics.jsonl, a NaN guard and
resume-from-checkpoint, and otherwise leaves the Trainer alone so `accelerate launch` scales it.
A run that grows (engine/growing.py) calls it once per `Phase`: a stretch of the same run, with the
same schedule, at one size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import safe_globals

from bequest.engine.data import collator
from bequest.errors import BequestError
from bequest.io import hold, let_go, make_dir, partial_dir, read_header
from bequest.recipe import TrainFields


def processes() -> PartialState:
    """This process's place among the launched ones (gloo on CPU-only machines, NCCL on GPUs).

    Ask here, never with a bare PartialState(): created first without cpu=True it would pin a
    CPU-only torchrun/accelerate launch to a single process.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def prepare_work(out: str | Path, recipe: dict, overwrite: bool) -> Path:
    """A run's hidden `.OUT.partial` folder: resumed if it holds the same recipe, refused if another."""
    state = processes()
    work = partial_dir(out)
    saved = work / "recipe.yaml"
    if state.is_main_process and work.exists():
        hold(work)  # refused while another run trains into the same OUT
        progress = _progress(work)
        if overwrite or not progress:  # nothing there worth keeping (say, a run stopped by a NaN)
            let_go(work)
            shutil.rmtree(work)
        elif _saved_recipe(saved) != recipe:
            raise BequestError(
                f"{work} holds an unfinished run of other settings ({progress}); rerun with the settings "
                "in its recipe.yaml to resume it, or pass --overwrite to start over"
            )
    if state.is_main_process:
        hold(make_dir(work))
        saved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    state.wait_for_everyone()
    return work


def _saved_recipe(path: Path) -> dict | None:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _progress(work: Path) -> str | None:
    """What an unfinished run has achieved that a rerun would resume from (None: nothing)."""
    for name, what in (("trainer_state.json", "a checkpoint"), ("stage.json", "a finished stage"),
                       ("eval.json", "a finished generation")):
        found = sorted(work.rglob(name))
        if found:
            return f"{what} in {found[-1].parent}"
    return None


@dataclass(frozen=True)
class Phase:
    """A stretch of a run at one size (all of it, unless it grows while training): where its checkpoints go,
    the step it stops at (None: the run's last), and the tokens and FLOPs spent before it (at other sizes)."""

    checkpoints: Path
    stop: int | None = None
    tokens: int = 0
    flops: int = 0

    def flops_at(self, tokens: int, flops_per_token: int) -> int:
        return self.flops + (tokens - self.tokens) * flops_per_token


class _Bookkeeping(transformers.TrainerCallback):
    """metrics.jsonl (one JSON object per log or eval), FLOPs so far, and the NaN guard."""

    def __init__(self, path: Path, flops_per_token: int, perplexity: bool, phase: Phase | None = None):
        self.path, self.flops_per_token, self.perplexity = path, flops_per_token, perplexity
        self.phase = phase or Phase(path.parent / "checkpoints")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        loss = logs.get("loss", logs.get("eval_loss"))
        if loss is not None and not math.isfinite(loss):
            raise BequestError(
                f"loss became {loss} at step {state.global_step}; lower --lr or check the data for empty examples"
            )
        if self.perplexity and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if state.is_world_process_zero:
            row = {"step": state.global_step, "tokens": state.num_input_tokens_seen}
            row["flops"] = self.phase.flops_at(row["tokens"], self.flops_per_token)
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, **logs}) + "\n")


class _StopAt(transformers.TrainerCallback):
    """Ends the Trainer's run at `step` with a checkpoint there, the schedule still counting to max_steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = control.should_save = True
        return control


def _accuracy(pred: transformers.EvalPrediction) -> dict:
    return {"accuracy": float((np.asarray(pred.predictions) == np.asarray(pred.label_ids)).mean())}


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was fully written; a kill mid-save leaves one without its state file.

    The Trainer writes trainer_state.json last, so its presence marks a finished checkpoint. Unfinished
    ones are removed, or the Trainer would resume from them.
    """
    if not folder.is_dir():
        return None
    done = None
    for ckpt in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        if (ckpt / "trainer_state.json").exists():
            done = ckpt
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return str(done) if done else None


def resume_point(folder: Path) -> str | None:
    """The checkpoint every process resumes from: the main process's newest complete one in `folder`."""
    last = _last_complete_checkpoint(folder) if processes().is_main_process else None
    if processes().num_processes > 1:
        last = broadcast_object_list([last])[0]
    return last


def checkpoint_step(ckpt: str | Path) -> int:
    return int(Path(ckpt).name.split("-")[-1])


def _check_checkpoint(ckpt: Path) -> None:
    """Read every file the Trainer will resume from, before it does: a bad one is named, with the way out."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        for f in sorted(ckpt.glob("*.safetensors")):
            read_header(f)
        with safe_globals():  # the Trainer's own restricted loader, numpy's RNG state allowed
            for f in sorted([*ckpt.glob("*.pt"), *ckpt.glob("*.pth")]):
                torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever breaks the read (truncation, bad JSON, a refused pickle)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BequestError(
            f"checkpoint {ckpt} is unreadable ({reason[:160]}); delete that folder to resume from the one before, "
            "or pass --overwrite to start over"
        ) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, forget the rows logged past the checkpoint: they will be logged again."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


# transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name now warns): the name
# this version has.
_CHECKPOINTING = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                      if name in {f.name for f in dataclasses.fields(transformers.TrainingArguments)})


def _passed_on(spec: TrainFields, model) -> dict:
    """The settings the Trainer applies itself (precision, checkpointing, logging), as TrainingArguments.
    The recipe refused what this machine cannot do; what this model cannot do is refused here."""
    if spec.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise BequestError(f"{type(model).__name__} cannot recompute its activations; drop --gradient-checkpointing")
    # Prefix tuning hands its virtual keys and values to the blocks as an attention cache, and a recomputed
    # block would append its own to that cache a second time.
    if spec.gradient_checkpointing and any(getattr(c, "peft_type", None) == "PREFIX_TUNING"
                                           for c in getattr(model, "peft_config", {}).values()):
        raise BequestError("prefix tuning cannot recompute activations (its virtual keys and values live in the "
                           "blocks' attention cache); drop --gradient-checkpointing")
    return {
        "bf16": spec.bf16,
        "fp16": spec.fp16,
        _CHECKPOINTING: spec.gradient_checkpointing,
        # Not re-entrant: a PEFT module's frozen host still passes gradients through the recomputed blocks.
        f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False} if spec.gradient_checkpointing else None,
        "report_to": spec.report_targets(),
    }


def arguments(spec: TrainFields, model, checkpoints: Path, progress: bool = True,
              report: bool = True) -> transformers.TrainingArguments:
    """The Trainer's settings for a run of `spec` on `model` writing its checkpoints into `checkpoints`
    (`report`: to the --report-to targets; off for evaluations that are no part of the run's log)."""
    passed_on = _passed_on(spec, model)
    if not report:
        passed_on["report_to"] = "none"
    return transformers.TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.lr,
        lr_scheduler_type="cosine",
        warmup_steps=spec.warmup,
        weight_decay=spec.weight_decay,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=spec.eval_every,
        eval_on_start=True,  # the untrained point anchors every loss-vs-FLOPs curve (not on resume)
        save_strategy="steps",
        save_steps=spec.save_every,
        save_total_limit=2,
        logging_steps=max(1, min(10, spec.eval_every)),
        logging_nan_inf_filter=False,  # a NaN must reach the guard, not be averaged away
        include_num_input_tokens_seen=True,
        seed=spec.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **passed_on,
    )


def train(
    model,
    tokenizer,
    task: str,
    train_set,
    eval_set,
    work: Path,
    spec: TrainFields,
    *,
    flops_per_token: int = 0,
    callbacks: list | None = None,
    trainer_class=transformers.Trainer,
    resume: bool = True,
    progress: bool = True,
    phase: Phase | None = None,
) -> dict:
    """Train `model` in `work` (checkpoints/ and metrics.jsonl live there); return final eval metrics.

    With a `phase`, only that stretch of the run: checkpoints in its folder, FLOPs counted on from its
    start, and, where it stops before the run's end, a checkpoint at its stop and no closing evaluation."""
    work = Path(work)
    phase = phase or Phase(work / "checkpoints")
    args = arguments(spec, model, phase.checkpoints, progress)
    classify = task == "seq_cls"
    metrics_path = work / "metrics.jsonl"
    last = resume_point(phase.checkpoints) if resume else None
    if last and processes().is_main_process:
        _truncate_metrics(metrics_path, checkpoint_step(last))
    if last:
        _check_checkpoint(Path(last))
    args.eval_on_start = last is None  # a resumed run already has its starting point logged
    bookkeeping = _Bookkeeping(metrics_path, flops_per_token, not classify, phase)
    stop = [] if phase.stop is None else [_StopAt(phase.stop)]
    trainer = trainer_class(
        model=model,
        args=args,
        data_collator=collator(task, tokenizer),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        compute_metrics=_accuracy if classify else None,
        preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if classify else None,
        callbacks=[bookkeeping, *stop, *(callbacks or [])],
    )
    if not progress:  # quiet means quiet: no per-log dict printed either
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:  # TENSORBOARD_LOGGING_DIR wins
            callback.logging_dir = str(work / "runs")  # beside metrics.jsonl, so it lands in the output
    run = trainer.train(resume_from_checkpoint=last)
    final = dict(run.metrics)
    if phase.stop is None:
        final.update(trainer.evaluate())
        if not classify:
            final["eval_perplexity"] = math.exp(min(final["eval_loss"], 50.0))
    tokens = trainer.state.num_input_tokens_seen
    final["flops"] = phase.flops_at(tokens, flops_per_token)
    final["tokens"] = tokens
    final["is_main"] = trainer.is_world_process_zero()
    return final


def evaluate(model, tokenizer, task: str, eval_set, spec: TrainFields, folder: Path,
             trainer_class=transformers.Trainer) -> dict:
    """`model`'s validation metrics as `train` takes them, logged nowhere (`folder`: the run's checkpoints)."""
    args = arguments(spec, model, folder, progress=False, report=False)
    trainer = trainer_class(model=model, args=args, data_collator=collator(task, tokenizer), eval_dataset=eval_set,
                            processing_class=tokenizer)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer.evaluate()


def metric_rows(work: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none before its first log)."""
    path = Path(work) / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines() if r] if path.exists() else []


def curve(work: Path) -> list[tuple[int, float]]:
    """(step, eval accuracy) of a run, read back from its metrics.jsonl."""
    return sorted({r["step"]: r["eval_accuracy"] for r in metric_rows(work) if "eval_accuracy" in r}.items())


@torch.no_grad()
def accuracy(model, tokenizer, dataset, batch_size: int = 32) -> float:
    """Share of `dataset` (labelled examples, as `engine.data.labelled` makes them) a classifier gets right."""
    collate = collator("seq_cls", tokenizer)
    training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        hits += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(training)
    return hits / max(1, len(dataset))
