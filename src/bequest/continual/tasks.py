"""Tasks as data: each task's training set, evaluation examples and label encoding, per `--classify`.

A task's examples and label names come from an embedded task or the user's labelled files, read as every
verb reads them (`bequest.data.prepare.task_splits`).

Head mode shifts every task's labels to its offset in the union head; generate mode writes a prompt
`TEXT\\nTASK:` and learns only the answer ` LABEL</s>`.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from bequest.data.prepare import task_splits
from bequest.engine import labelled
from bequest.errors import BequestError


class Task:
    """One task of the stream: its training set, its evaluation examples, and how it is scored.

    `source` is the task as --tasks gives it (an embedded task or a path), `files` the recipe whose
    TaskFields say how a file is read and how many examples to take."""

    def __init__(self, name: str, source: str, offset: int, files):
        self.name, self.offset = name, offset
        try:
            train, validation = task_splits(source, train_examples=files.train_examples,
                                            eval_examples=files.eval_examples, files=files)
        except BequestError as e:  # the shared reader names the file; say which task of the stream it is
            raise BequestError(f"task {name}: {e}") from e
        self.splits = {"train": train, "validation": validation}
        self.labels: list[str] = train.features["label"].names
        self.train = self.engine_eval = None
        self.eval_inputs: list = []  # head: tokenized examples; generate: prompt ids
        self.eval_labels: list[int] = []  # local label ids
        self.answers: list[list[int]] = []  # generate: each label's tokens


def encode_head(t: Task, tokenizer, r) -> Task:
    """Tokenized examples whose labels sit at the task's offset in the union head."""

    def encoded(split: str):
        ds = t.splits[split]
        shifted = Dataset.from_dict({"text": list(ds["text"]), "label": [y + t.offset for y in ds["label"]]})
        return labelled(shifted, tokenizer, r.max_len)

    t.train = encoded("train")
    evals = encoded("validation")
    t.eval_inputs, t.eval_labels = evals, [y - t.offset for y in evals["label"]]
    t.engine_eval = evals.select(range(min(32, len(evals))))
    return t


def encode_generate(t: Task, tokenizer, r) -> Task:
    """Prompt `TEXT\\nTASK:` (the text truncated to fit), answer ` LABEL</s>`; only the answer is learned."""
    if tokenizer.eos_token_id is None:
        raise BequestError("--classify generate ends each answer with the tokenizer's eos token, and it has none")
    t.answers = [tokenizer(f" {name}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for name in t.labels]
    cue = tokenizer(f"\n{t.name}:", add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = r.max_len - len(bos) - len(cue) - max(map(len, t.answers))
    if room < 1:
        raise BequestError(f"--max-len {r.max_len} leaves no room for the text before the {t.name} answer; raise it")

    def prompts(split: str):
        ds = t.splits[split]
        bodies = tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]
        return [bos + b[:room] + cue for b in bodies], list(ds["label"])

    ids, labels = prompts("train")
    full = [p + t.answers[y] for p, y in zip(ids, labels)]
    t.train = Dataset.from_dict({
        "input_ids": full,
        "attention_mask": [[1] * len(f) for f in full],
        "labels": [[-100] * len(p) + t.answers[y] for p, y in zip(ids, labels)],
    })
    t.eval_inputs, t.eval_labels = prompts("validation")
    t.engine_eval = Dataset.from_dict({
        "input_ids": [p + t.answers[y] for p, y in zip(t.eval_inputs[:32], t.eval_labels)],
        "labels": [[-100] * len(p) + t.answers[y] for p, y in zip(t.eval_inputs[:32], t.eval_labels)],
    }).map(lambda ex: {"attention_mask": [1] * len(ex["input_ids"])})
    return t


def padder(pad_id: int):
    """Right-pad input_ids (pad), attention_mask (0) and labels (-100) to the longest in the batch."""

    def collate(features):
        n = max(len(f["input_ids"]) for f in features)

        def fill(key, value):
            return torch.tensor([list(f[key]) + [value] * (n - len(f[key])) for f in features])

        return {"input_ids": fill("input_ids", pad_id), "attention_mask": fill("attention_mask", 0), "labels": fill("labels", -100)}

    return collate
