"""OLD+SOURCE teaching NEW when the two read different tokens: the teacher decodes each batch of NEW's
tokens back to text and reads it with its own tokenizer, so only the label logits are compared."""

from __future__ import annotations

import torch
from torch import nn


class Retokenized(nn.Module):
    def __init__(self, model, reads, own, max_len: int):
        super().__init__()
        self.model, self.reads, self.own, self.max_len = model, reads, own, max_len

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        texts = self.reads.batch_decode(rows, skip_special_tokens=True)
        batch = self.own(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return self.model(**{k: v.to(input_ids.device) for k, v in batch.items()}, **kwargs)
