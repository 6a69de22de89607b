"""`bequest learn`: continual fine-tuning through a stream of tasks, without forgetting (METHODS.md section 5).

One model is fine-tuned on the tasks one after another; after each task every task is evaluated, which
fills the accuracy matrix R[i][j] (accuracy on task j after training task i). From it: the average
accuracy after the last task, backward transfer (BWT) and forgetting.

How labels are predicted (`--classify`):
- `head` (every family): ONE classification head over the union of all the tasks' labels, each task's
  labels at their own offset (`domain:text`, ..., `kind:module`, ...). Training restricts every
  example's softmax to its own task's labels and evaluation takes the argmax inside the task's range, so
  the head rows of a task receive no gradient from any other task: it behaves as one head per task
  (task-incremental learning) while a replayed batch can mix tasks freely. The body is shared, so what
  one task changes there is what another forgets. Heads are never masked: their rows belong to their task.
- `generate` (causal families): the LM continues `TEXT\\nTASK:` with the label's name; evaluation ranks the
  task's label names by their summed log-likelihood (rank classification) and takes the best.

Methods: `seq` (plain sequential fine-tuning), `migu` (the MIGU mask from the second task on,
`bequest.engine.migu`), `replay` (rehearsal: a bounded memory of earlier tasks' training examples, mixed
into each later task's training set so that a `--replay-fraction` of the examples are replayed),
`migu+replay`, and `random-mask` (as many rows masked as MIGU, chosen at random: the ablation).
`--scope all` masks embeddings, norms and biases too (the paper leaves them free; in full fine-tuning
they carry much of what is forgotten). Full fine-tuning or LoRA (`--lora`: the LoRA A and B matrices are
trained and masked, base weights frozen, the head trained in full). Each task is one run of the engine
(fresh AdamW and schedule); an interrupted stream starts again from its first task.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset, concatenate_datasets
from pydantic import Field, model_validator

from bequest import data
from bequest.anatomy import anatomy, build_model, family_of
from bequest.data.prepare import check_room
from bequest.engine import labelled, prepare_work, processes, train, train_flops_per_token
from bequest.engine.migu import MIGU, MIGUTrainer
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_config, load_model, write_model
from bequest.recipe import LoraFields, OutputFields, TrainFields, TuningFields, defaults

Method = Literal["seq", "migu", "replay", "migu+replay", "random-mask"]
Classify = Literal["head", "generate"]
Scope = Literal["linear", "all"]


@defaults(max_len=128, eval_examples=300)
class LearnRecipe(TuningFields, LoraFields, TrainFields, OutputFields):
    model: str = Field(..., description="model folder to fine-tune (any family; --classify generate needs a causal LM)")
    out: str = Field(..., description="output folder: matrix.json, metrics.json, heatmap.png and the final model")
    tasks: str = Field(",".join(data.TASKS), description="comma-separated embedded tasks, trained in this order")
    method: Method = Field("migu", description="continual-learning method")
    classify: Classify = Field("head", description="'head' (a classifier per task's labels) or 'generate' (the LM names the label)")
    lora: bool = Field(False, description="train LoRA adapters (and the head) instead of every weight")
    threshold: float = Field(0.7, ge=0.0, lt=1.0, description="MIGU's T: fraction of each layer's output rows whose gradient is zeroed (migu, random-mask)")
    scope: Scope = Field("linear", description="what MIGU masks: 'linear' layers (the paper), or 'all': embeddings, norms and biases too, by the same output-feature magnitudes")
    hold: bool = Field(False, description="masked rows keep their values through the optimizer step (AdamW's momentum and weight decay would otherwise still move them)")
    replay_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="fraction of a later task's training examples drawn from the replay memory (replay methods)")
    replay_memory: int = Field(1000, ge=1, description="earlier tasks' examples kept for replay, shared equally among them")
    steps_per_task: int | None = Field(None, ge=1, description="optimizer steps on each task (default 100)")
    steps: int | None = Field(None, ge=1, description="the same as --steps-per-task, under the name other verbs use")
    save_every: int = Field(1_000_000, ge=1, description="checkpoint every N steps within a task, for inspection only: a stream restarts from its first task (default: never)")

    @model_validator(mode="after")
    def _one_step_count(self):
        if self.steps is not None and self.steps_per_task is not None and self.steps != self.steps_per_task:
            raise ValueError(f"steps ({self.steps}) and steps_per_task ({self.steps_per_task}) disagree; give one")
        self.steps = self.steps_per_task = self.steps_per_task or self.steps or 100
        return self

    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in data.TASKS]
        if unknown:
            raise BequestError(f"unknown task {unknown[0]!r} in --tasks; choose from: {', '.join(data.TASKS)}")
        if not names or len(set(names)) != len(names):
            raise BequestError(f"--tasks {self.tasks!r} must name each task once; e.g. {','.join(data.TASKS[:3])}")
        return names


# ---------------------------------------------------------------- metrics


def continual_metrics(matrix) -> dict:
    """Average accuracy after the last task, backward transfer and forgetting of an accuracy matrix.

    R[i][j] is the accuracy on task j after training task i (square, T x T). BWT = mean over j < T-1 of
    R[T-1][j] - R[j][j]; forgetting = mean over j < T-1 of max_{i < T-1} R[i][j] - R[T-1][j]. With one
    task there is nothing to forget: both are None.
    """
    r = np.asarray(matrix, dtype=float)
    last = r.shape[0] - 1
    out = {"average_accuracy": float(r[last].mean()), "bwt": None, "forgetting": None}
    if last > 0:
        out["bwt"] = float(np.mean([r[last, j] - r[j, j] for j in range(last)]))
        out["forgetting"] = float(np.mean([r[:last, j].max() - r[last, j] for j in range(last)]))
    return out


def heatmap(matrix, tasks: list[str], path: Path, title: str) -> None:
    """The accuracy matrix as a colour grid with its values written in (Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure

    r = np.asarray(matrix, dtype=float) * 100
    fig = Figure(figsize=(1.1 * len(tasks) + 2.5, 0.9 * len(tasks) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            ax.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="white" if r[i, j] < 60 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ---------------------------------------------------------------- tasks as data


class Task:
    """One task of the stream: its training set, its evaluation examples, and how it is scored."""

    def __init__(self, name: str, offset: int):
        self.name, self.offset = name, offset
        self.labels = data.task_labels(name)
        self.train = self.engine_eval = None
        self.eval_inputs: list = []  # head: tokenized examples; generate: prompt ids
        self.eval_labels: list[int] = []  # local label ids
        self.answers: list[list[int]] = []  # generate: each label's tokens


def _head_task(t: Task, tokenizer, r: LearnRecipe) -> Task:
    def encoded(split: str, limit: int | None):
        ds = data.load_task(t.name, split)
        ds = ds.select(range(min(limit or len(ds), len(ds))))
        shifted = Dataset.from_dict({"text": list(ds["text"]), "label": [y + t.offset for y in ds["label"]]})
        return labelled(shifted, tokenizer, r.max_len)

    t.train = encoded("train", r.train_examples)
    evals = encoded("validation", r.eval_examples)
    t.eval_inputs, t.eval_labels = evals, [y - t.offset for y in evals["label"]]
    t.engine_eval = evals.select(range(min(32, len(evals))))
    return t


def _generate_task(t: Task, tokenizer, r: LearnRecipe) -> Task:
    """Prompt `TEXT\\nTASK:` (the text truncated to fit), answer ` LABEL</s>`; only the answer is learned."""
    if tokenizer.eos_token_id is None:
        raise BequestError("--classify generate ends each answer with the tokenizer's eos token, and it has none")
    t.answers = [tokenizer(f" {name}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for name in t.labels]
    cue = tokenizer(f"\n{t.name}:", add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = r.max_len - len(bos) - len(cue) - max(map(len, t.answers))
    if room < 1:
        raise BequestError(f"--max-len {r.max_len} leaves no room for the text before the {t.name} answer; raise it")

    def prompts(split: str, limit: int | None):
        ds = data.load_task(t.name, split)
        ds = ds.select(range(min(limit or len(ds), len(ds))))
        bodies = tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]
        return [bos + b[:room] + cue for b in bodies], list(ds["label"])

    ids, labels = prompts("train", r.train_examples)
    full = [p + t.answers[y] for p, y in zip(ids, labels)]
    t.train = Dataset.from_dict({
        "input_ids": full,
        "attention_mask": [[1] * len(f) for f in full],
        "labels": [[-100] * len(p) + t.answers[y] for p, y in zip(ids, labels)],
    })
    t.eval_inputs, t.eval_labels = prompts("validation", r.eval_examples)
    t.engine_eval = Dataset.from_dict({
        "input_ids": [p + t.answers[y] for p, y in zip(t.eval_inputs[:32], t.eval_labels)],
        "labels": [[-100] * len(p) + t.answers[y] for p, y in zip(t.eval_inputs[:32], t.eval_labels)],
    }).map(lambda ex: {"attention_mask": [1] * len(ex["input_ids"])})
    return t


def _padder(pad_id: int):
    """Right-pad input_ids (pad), attention_mask (0) and labels (-100) to the longest in the batch."""

    def collate(features):
        n = max(len(f["input_ids"]) for f in features)

        def fill(key, value):
            return torch.tensor([list(f[key]) + [value] * (n - len(f[key])) for f in features])

        return {"input_ids": fill("input_ids", pad_id), "attention_mask": fill("attention_mask", 0), "labels": fill("labels", -100)}

    return collate


# ---------------------------------------------------------------- replay


class Memory:
    """Earlier tasks' training examples for rehearsal: at most `size` in all, shared equally by the tasks seen."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.kept = size, seed, []

    def add(self, examples: Dataset) -> None:
        rng = random.Random(self.seed + len(self.kept))
        self.kept.append(examples.select(rng.sample(range(len(examples)), min(len(examples), self.size))))
        share = max(1, self.size // len(self.kept))  # samples are random, so a prefix is a smaller random sample
        self.kept = [d.select(range(min(share, len(d)))) for d in self.kept]

    def mix(self, examples: Dataset, fraction: float, seed: int) -> Dataset:
        """`examples` plus replayed ones making up `fraction` of the result (repeated if memory is short)."""
        if not self.kept:
            return examples
        pool = concatenate_datasets(self.kept)
        n = round(fraction / (1 - fraction) * len(examples))
        rng = random.Random(seed)
        picks = [i for _ in range(n // len(pool) + 1) for i in rng.sample(range(len(pool)), len(pool))][:n]
        return concatenate_datasets([examples, pool.select(picks)])


# ---------------------------------------------------------------- training and scoring


class _StreamTrainer(MIGUTrainer):
    """MIGUTrainer with the per-task softmax of the union head, or the generate mode's collator."""

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


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _head_accuracy(model, t: Task, tokenizer, batch: int = 64) -> float:
    collate = transformers.DataCollatorWithPadding(tokenizer)
    hits = 0
    for rows in _batches(list(t.eval_inputs), batch):
        inputs = collate([{k: v for k, v in row.items() if k != "label"} for row in rows])
        logits = model(**inputs).logits[:, t.offset : t.offset + len(t.labels)]
        hits += int((logits.argmax(-1) == torch.tensor([row["label"] - t.offset for row in rows])).sum())
    return hits / len(t.eval_labels)


@torch.no_grad()
def _generate_accuracy(model, t: Task, pad_id: int, batch: int = 64) -> float:
    """Rank classification: the label whose tokens the LM finds most likely after the prompt."""
    pairs = [(p, a) for p in t.eval_inputs for a in t.answers]
    scores = []
    for chunk in _batches(pairs, batch):
        n = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), n), pad_id)
        mask, answer = torch.zeros(len(chunk), n, dtype=torch.long), torch.zeros(len(chunk), n)
        for k, (p, a) in enumerate(chunk):
            ids[k, : len(p) + len(a)] = torch.tensor(p + a)
            mask[k, : len(p) + len(a)] = 1
            answer[k, len(p) : len(p) + len(a)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        scores.append((logp.gather(-1, ids[:, 1:, None])[..., 0] * answer[:, 1:]).sum(1))
    best = torch.cat(scores).view(len(t.eval_inputs), len(t.answers)).argmax(1)
    return float((best == torch.tensor(t.eval_labels)).float().mean())


def _union_head(model, label_names: list[str], seed: int):
    """A classifier over the union of the stream's labels, with `model`'s body (any head it had is dropped)."""
    a = anatomy(model)
    config = copy.deepcopy(model.config)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
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
    from peft import LoraConfig, get_peft_model

    fam = anatomy(model).family
    targets = sorted({path for role, path in fam.layer.items() if role.startswith(("attn.", "mlp."))})
    classifier = fam.heads["classifier"].split(".")[0]
    config = LoraConfig(r=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=[classifier] if head else None, fan_in_fan_out=fam.conv1d)
    return get_peft_model(model, config)


def _prepare(r: LearnRecipe):
    """(model, tokenizer, tasks): the model ready to train, every task tokenized, all checked up front."""
    names = r.task_list()
    if r.classify == "generate":
        family = family_of(load_config(r.model))
        if "causal_lm" not in family.tasks:
            raise BequestError(f"{family.name} has no causal LM head to generate labels with; use --classify head")
    tasks, offset = [], 0
    for name in names:
        tasks.append(Task(name, offset))
        offset += len(tasks[-1].labels)
    # Head mode loads the checkpoint as it was saved (no head left "newly initialised"), then swaps the head.
    model, tokenizer = load_model(r.model, task=None if r.classify == "head" else "causal_lm")
    a = anatomy(model)
    if tokenizer is None:
        raise BequestError(f"{r.model} has no tokenizer.json; save the tokenizer beside the model")
    check_room(a, r.max_len, "--max-len")
    if r.classify == "head":
        model = _union_head(model, [f"{t.name}:{label}" for t in tasks for label in t.labels], r.seed)
    build = _head_task if r.classify == "head" else _generate_task
    return model, tokenizer, [build(t, tokenizer, r) for t in tasks]


def _trainer(r: LearnRecipe, tasks: list[Task], tokenizer):
    """The Trainer class for every task: the union head's per-task softmax, or generate mode's padding."""
    if r.classify == "generate":
        return functools.partial(_StreamTrainer, collate=_padder(tokenizer.pad_token_id))
    n = tasks[-1].offset + len(tasks[-1].labels)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in tasks:
        allowed[t.offset : t.offset + len(t.labels), t.offset : t.offset + len(t.labels)] = True
    return functools.partial(_StreamTrainer, allowed=allowed)


def learn(r: LearnRecipe, *, progress: bool = True) -> dict:
    """Fine-tune a model through a stream of tasks; write the accuracy matrix, ACC/BWT/forgetting and the model."""
    state = processes()
    check_output(r.out, r.overwrite)
    model, tokenizer, tasks = _prepare(r)
    flops = train_flops_per_token(anatomy(model), r.max_len)
    roots = _head_roots(model)
    if r.lora:
        model = _with_lora(model, r, r.classify == "head")
    trainer = _trainer(r, tasks, tokenizer)
    engine_task = "seq_cls" if r.classify == "head" else "causal_lm"
    memory = Memory(r.replay_memory, r.seed)
    replay, masking = "replay" in r.method, r.method in ("migu", "migu+replay", "random-mask")

    def accuracy(t: Task) -> float:
        model.eval()
        if r.classify == "head":
            return _head_accuracy(model, t, tokenizer)
        return _generate_accuracy(model, t, tokenizer.pad_token_id)

    work = prepare_work(r.out, r.model_dump(exclude={"overwrite"}), r.overwrite)
    matrix, runs, started = [], [], time.perf_counter()
    for i, t in enumerate(tasks):
        folder = work / "tasks" / f"{i + 1}-{t.name}"
        if state.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)  # a stream always starts over: no stale rows
            folder.mkdir(parents=True)
        state.wait_for_everyone()
        train_set = memory.mix(t.train, r.replay_fraction, r.seed + i) if replay else t.train
        callbacks = [_OnlyEverySave(r.save_every)]
        if masking and i > 0:  # MIGU masks from the second task on; the first task learns freely
            callbacks.append(MIGU(model, r.threshold, random=r.method == "random-mask", skip=roots, seed=r.seed + i,
                                  hold=r.hold, scope=r.scope))
        tick = time.perf_counter()
        final = train(model, tokenizer, engine_task, train_set, t.engine_eval, folder, r, flops_per_token=flops,
                      callbacks=callbacks, trainer_class=trainer, resume=False, progress=progress)
        trained = time.perf_counter() - tick
        matrix.append([accuracy(u) for u in tasks])
        runs.append({"task": t.name, "train_seconds": trained, "examples": len(train_set),
                     **{k: final.get(k) for k in ("train_loss", "tokens", "flops")}})
        if replay:
            memory.add(t.train)
        if progress and state.is_main_process:
            print(f"after {t.name}: " + ", ".join(f"{u.name} {a:.3f}" for u, a in zip(tasks, matrix[-1])))

    names = [t.name for t in tasks]
    metrics = {**continual_metrics(matrix), "method": r.method, "lora": r.lora, "classify": r.classify,
               "tasks": names, "final_accuracy": dict(zip(names, matrix[-1])),
               "seconds": time.perf_counter() - started, "runs": runs}
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            for ckpt in folder.glob("tasks/*/checkpoints"):
                shutil.rmtree(ckpt, ignore_errors=True)
            labels = {t.name: t.labels for t in tasks}
            (folder / "matrix.json").write_text(json.dumps({"tasks": names, "labels": labels, "accuracy": matrix}, indent=1))
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
            title = f"{r.method}{' + LoRA' if r.lora else ''}: ACC {100 * metrics['average_accuracy']:.1f}"
            heatmap(matrix, names, folder / "heatmap.png", title)
            _save(folder, model, tokenizer, r, r.model_dump())
        bwt = "n/a" if metrics["bwt"] is None else f"{100 * metrics['bwt']:+.1f}"
        print(f"saved {r.out}: average accuracy {100 * metrics['average_accuracy']:.1f}, BWT {bwt}")
    state.wait_for_everyone()
    return metrics


def _save(folder: Path, model, tokenizer, r: LearnRecipe, recipe: dict) -> None:
    """The final model as a plain HF folder; under LoRA also the adapter (adapter/), then merged."""
    if r.lora:
        model.save_pretrained(folder / "adapter")
        model = model.merge_and_unload()
    write_model(folder, model, tokenizer, operation="learn", parent=str(r.model), recipe=recipe)
