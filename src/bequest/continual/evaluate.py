"""Accuracy on one task: the argmax inside the task's head range, or rank classification of its label names."""

from __future__ import annotations

import torch
import transformers

from bequest.continual.tasks import Task


def accuracy(model, t: Task, tokenizer, classify: str) -> float:
    model.eval()
    if classify == "head":
        return head_accuracy(model, t, tokenizer)
    return generate_accuracy(model, t, tokenizer.pad_token_id)


@torch.no_grad()
def head_accuracy(model, t: Task, tokenizer, batch: int = 64) -> float:
    collate = transformers.DataCollatorWithPadding(tokenizer)
    hits = 0
    for rows in _batches(list(t.eval_inputs), batch):
        inputs = collate([{k: v for k, v in row.items() if k != "label"} for row in rows])
        logits = model(**inputs).logits[:, t.offset : t.offset + len(t.labels)]
        hits += int((logits.argmax(-1) == torch.tensor([row["label"] - t.offset for row in rows])).sum())
    return hits / len(t.eval_labels)


@torch.no_grad()
def generate_accuracy(model, t: Task, pad_id: int, batch: int = 64) -> float:
    """Rank classification: the label whose tokens the LM finds most likely after the prompt."""
    pairs = [(p, a) for p in t.eval_inputs for a in t.answers]
    scores = []
    for chunk in _batches(pairs, batch):
        n = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), n), pad_id)
        mask, answer = torch.zeros(len(chunk), n, dtype=torch.long), torch.zeros(len(chunk), n)
        for k, (p, a) in enumerate(chunk):
            ids[k, : len(p) + len(a)] = torch.tensor(p + a)
            mask[k, : len(p) + len(a)] = 1
            answer[k, len(p) : len(p) + len(a)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        scores.append((logp.gather(-1, ids[:, 1:, None])[..., 0] * answer[:, 1:]).sum(1))
    best = torch.cat(scores).view(len(t.eval_inputs), len(t.answers)).argmax(1)
    return float((best == torch.tensor(t.eval_labels)).float().mean())


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
