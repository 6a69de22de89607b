"""Shared training machinery: data to blocks, Trainer runs (growing ones too), FLOP accounting, replay memory."""

from bequest.engine.data import collator, fixed_masks, labelled, lm_blocks
from bequest.engine.flops import forward_flops_per_token, matmul_params, train_flops_per_token
from bequest.engine.growing import growth_events, train_growing
from bequest.engine.replay import Memory, memory_share, replay_order
from bequest.engine.train import TrainFields, accuracy, curve, prepare_work, processes, train

__all__ = [
    "Memory",
    "accuracy",
    "TrainFields",
    "collator",
    "curve",
    "fixed_masks",
    "forward_flops_per_token",
    "growth_events",
    "labelled",
    "lm_blocks",
    "matmul_params",
    "memory_share",
    "prepare_work",
    "processes",
    "replay_order",
    "train",
    "train_flops_per_token",
    "train_growing",
]
