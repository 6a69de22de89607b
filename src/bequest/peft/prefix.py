"""Prefix tuning (Li & Liang, ACL 2021): learned keys and values put before every layer's attention.

They live in the KV heads of their layer, so on a grown host each layer's follow its KV-head map and
a new block's are zero.
"""

from __future__ import annotations

import torch

from bequest.peft.kind import PromptLearning, as_dict, saved_heads


class Prefix(PromptLearning):
    name, peft_type, order = "prefix", "PREFIX_TUNING", 2
    virtual_kv = True

    def config(self, fam, task_type, s):
        from peft import PrefixTuningConfig

        return as_dict(PrefixTuningConfig(task_type=task_type, num_virtual_tokens=s.virtual_tokens,
                                          modules_to_save=saved_heads(fam, task_type)))

    def grow(self, key, t, maps):
        """[tokens, layers x (key, value) x KV heads x head_dim], each layer's re-indexed by its map."""
        if key != "prompt_embeddings":
            return None
        old_layers = max(s for s in maps["layers"] if s is not None) + 1
        hd, n = maps["head_dim"], t.shape[0]
        kv_old = t.shape[1] // (old_layers * 2 * hd)
        t = t.view(n, old_layers, 2, kv_old, hd)
        out = torch.zeros(n, len(maps["layers"]), 2, len(maps["kv_heads"][0]), hd)
        for j, src in enumerate(maps["layers"]):
            for h, u in enumerate(maps["kv_heads"][j] if src is not None else []):
                if u is not None:
                    out[:, j, :, h] = t[:, src, :, u]
        return out.reshape(n, -1)


KIND = Prefix()
