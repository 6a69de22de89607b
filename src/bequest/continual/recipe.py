"""The `bequest learn` recipe, and what each continual-learning method does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from bequest import data
from bequest.errors import BequestError
from bequest.recipe import LoraFields, OutputFields, TrainFields, TuningFields, defaults

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


@defaults(max_len=128, eval_examples=300)
class LearnRecipe(TuningFields, LoraFields, TrainFields, OutputFields):
    model: str = Field(..., description="model folder to fine-tune (any family; --classify generate needs a causal LM)")
    out: str = Field(..., description="output folder: matrix.json, metrics.json, heatmap.png and the final model")
    tasks: str = Field(",".join(data.TASKS), description="comma-separated embedded tasks, trained in this order")
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

    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in data.TASKS]
        if unknown:
            raise BequestError(f"unknown task {unknown[0]!r} in --tasks; choose from: {', '.join(data.TASKS)}")
        if not names or len(set(names)) != len(names):
            raise BequestError(f"--tasks {self.tasks!r} must name each task once; e.g. {','.join(data.TASKS[:3])}")
        return names
