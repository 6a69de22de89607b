"""Growth during training (progressive stacking, Gong et al. 2019): one run, one learning-rate schedule,
a model that grows deeper at given steps.

The run is trained in phases through `train()`, each at one size, with the schedule counting to the
run's last step throughout. A phase stops at its growth step with a checkpoint; growth works from that
checkpoint to a checkpoint of the grown model that the next phase resumes from, as any run resumes:

- the model: grown by the caller's function (a `bequest.grow` operator; `stack` is not
  function-preserving, so the validation loss is taken before and after);
- AdamW's moments: along the same index maps as the weights (`grow_optimizer_state`), so a copied block
  keeps its source's history; the step counter stays;
- the scheduler, RNG and data position: the stopped phase's, unchanged, so the schedule goes on and no
  batch is seen twice.

Phase 0 checkpoints into work/checkpoints, phase k into work/checkpoints/phase-k; the grown checkpoint
appears there complete (written aside, then renamed), so the newest phase folder holding a checkpoint
is where a killed run resumes, at that phase's size. Every growth is a row of metrics.jsonl
({"step", "tokens", "flops", "growth": {...}}); the next phase counts its FLOPs on from it.

Width growth is refused: a unit split by a width operator changes its gradients' scale, which moved
moments do not follow yet.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from bequest.anatomy import anatomy
from bequest.engine.flops import train_flops_per_token
from bequest.engine.train import (
    Phase, arguments, checkpoint_step, evaluate, metric_rows, processes, resume_point, train,
)
from bequest.errors import BequestError
from bequest.io import load_model
from bequest.recipe import TrainFields

WIDTHS = ("hidden", "heads", "kv_heads", "ffn")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def train_growing(
    model,
    tokenizer,
    task: str,
    train_set,
    eval_set,
    work: Path,
    spec: TrainFields,
    growths: list[tuple[int, Callable]],
    *,
    seq_len: int,
    trainer_class=transformers.Trainer,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """(the trained model, its final metrics): `train()` for `spec.steps` steps, the model grown at each
    (step, grow) of `growths` by `grow(model) -> bequest.grow.Grown`. FLOPs are counted at each phase's
    size (`seq_len`: tokens per block). Without growths, this is `train()`."""
    run = _Run(Path(work), tokenizer, task, eval_set, spec, seq_len, trainer_class)
    steps = [step for step, _ in growths]
    if steps != sorted(set(steps)) or not all(0 < s < spec.steps for s in steps):
        raise BequestError(f"growth steps {steps} must increase and lie within 1..{spec.steps - 1}")
    folders = [run.work / "checkpoints"] + [run.work / "checkpoints" / f"phase-{k}" for k in range(1, len(steps) + 1)]
    k = max((j for j in range(1, len(folders)) if resume_point(folders[j])), default=0)
    if k:  # resumed after a growth: the model at that phase's size (the Trainer loads the same weights again)
        model = _load(resume_point(folders[k]))
    while True:
        stop = steps[k] if k < len(steps) else None
        start = run.start(steps[k - 1]) if k else (0, 0)
        phase = Phase(folders[k], stop, *start)
        last = resume_point(phase.checkpoints)
        if stop is None or last is None or checkpoint_step(last) < stop:
            metrics = train(model, tokenizer, task, train_set, eval_set, run.work, spec, phase=phase,
                            flops_per_token=run.flops_per_token(model), trainer_class=trainer_class,
                            progress=progress)
        if stop is None:
            return model, metrics
        model = run.grow(phase, folders[k + 1], growths[k][1])
        k += 1


def growth_events(work: Path) -> list[dict]:
    """The growth rows of a run's metrics.jsonl, in order."""
    return [r for r in metric_rows(work) if "growth" in r]


@dataclass
class _Run:
    work: Path
    tokenizer: object
    task: str
    eval_set: object
    spec: TrainFields
    seq_len: int
    trainer_class: type

    def flops_per_token(self, model) -> int:
        return train_flops_per_token(anatomy(model), self.seq_len)

    def start(self, step: int) -> tuple[int, int]:
        """(tokens, FLOPs) the run had spent at its growth at `step`, as that growth logged them."""
        event = next((e for e in growth_events(self.work) if e["step"] == step), None)
        if event is None:
            raise BequestError(f"{self.work}/metrics.jsonl has no record of the growth at step {step}; pass "
                               "--overwrite to start the run over")
        return event["tokens"], event["flops"]

    def grow(self, phase: Phase, folder: Path, grow: Callable):
        """Grow the checkpoint at `phase`'s stop into `folder` (model and optimizer state; the rest as it
        was), log the growth, and return the grown model as the next phase trains it."""
        pre = phase.checkpoints / f"checkpoint-{phase.stop}"
        old = _load(pre)
        grown = grow(old)
        was, now = anatomy(old), anatomy(grown.model)
        widened = [k for k in WIDTHS if getattr(was, k) != getattr(now, k)]
        if widened:
            raise BequestError(f"growth during training grows depth only, not {', '.join(widened)}; widen a saved "
                               "model with `bequest grow`")
        before, after = (evaluate(m, self.tokenizer, self.task, self.eval_set, self.spec, phase.checkpoints,
                                  self.trainer_class)["eval_loss"] for m in (old, grown.model))
        tokens = json.loads((pre / "trainer_state.json").read_text())["num_input_tokens_seen"]
        event = {"step": phase.stop, "tokens": tokens, "flops": phase.flops_at(tokens, self.flops_per_token(old)),
                 "growth": {"from": _sizes(was), "to": _sizes(now), "depth": grown.maps["depth"],
                            "layers": grown.maps["layers"], "loss_before": before, "loss_after": after}}
        from bequest.grow import grow_optimizer_state

        optimizer = grow_optimizer_state(torch.load(pre / "optimizer.pt", map_location="cpu", weights_only=True),
                                         old, grown.model, grown.maps, (self.layout(old), self.layout(grown.model)))
        if processes().is_main_process:
            _log(self.work, event)  # first: a run killed before the checkpoint grows again
            aside = folder / f".{pre.name}.tmp"
            shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir(parents=True)
            for f in pre.iterdir():
                if f.is_file() and not (f.name in MODEL_FILES or f.name.startswith("model-") or f.name in
                                        ("optimizer.pt", "trainer_state.json")):
                    shutil.copy2(f, aside / f.name)
            grown.model.save_pretrained(aside, safe_serialization=True)
            torch.save(optimizer, aside / "optimizer.pt")
            shutil.copy2(pre / "trainer_state.json", aside / "trainer_state.json")
            aside.rename(folder / pre.name)  # complete, or not there at all
        processes().wait_for_everyone()
        return _load(folder / pre.name)

    def layout(self, model) -> list[list[str]]:
        """The names of the parameters in each group of the optimizer the Trainer builds for `model`."""
        names = {id(p): n for n, p in model.named_parameters()}
        args = arguments(self.spec, model, self.work / "checkpoints", progress=False, report=False)
        trainer = self.trainer_class(model=model, args=args, eval_dataset=self.eval_set)
        return [[names[id(p)] for p in g["params"]] for g in trainer.create_optimizer().param_groups]


def _load(ckpt: str | Path):
    model, _ = load_model(ckpt, with_tokenizer=False)
    return model.train()


def _log(work: Path, event: dict) -> None:
    """`event` appended to metrics.jsonl, replacing a record of the same growth a killed run left."""
    rows = [r for r in metric_rows(work) if not ("growth" in r and r["step"] == event["step"])]
    path = work / "metrics.jsonl"
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text("".join(json.dumps(r) + "\n" for r in [*rows, event]))
    aside.replace(path)


def _sizes(a) -> dict:
    return {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn}
