"""Turn text datasets into what the Trainer eats: packed LM blocks or tokenized labelled examples."""

from __future__ import annotations

import torch
import transformers
from datasets import Dataset


def lm_blocks(texts: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Tokenize every document (with its boundary tokens), concatenate, cut into seq_len blocks.

    Packing wastes no compute on padding; the remainder shorter than a block is dropped.
    """

    def pack(batch):
        ids = [t for doc in tokenizer(batch["text"], verbose=False)["input_ids"] for t in doc]
        n = len(ids) // seq_len * seq_len
        return {"input_ids": [ids[i : i + seq_len] for i in range(0, n, seq_len)]}

    # One batch for the whole split keeps block boundaries independent of the map batch size.
    return texts.map(pack, batched=True, batch_size=None, remove_columns=texts.column_names)


def labelled(examples: Dataset, tokenizer, max_len: int) -> Dataset:
    """Tokenize `text` (truncated to max_len), keep `label`."""

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_len)

    keep = {"label"}
    return examples.map(encode, batched=True, remove_columns=[c for c in examples.column_names if c not in keep])


def fixed_masks(blocks: Dataset, tokenizer, seed: int = 0, mlm_probability: float = 0.15) -> Dataset:
    """Mask evaluation blocks once, with a fixed seed, so every evaluation scores the same positions."""
    masker = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)

    def mask(batch):
        out = masker([{"input_ids": ids} for ids in batch["input_ids"]])
        return {"input_ids": out["input_ids"].tolist(), "labels": out["labels"].tolist()}

    return blocks.map(mask, batched=True, batch_size=len(blocks) or 1)


class _KeepFixedMasks:
    """Masked-LM collation that leaves pre-masked (evaluation) examples as they are."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        if "labels" in features[0]:
            return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "labels")}
        return self.inner(features)


def collator(task: str, tokenizer, mlm_probability: float = 0.15):
    if task == "causal_lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if task == "masked_lm":
        return _KeepFixedMasks(transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability))
    return transformers.DataCollatorWithPadding(tokenizer)
