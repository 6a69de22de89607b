"""LoRA (Hu et al., ICLR 2022): a low-rank update B A beside every attention and MLP linear.

A reads the linear's input space and B writes its output space, so a grown host's copies divide A's
columns and copy B's rows; a new block's A is drawn as peft draws it and its B is zero.
"""

from __future__ import annotations

import math

import torch

from bequest.peft.kind import READ, WRITE, Kind, as_dict, saved_heads, target_regex


class Lora(Kind):
    name, peft_type, order = "lora", "LORA", 0
    tensors = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
    query_rows = ("lora_B.weight", "lora_B.bias")

    def config(self, fam, task_type, s, modules_to_save: list[str] | None = None) -> dict:
        """`modules_to_save`: host modules trained in full beside the matrices (default: the
        classification head's, for a SEQ_CLS task type)."""
        from peft import LoraConfig

        linears = [role for role in fam.layer if role.startswith(("attn.", "mlp."))]
        return as_dict(LoraConfig(task_type=task_type, r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                  target_modules=target_regex(fam, linears), fan_in_fan_out=fam.conv1d,
                                  modules_to_save=modules_to_save or saved_heads(fam, task_type)))

    def skeleton(self, config):
        return {**config, "init_lora_weights": True}  # SVD-based inits need the real weights

    def axes(self, what, shape, out, inp):
        return {"lora_A.weight": [None, (inp, READ)], "lora_B.weight": [(out, WRITE), None],
                "lora_B.bias": [(out, WRITE)]}[what]

    def fresh(self, what, shape, gen):
        if what == "lora_A.weight":
            return uniform_fan_in(shape, gen)
        return torch.zeros(shape)


def uniform_fan_in(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default range, which peft's LoRA A shares."""
    bound = 1 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


KIND = Lora()
