"""FLOP accounting from the anatomy, so every method can count what it spends (teachers included).

Per token, a forward pass costs 2 FLOPs per weight it multiplies by (every projection in every block,
plus the output head) and 4 * seq * (heads * head_dim) per block for attention scores and their
weighted sum. Training costs 3x the forward (the backward pass is about twice the forward).
Embedding lookups, norms and softmax are ignored, as is customary (Kaplan et al. 2020).
"""

from __future__ import annotations

from bequest.anatomy import Anatomy


def matmul_params(anat: Anatomy) -> int:
    d, hd = anat.hidden, anat.head_dim
    attn = d * hd * (2 * anat.heads + 2 * anat.kv_heads)  # q and o, k and v
    mlp = (3 if anat.family.gated_mlp else 2) * d * anat.ffn
    head = d * anat.vocab if anat.task in ("causal_lm", "masked_lm") else 0
    return anat.layers * (attn + mlp) + head


def forward_flops_per_token(anat: Anatomy, seq_len: int) -> int:
    return 2 * matmul_params(anat) + 4 * anat.layers * seq_len * anat.heads * anat.head_dim


def train_flops_per_token(anat: Anatomy, seq_len: int) -> int:
    return 3 * forward_flops_per_token(anat, seq_len)
