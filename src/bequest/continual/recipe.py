"""The `bequest learn` recipe, what each continual-learning method does, and the stream of tasks it names."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from bequest import data
from bequest.errors import BequestError
from bequest.recipe import (
    LoraFields, ModelFolder, OutputFields, TaskFields, TrainFields, TuningFields, defaults, without,
)

# What each method does from the second task on: which MIGU mask its gradients get (None, "magnitude":
# MIGU's, "random": as many rows at random, the ablation) and whether earlier tasks are replayed.
METHODS = {
    "seq": {"mask": None, "replay": False},
    "migu": {"mask": "magnitude", "replay": False},
    "replay": {"mask": None, "replay": True},
    "migu+replay": {"mask": "magnitude", "replay": True},
    "random-mask": {"mask": "random", "replay": False},
}
Method = Literal[tuple(METHODS)]
Classify = Literal["head", "generate"]
Scope = Literal["linear", "all"]


@without("data")  # a stream names its tasks in --tasks; the file settings read every file task alike
@defaults(max_len=128, eval_examples=300)
class LearnRecipe(TaskFields, TuningFields, LoraFields, TrainFields, OutputFields):
    model: ModelFolder = Field(..., description="model folder or cached hub id to fine-tune (any family; "
                              "--classify generate needs a causal LM)")
    out: str = Field(..., description="output folder: matrix.json, metrics.json, heatmap.png and the final model")
    tasks: str = Field(",".join(data.TASKS), description="comma-separated tasks, trained in this order: embedded "
                       f"tasks ({', '.join(data.TASKS)}) and your labelled .jsonl/.csv/.parquet files or folders "
                       "of them, each named after its file or folder (paths with commas cannot be listed)")
    method: Method = Field("migu", description="continual-learning method")
    classify: Classify = Field("head", description="'head' (a classifier per task's labels) or 'generate' (the LM names the label)")
    lora: bool = Field(False, description="train LoRA adapters (and the head) instead of every weight")
    threshold: float = Field(0.7, ge=0.0, lt=1.0, description="MIGU's T: the FRACTION of each layer's output rows masked (gradient zeroed), not a magnitude (migu, random-mask)")
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

    def task_list(self) -> list[tuple[str, str]]:
        """(name, task as given) of each task in order: an embedded task is its own name; a file task is
        named after its file's stem or its folder, and is read as `bequest finetune --data` reads it."""
        given = [t.strip() for t in self.tasks.split(",")]
        for i in range(len(given)):  # a path with a comma would be cut in pieces here: say so, never guess
            for j in range(i + 2, len(given) + 1):
                if Path(",".join(given[i:j])).exists():
                    raise BequestError(f"--tasks: {','.join(given[i:j])!r} has a comma, which separates tasks; "
                                       "rename it without one")
        given = [t for t in given if t]
        for t in given:
            if t not in data.TASKS and not Path(t).exists():
                raise BequestError(f"unknown task {t!r} in --tasks: neither an embedded task ({', '.join(data.TASKS)}) "
                                   "nor a file or folder; fix the name or the path")
        if not given:
            raise BequestError(f"--tasks {self.tasks!r} names no task; e.g. {','.join(data.TASKS[:3])}")
        named: dict[str, str] = {}
        for t in given:
            name = t if t in data.TASKS else task_name(t)
            if name in named:
                raise BequestError(f"--tasks names the task {name!r} twice ({named[name]}, {t}); name each task once "
                                   "(a file task is named after its file's stem or its folder: rename one)")
            named[name] = t
        return list(named.items())


def task_name(path: str) -> str:
    """A file task's name: its file's stem (reviews.jsonl: reviews) or its folder's name."""
    p = Path(path)
    return p.resolve().name if p.is_dir() else p.stem
