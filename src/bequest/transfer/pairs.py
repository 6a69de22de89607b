"""What both models can be measured on: the same token strings, as each model's ids.

With one tokenizer the ids are identical. With two, the text is tokenized by OLD's tokenizer and only
tokens whose string is also in NEW's vocabulary are kept, each as NEW's id for that string; the
shared vocabulary also pairs the two embedding tables row by row.
"""

from __future__ import annotations

import torch

from bequest.errors import BequestError

DISTILL = "use --method distill, which learns from OLD's outputs on the task data instead"


def shared_vocabulary(old_tokenizer, new_tokenizer, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(OLD ids, NEW ids) of every token string both vocabularies hold and both embedding tables have a
    row for (`rows`: their sizes; a tokenizer may know tokens its model does not), in OLD's id order."""
    old, new = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    pairs = sorted((i, new[s]) for s, i in old.items() if s in new and i < rows[0] and new[s] < rows[1])
    if not pairs:
        raise BequestError(f"OLD and NEW share no vocabulary, so there is nothing to measure both on; {DISTILL}")
    ids = torch.tensor(pairs)
    return ids[:, 0], ids[:, 1]


def paired_blocks(texts: list[str], old_tokenizer, vocab: tuple[torch.Tensor, torch.Tensor], *, seq_len: int,
                  max_tokens: int, least: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(OLD ids, NEW ids), both [blocks, length]: the texts' shared tokens in blocks of up to
    `seq_len`, at most `max_tokens` in all; fewer than `least` tokens is an error."""
    to_new = dict(zip(vocab[0].tolist(), vocab[1].tolist()))
    texts, stream = list(texts), []
    for start in range(0, len(texts), 256):  # a large corpus is read only as far as it is needed
        for ids in old_tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            stream += [i for i in ids if i in to_new]
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if len(stream) < least:
        raise BequestError(f"the texts hold {len(stream)} tokens both vocabularies share; measuring OLD against NEW "
                           f"needs at least {least} (their hidden width): give more text, or {DISTILL}")
    length = min(seq_len, len(stream))
    old = torch.tensor(stream[: len(stream) // length * length]).view(-1, length)
    return old, torch.tensor([to_new[i] for i in old.flatten().tolist()]).view_as(old)
