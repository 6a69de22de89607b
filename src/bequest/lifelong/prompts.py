"""Domain prompts and the blocks fed to the model: one special token per domain before each block."""

from __future__ import annotations

import numpy as np
import torch


def prompt_token(domain: str) -> str:
    return f"<|domain:{domain}|>"


def prompt_id(tokenizer, domain: str) -> int | None:
    """The token id of `domain`'s learned prompt, or None if the tokenizer has none."""
    tid = tokenizer.convert_tokens_to_ids(prompt_token(domain))
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def encode(blocks, prompt: int | None, pad: int | None) -> dict:
    """input_ids and labels, an int64 array row per block; the first block token is never scored, so prompted
    or not the same tokens are."""
    ids = np.asarray(blocks, dtype=np.int64).reshape(len(blocks), -1)
    labels = ids.copy() if pad is None else np.where(ids == pad, -100, ids)  # what the engine's collator does
    labels[:, 0] = -100
    if prompt is not None:
        ids = np.concatenate([np.full((len(ids), 1), prompt), ids], axis=1)
        labels = np.concatenate([np.full((len(ids), 1), -100), labels], axis=1)
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict]) -> dict:
    return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "labels")}
