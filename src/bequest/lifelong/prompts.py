"""Domain prompts and the blocks fed to the model: one special token per domain before each block."""

from __future__ import annotations

import torch


def prompt_token(domain: str) -> str:
    return f"<|domain:{domain}|>"


def prompt_id(tokenizer, domain: str) -> int | None:
    """The token id of `domain`'s learned prompt, or None if the tokenizer has none."""
    tid = tokenizer.convert_tokens_to_ids(prompt_token(domain))
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def encode(blocks: list[list[int]], prompt: int | None, pad: int | None) -> dict:
    """input_ids and labels; the first block token is never scored, so prompted or not the same tokens are."""
    ids, labels = [], []
    for b in blocks:
        lab = [-100 if t == pad else t for t in b]  # what the engine's causal collator does
        lab[0] = -100
        ids.append(b if prompt is None else [prompt, *b])
        labels.append(lab if prompt is None else [-100, *lab])
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict]) -> dict:
    return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "labels")}
