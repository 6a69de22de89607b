"""MIGU: magnitude-based gradient updating for continual fine-tuning (Du et al. 2024; docs/methods.md, section 5).

A `TrainerCallback` plus forward hooks. During each optimizer step, every masked layer (each trainable
`nn.Linear`, GPT-2's `Conv1D`, and under peft the LoRA A and B matrices, which are `nn.Linear` too)
adds up, per OUTPUT feature, the L1 magnitude of its output over the step's real tokens: padding is
left out (the original code counted it). Before the optimizer step the statistic is summed across
processes, and in every layer the gradient rows of the fraction T with the smallest magnitude are
zeroed, so only the top (1 - T) rows learn. T is `threshold`: the FRACTION OF OUTPUT ROWS MASKED (their
gradient zeroed) in every layer, in [0, 1), never a magnitude; 0.7 masks 70% of each layer's rows. As in the paper, biases, embeddings and norms are not masked;
the layers named in `skip` (task heads) never are.

- Scope `all` (off by default; not in the paper): embeddings and norms are measured and masked the same
  way, per output feature (an embedding's columns, a norm's entries), and a masked layer's bias shares
  its weight's mask. In full fine-tuning of a small model these carry much of the drift: on the continual
  benchmark's full fine-tuning streams (MIGU@0.9) forgetting fell from 17.7 points (linear layers only) to
  10.3 (seq: 23.7), and average accuracy rose by 5.9 points over seq instead of 2.5. It costs more hooks:
  a 12% step overhead on that 64-wide model, against 8% for the linear layers alone.
- Kept rows: exactly n - floor(T * n) per layer, the largest by `topk` (a quantile threshold would keep
  more or fewer under ties and interpolation). A fused matrix (GPT-2's qkv) is one layer.
- Gradient accumulation: the hooks accumulate over every micro-batch of the step (the callback resets
  at `on_step_begin`, which the Trainer calls once per optimizer step) and the mask is applied once, to
  the accumulated gradient.
- Clipping: the paper masks before clipping, so the clip norm is the masked gradient's. transformers
  calls `on_pre_optimizer_step` AFTER clipping, so `MIGUTrainer` applies the mask from its
  `_clip_grad_norm`; with a plain Trainer the callback still masks, after clipping (the same rows, a
  slightly smaller step when the clip was active).
- Hold (`hold=True`, off by default as in the paper): a zero gradient does not stop AdamW, whose momentum
  and weight decay still move masked rows; hold puts them back after the step. Measured on the continual
  benchmark's full fine-tuning streams it changed nothing (MIGU@0.9 ACC 42.9 with hold, 43.1 without).
- Random masks (the ablation baseline): the same number of rows per layer, chosen uniformly at random
  each step from a generator seeded by (seed, step), so every process draws the same rows.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from bequest.errors import BequestError


def keep_top(stat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the n - floor(T * n) largest entries of `stat` (T = `threshold`, the fraction masked)."""
    n = stat.numel()
    keep = n - math.floor(threshold * n + 1e-9)  # 1e-9: 0.7 * 10 must count as 7, not 7.000000000000001 -> 7
    mask = torch.zeros(n, dtype=torch.bool, device=stat.device)
    mask[stat.topk(keep, sorted=False).indices] = True
    return mask


def keep_random(n: int, threshold: float, generator: torch.Generator) -> torch.Tensor:
    """As many rows as `keep_top` keeps, chosen uniformly at random."""
    keep = n - math.floor(threshold * n + 1e-9)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, or a family's own RMSNorm class: a per-feature gain as wide as its output."""
    w = getattr(module, "weight", None)
    own = type(module).__name__.endswith("Norm") and isinstance(w, nn.Parameter) and w.dim() == 1
    return isinstance(module, nn.LayerNorm) or own


def maskable(model: nn.Module, skip: tuple[str, ...] = (), scope: str = "linear") -> dict[str, tuple[nn.Module, int]]:
    """Trainable layers by name, each with the axis of its weight that indexes output features.

    `linear`: linear layers only (the paper). `all`: also embeddings (their output features are the weight's
    columns) and norms, and every masked layer's bias shares its weight's mask. A weight shared by two layers
    (a tied LM head and embedding) is masked once, by the linear layer. A name is skipped when one of `skip`
    is a run of its dotted components ("score" skips "base_model.model.score.modules_to_save.default").
    Frozen layers (LoRA's base weights) have no gradient to mask.
    """
    if scope not in ("linear", "all"):
        raise BequestError(f"MIGU scope {scope!r} is unknown; use 'linear' (the paper) or 'all'")
    found, seen = {}, set()
    kinds = [lambda m: isinstance(m, (nn.Linear, Conv1D))]
    if scope == "all":
        kinds += [lambda m: isinstance(m, nn.Embedding) or _is_norm(m)]
    for kind in kinds:  # linear layers first, so a tied weight takes the LM head's rows
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not kind(module) or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
                continue
            if id(weight) in seen or any(f".{s}." in f".{name}." for s in skip):
                continue
            seen.add(id(weight))
            # Conv1D stores [in, out] and an embedding [vocab, features]: their features are columns.
            found[name] = (module, 1 if isinstance(module, (Conv1D, nn.Embedding)) else 0)
    return found


def _targets(module: nn.Module, axis: int, scope: str) -> list[tuple[nn.Parameter, int]]:
    bias = getattr(module, "bias", None)
    with_bias = scope == "all" and isinstance(bias, nn.Parameter) and bias.requires_grad
    return [(module.weight, axis)] + ([(bias, 0)] if with_bias else [])


class MIGU(transformers.TrainerCallback):
    """Mask each step's gradient rows to the layers' largest output magnitudes (or random rows).

    `threshold` is the fraction of every layer's output rows masked (gradient zeroed), not a magnitude.
    """

    def __init__(self, model: nn.Module, threshold: float = 0.7, *, random: bool = False,
                 skip: tuple[str, ...] = (), seed: int = 0, hold: bool = False, scope: str = "linear"):
        if not 0.0 <= threshold < 1.0:
            raise BequestError(f"MIGU threshold {threshold} is outside [0, 1); it is the fraction of rows masked")
        self.model, self.threshold, self.random, self.seed, self.hold = model, threshold, random, seed, hold
        self._held: list = []  # (parameter, axis, masked row indices, their values before the step)
        self.layers = maskable(model, skip, scope)
        # What each layer's mask applies to, with the feature axis: its weight, and under scope `all` a bias too.
        self.targets = {name: _targets(module, axis, scope) for name, (module, axis) in self.layers.items()}
        if not self.layers:
            raise BequestError("MIGU found no trainable linear layer to mask; is everything frozen or skipped?")
        sizes = [m.weight.shape[axis] for m, axis in self.layers.values()]
        # One flat buffer, so the cross-process sum is a single all-reduce.
        device = next(iter(self.layers.values()))[0].weight.device
        self.flat = torch.zeros(sum(sizes), device=device)
        self.stats = dict(zip(self.layers, self.flat.split(sizes)))
        self.masks: dict[str, torch.Tensor] = {}  # the rows kept at the last step, for inspection
        self._tokens: tuple | None = None  # (shape, [1, tokens] float mask) of the current forward
        self._handles: list = []
        self._applied = False

    # ---------------------------------------------------------------- statistic

    def attach(self) -> None:
        """Start measuring (random masks need no statistic)."""
        if self._handles or self.random:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._capture, with_kwargs=True))
        for name, (module, _) in self.layers.items():
            self._handles.append(module.register_forward_hook(self._measurer(self.stats[name])))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _capture(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        # Once per forward, not per layer: the mask as a [1, tokens] row to multiply outputs with.
        self._tokens = None if mask is None else (mask.shape, mask.reshape(1, -1).float())

    def _measurer(self, stat: torch.Tensor):
        def measure(module, args, output):
            if not module.training:  # evaluations inside a training run must not count
                return
            out = output.detach().abs().float()  # fp32 sums, whatever the training precision
            rows = out.reshape(-1, out.shape[-1])
            if self._tokens is not None and out.shape[:2] == self._tokens[0] and out.dim() >= 3:
                # A [1, tokens] x [tokens, features] product sums the real tokens in one call.
                stat.add_((self._tokens[1] @ rows)[0])
            else:  # no token axis (BERT's pooler) or no mask given: every row is real
                stat.add_(rows.sum(0))

        return measure

    def reset(self) -> None:
        self.flat.zero_()
        self._applied = False

    def _all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum the statistic over processes, so every process masks the same rows."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        return flat

    # ---------------------------------------------------------------- mask

    def apply(self, step: int = 0) -> None:
        """Zero the gradient rows outside each layer's kept set; once per optimizer step."""
        if self._applied:
            return
        self._applied = True
        if self.random:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            masks = {name: keep_random(s.numel(), self.threshold, g).to(s.device) for name, s in self.stats.items()}
        else:
            self._all_reduce(self.flat)  # every process calls it, gradients or not
            masks = {name: keep_top(s, self.threshold) for name, s in self.stats.items()}
        for name, keep in masks.items():
            rows = (~keep).nonzero().squeeze(1) if self.hold else None
            for param, ax in self.targets[name]:
                if param.grad is not None:
                    shape = [-1 if d == ax else 1 for d in range(param.dim())]  # broadcast along the feature axis
                    param.grad.mul_(keep.to(param.grad.dtype).view(shape))
                if self.hold:
                    w = param.detach()
                    self._held.append((w, ax, rows, w.index_select(ax, rows)))
        self.masks = masks

    def restore(self) -> None:
        """Put the masked rows back as they were before the optimizer step (`hold`; see the module notes)."""
        for w, axis, rows, values in self._held:
            w.index_copy_(axis, rows, values)
        self._held.clear()

    # ---------------------------------------------------------------- Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self.attach()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def on_step_begin(self, args, state, control, **kwargs):
        self.reset()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.apply(state.global_step)  # a no-op when MIGUTrainer already masked before clipping

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.restore()


class MIGUTrainer(transformers.Trainer):
    """A Trainer that applies its MIGU callbacks' masks before gradient clipping, as the paper does."""

    def _clip_grad_norm(self, model):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, MIGU):
                callback.apply(self.state.global_step)
        return super()._clip_grad_norm(model)
