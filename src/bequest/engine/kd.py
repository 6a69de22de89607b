"""Knowledge distillation for the one training path: the loss, the alpha schedules, a Trainer.

Used by knowledge inheritance (a small teacher guides a bigger student's pre-training, docs/methods.md,
section 2) and reusable by any method that distils: recyclable tuning adds the hidden-state term.

    loss = (1 - alpha) * CE + alpha * tau^2 * KL(teacher^tau || student^tau) + beta * MSE(hidden)

averaged over the positions that carry a label. The teacher runs in eval mode under no_grad, is never
part of the student (so neither the optimizer nor a checkpoint sees it), and is skipped entirely while
alpha_t = 0; its forward FLOPs are counted for the steps where it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from bequest.anatomy import task_of
from bequest.errors import BequestError

SCHEDULES = ("linear", "constant", "switch")


def alpha_at(schedule: str, step: int, t_ki: int, alpha0: float = 1.0) -> float:
    """The distillation weight at optimizer step `step` (0-based).

    linear (KI paper): alpha0 * max(1 - step / t_ki, 0); switch: alpha0 before t_ki, then 0;
    constant: alpha0 at every step (t_ki ignored).
    """
    if schedule == "constant":
        return float(alpha0)
    if schedule == "switch":
        return float(alpha0) if step < t_ki else 0.0
    if schedule == "linear":
        return float(alpha0) * max(1.0 - step / t_ki, 0.0) if t_ki > 0 else 0.0
    raise BequestError(f"unknown alpha schedule {schedule!r}; use one of: {', '.join(SCHEDULES)}")


def _positions(x: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Rows of `x` (one per prediction) aligned with `labels`; causal LMs predict token t+1 at t."""
    if shift:
        x = x[:, :-1]
    return x.reshape(-1, x.shape[-1])


def _targets(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    return (labels[:, 1:] if shift else labels).reshape(-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits,
    labels: torch.Tensor,
    *,
    alpha: float,
    tau: float = 2.0,
    top_k: int | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    beta: float = 0.0,
    student_hidden: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """(loss, parts): the distillation loss over labelled positions, and its detached parts.

    `teacher_logits` is the teacher's full logits, or a (values, indices) pair of its top-K logits per
    position (what `precompute_topk` stores), or None when alpha = 0. Logits are [batch, seq, vocab]
    for LMs (pass shift=True for causal LMs) or [batch, classes] for sequence classification.

    Top-K: the teacher is renormalised over its K largest logits; the student keeps its log-probs
    over the FULL vocabulary, read at those K indices. KL against the sub-normalised student stays >= 0
    and also pushes the student's mass out of the tokens the teacher left out; at K = vocab it is
    the full loss (up to summation order).
    """
    y = _targets(labels, shift)
    keep = y != ignore_index
    s = _positions(student_logits, labels, shift)[keep].float()
    y = y[keep]
    if y.numel() == 0:  # e.g. an MLM batch where nothing was masked: nothing to learn from
        zero = student_logits.sum() * 0.0
        return zero, {"ce": zero.detach()}
    ce = F.cross_entropy(s, y)
    loss, parts = ce, {"ce": ce.detach()}
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs the teacher's logits")
        log_q = F.log_softmax(s / tau, dim=-1)
        if isinstance(teacher_logits, torch.Tensor) and top_k is None:
            t = _positions(teacher_logits, labels, shift)[keep].float()
            if t.shape != s.shape:
                raise BequestError(
                    f"teacher gives {t.shape[-1]} logits per position, student {s.shape[-1]}; "
                    "KD needs a shared vocabulary (or label set)"
                )
            log_p = F.log_softmax(t / tau, dim=-1)
        else:
            values, index = (
                teacher_logits if isinstance(teacher_logits, tuple) else teacher_logits.topk(top_k, dim=-1)
            )
            if top_k is not None:
                values, index = values[..., :top_k], index[..., :top_k]  # top-k comes sorted
            values = _positions(values, labels, shift)[keep].float()
            index = _positions(index, labels, shift)[keep].long()
            log_p = F.log_softmax(values / tau, dim=-1)
            log_q = log_q.gather(-1, index)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        loss = (1.0 - alpha) * ce + alpha * tau**2 * kl
        parts["kl"] = kl.detach()
    if beta > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("beta > 0 needs both hidden states")
        if student_hidden.shape != teacher_hidden.shape:
            raise BequestError(
                f"hidden states differ in shape ({tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}); "
                "the hidden-state term needs models of the same width"
            )
        if student_hidden.dim() == student_logits.dim():  # a hidden state per prediction: the same positions
            hs = _positions(student_hidden, labels, shift)[keep].float()
            ht = _positions(teacher_hidden, labels, shift)[keep].float()
        else:  # sequence classification: one label, the hidden state of every real (unpadded) token
            real = (attention_mask.bool() if attention_mask is not None
                    else torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device))
            hs, ht = student_hidden[real].float(), teacher_hidden[real].float()
        mse = F.mse_loss(hs, ht)
        loss = loss + beta * mse
        parts["mse"] = mse.detach()
    parts["alpha"] = torch.tensor(float(alpha))
    return loss, parts


# ---------------------------------------------------------------- precomputed teacher


@torch.no_grad()
def precompute_topk(teacher, dataset, k: int, path: str | Path, batch_size: int = 16) -> Path:
    """Run the teacher once over `dataset` (packed causal-LM blocks) and store its top-K logits.

    One safetensors file: input_ids [N, T], values [N, T, K] (fp32 raw logits, tau applied later) and
    indices [N, T, K]. Causal LMs only: an MLM teacher sees freshly masked inputs every epoch.
    """
    if task_of(teacher.config) != "causal_lm":
        raise BequestError("precomputed teacher logits need a causal LM teacher; drop --precompute for masked LMs")
    mode = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    ids, values, index = [], [], []
    for i in range(0, len(dataset), batch_size):
        batch = torch.tensor(dataset[i : i + batch_size]["input_ids"], device=device)
        v, j = teacher(input_ids=batch).logits.float().topk(k, dim=-1)
        ids.append(batch.cpu())
        values.append(v.cpu())
        index.append(j.to(torch.int32).cpu())
    teacher.train(mode)
    path = Path(path)
    save_file({"input_ids": torch.cat(ids), "values": torch.cat(values), "indices": torch.cat(index)}, str(path))
    return path


class TopKTable:
    """Precomputed top-K teacher logits, found by the block's tokens.

    The Trainer drops dataset columns the model does not take, so a block cannot carry its row
    number; its tokens identify it instead (equal tokens give equal teacher logits anyway).
    """

    def __init__(self, path: str | Path):
        t = load_file(str(path))
        self.values, self.indices, self.k = t["values"], t["indices"], t["values"].shape[-1]
        self.tokens = int(t["input_ids"].numel())
        self.row = {r.numpy().tobytes(): i for i, r in enumerate(t["input_ids"].long())}

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = [self.row[r.numpy().tobytes()] for r in input_ids.detach().long().cpu()]
        except KeyError:
            raise BequestError(
                "a training block has no precomputed teacher logits; precompute on the training set"
            ) from None
        return self.values[rows].to(input_ids.device), self.indices[rows].to(input_ids.device)


# ---------------------------------------------------------------- training


@dataclass
class KD:
    """How the teacher is mixed in: see `kd_loss` and `alpha_at`."""

    alpha: float = 1.0
    schedule: str = "linear"
    t_ki: int = 0
    tau: float = 2.0
    top_k: int | None = None
    beta: float = 0.0


class TeacherMeter(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """Counts the tokens the teacher read, for `flops_with_teacher`.

    A step's tokens count when the teacher ran during it (`ran` is set by KDTrainer). The count rides
    in trainer_state.json, so a resumed run keeps counting where the checkpoint left off.
    """

    def __init__(self, teacher_tokens: int = 0, teacher_flops_per_token: int = 0, flops_per_token: int = 0):
        self.teacher_tokens, self.ran, self._seen = teacher_tokens, False, 0
        self.teacher_flops_per_token, self.flops_per_token = teacher_flops_per_token, flops_per_token

    def state(self) -> dict:
        per_token = {"teacher_flops_per_token": self.teacher_flops_per_token, "flops_per_token": self.flops_per_token}
        return {"args": per_token, "attributes": {"teacher_tokens": self.teacher_tokens}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.teacher_tokens = saved["attributes"]["teacher_tokens"]
        self._seen, self.ran = state.num_input_tokens_seen, False

    def on_step_end(self, args, state, control, **kwargs):
        if self.ran:  # tokens are gathered over processes, so this counts every process's teacher
            self.teacher_tokens += state.num_input_tokens_seen - self._seen
        self._seen, self.ran = state.num_input_tokens_seen, False

    def fields(self, tokens: int) -> dict:
        teacher = self.teacher_tokens * self.teacher_flops_per_token
        return {"teacher_tokens": self.teacher_tokens, "teacher_flops": teacher,
                "flops_with_teacher": tokens * self.flops_per_token + teacher}


class KDTrainer(transformers.Trainer):
    """A Trainer whose training loss is `kd_loss` against a frozen teacher; evaluation stays plain CE.

    Bind it for `engine.train` with functools.partial(KDTrainer, teacher=..., kd=KD(...), meter=...).
    The teacher is not a submodule of the student, so the optimizer, DDP and checkpoints never see it;
    it only moves to the training device. `topk` (a TopKTable) replaces the teacher's forward pass.
    """

    loss_is_scaled_for_ga = False  # kd_loss is a per-micro-batch mean; the Trainer divides by grad_accum

    def __init__(self, *args, teacher=None, kd: KD, meter: TeacherMeter | None = None, topk: TopKTable | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is None and topk is None and kd.alpha > 0:
            raise ValueError("KDTrainer needs a teacher or precomputed teacher logits")
        self.kd, self.topk = kd, topk
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval().requires_grad_(False)
        self.meter = meter or TeacherMeter()
        self.add_callback(self.meter)
        self._shift = task_of(self.accelerator.unwrap_model(self.model).config) == "causal_lm"
        self._parts: dict[str, list] = {}

    def alpha(self) -> float:
        return alpha_at(self.kd.schedule, self.state.global_step, self.kd.t_ki, self.kd.alpha)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # validation loss is the student's own, comparable across methods
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.kd.beta > 0
        outputs = model(**feed, output_hidden_states=True) if hidden else model(**feed)
        alpha = self.alpha()
        teacher_logits = teacher_hidden = None
        if alpha > 0 and self.topk is not None:
            teacher_logits = self.topk(feed["input_ids"])
        if (alpha > 0 and self.topk is None) or hidden:
            self.teacher.eval()
            with torch.no_grad():
                out = self.teacher(**feed, output_hidden_states=True) if hidden else self.teacher(**feed)
            if alpha > 0 and self.topk is None:
                teacher_logits = out.logits
            teacher_hidden = out.hidden_states[-1] if hidden else None
            self.meter.ran = True
        loss, parts = kd_loss(
            outputs.logits, teacher_logits, labels, alpha=alpha, tau=self.kd.tau, top_k=self.kd.top_k,
            shift=self._shift, beta=self.kd.beta, student_hidden=outputs.hidden_states[-1] if hidden else None,
            teacher_hidden=teacher_hidden, attention_mask=feed.get("attention_mask"),
        )
        for name, value in parts.items():
            self._parts.setdefault(name, []).append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        # Every row (training or eval) gets the teacher's FLOPs; training rows also the mean loss parts.
        logs = {**logs, **self.meter.fields(self.state.num_input_tokens_seen)}
        if "loss" in logs and self._parts:
            logs.update({f"kd_{k}": torch.stack(v).float().mean().item() for k, v in self._parts.items()})
            self._parts = {}
        super().log(logs, start_time)
