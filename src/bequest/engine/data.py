"""Turn text datasets into what the Trainer eats: packed LM blocks or tokenized labelled examples."""

from __future__ import annotations

import transformers
from datasets import Dataset


def lm_blocks(texts: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Tokenize every document (with its boundary tokens), concatenate, cut into seq_len blocks.

    Packing wastes no compute on padding; the remainder shorter than a block is dropped.
    """

    def pack(batch):
        ids = [t for doc in tokenizer(batch["text"])["input_ids"] for t in doc]
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


def collator(task: str, tokenizer, mlm_probability: float = 0.15):
    if task == "causal_lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if task == "masked_lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
    return transformers.DataCollatorWithPadding(tokenizer)
