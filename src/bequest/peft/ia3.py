"""IA3 (Liu et al., NeurIPS 2022): learned vectors scaling keys, values and the FFN's hidden units.

A vector scales its space, so a grown host's copies copy it and new units (and new blocks) get 1.
"""

from __future__ import annotations

import torch

from bequest.peft.kind import SCALE, Kind, as_dict, saved_heads, target_regex


class IA3(Kind):
    name, peft_type, order = "ia3", "IA3", 1
    tensors = ("ia3_l",)

    def config(self, fam, task_type, s):
        from peft import IA3Config

        # Keys and values (GPT-2's fused qkv as a whole) and the FFN's hidden units.
        return as_dict(IA3Config(task_type=task_type, target_modules=target_regex(fam, ["attn.qkv", "attn.k", "attn.v", "mlp.down"]),
                                 feedforward_modules=target_regex(fam, ["mlp.down"]), fan_in_fan_out=fam.conv1d,
                                 modules_to_save=saved_heads(fam, task_type)))

    def axes(self, what, shape, out, inp):
        # A module's outputs ([out, 1]) or, on feed-forward modules, its inputs ([1, in]).
        return [(out, SCALE), None] if shape[0] != 1 else [None, (inp, SCALE)]

    def fresh(self, what, shape, gen):
        return torch.ones(shape)


KIND = IA3()
