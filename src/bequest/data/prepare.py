"""Data made ready for a verb: the splits of a corpus or task, tokenized, checked against the model.

Every verb that trains or evaluates prepares its data here, so a corpus, a task and a length limit
mean the same thing in each of them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from bequest.data.cache import cache_root
from bequest.data.corpus import CORPORA, load_corpus, named_domains
from bequest.data.files import load_labeled_files, load_text_files
from bequest.data.tasks import TASKS, load_task
from bequest.errors import BequestError

SPECIALS = ("pad_token", "bos_token", "eos_token")


def special_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's pad/bos/eos ids as config settings (`pad_token_id`, ...), those it has."""
    ids = {f"{k}_id": getattr(tokenizer, f"{k}_id") for k in SPECIALS}
    return {k: v for k, v in ids.items() if v is not None}


def check_room(anat, tokens: int, flag: str, where="the model") -> None:
    """Refuse sequences of `tokens` tokens (what `flag` asks for) that do not fit the model's positions."""
    room = anat.usable_positions
    if room and tokens > room:
        raise BequestError(f"{flag} needs {tokens} positions but {where} has {room}; lower it")


# ---------------------------------------------------------------- language-model text


def text_splits(r):
    """(train, validation) text of an embedded corpus (one domain, or all) or of the user's files
    (`r`: a recipe with `CorpusFields`)."""
    if r.corpus in CORPORA:
        return load_corpus(r.domain, "train", r.corpus), load_corpus(r.domain, "validation", r.corpus)
    if r.domain is not None:
        raise BequestError("--domain selects a part of an embedded corpus; drop it when --corpus is a path")
    return domain_texts(r.corpus, "train", r), domain_texts(r.corpus, "validation", r)


def domain_texts(spec: str, split: str, files=None, corpus: str = "default"):
    """One domain: a domain of the embedded `corpus` by name ('a+b': several as one), or the user's files by
    path (read as `files`, a recipe with `FileFields`, says)."""
    named = named_domains(spec, corpus)
    if named:
        from datasets import concatenate_datasets

        return concatenate_datasets([load_corpus(d, split, corpus) for d in named])
    how = {} if files is None else {"text_column": files.text_column, "validation_fraction": files.validation_fraction}
    return load_text_files(spec, split, **how)


def lm_splits(train_text, eval_text, tokenizer, task: str, r) -> tuple:
    """Packed training blocks and a capped evaluation set (fixed masks for masked LM); `r` carries
    `seq_len`, `eval_blocks`, `seed` (and `corpus`, named in the error)."""
    from bequest.engine.data import fixed_masks, lm_blocks

    train_set = lm_blocks(train_text, tokenizer, r.seq_len)
    eval_set = lm_blocks(eval_text, tokenizer, r.seq_len)
    eval_set = eval_set.select(range(min(r.eval_blocks, len(eval_set))))
    if task == "masked_lm":
        eval_set = fixed_masks(eval_set, tokenizer, seed=r.seed)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise BequestError(f"corpus {r.corpus!r} is shorter than one {r.seq_len}-token block; add text or lower --seq-len")
    return train_set, eval_set


def cached_blocks(texts, tokenizer, seq_len: int):
    """`engine.lm_blocks` of `texts` as an int32 array, a row per block, cached on disk under the texts, the
    tokenizer and seq_len: a domain of millions of tokens is tokenized once, not once per run."""
    import numpy as np

    key = hashlib.sha256(f"{seq_len}|{tokenizer.backend_tokenizer.to_str()}|".encode())
    for text in texts.data.column("text").to_pylist():  # not row by row through datasets: 10x faster
        key.update(text.encode())
        key.update(b"\0")
    path = cache_root() / "blocks" / f"{key.hexdigest()[:24]}-{seq_len}.npy"
    if not path.exists():
        from bequest.engine.data import lm_blocks

        blocks = np.asarray(lm_blocks(texts, tokenizer, seq_len)["input_ids"], dtype=np.int32).reshape(-1, seq_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy", dir=path.parent)  # renamed into place whole
        with os.fdopen(fd, "wb") as f:
            np.save(f, blocks)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return np.load(path)


# ---------------------------------------------------------------- labelled tasks


def task_splits(name_or_path: str, *, train_examples: int | None = None, eval_examples: int | None = None,
                files=None):
    """(train, validation) Datasets with text and label, from an embedded task name or a labelled file
    (read as `files`, a recipe with `TaskFields`, says)."""
    if name_or_path in TASKS:
        train_set, eval_set = load_task(name_or_path, "train"), load_task(name_or_path, "validation")
    elif Path(name_or_path).exists():
        how = {} if files is None else {"text_column": files.text_column, "label_column": files.label_column,
                                        "validation_fraction": files.validation_fraction}
        train_set = load_labeled_files(name_or_path, "train", **how)
        eval_set = load_labeled_files(name_or_path, "validation", **how)
    else:
        raise BequestError(f"--data {name_or_path!r} is neither an embedded task ({', '.join(TASKS)}) nor a file")
    if train_examples:
        train_set = train_set.select(range(min(train_examples, len(train_set))))
    if eval_examples:
        eval_set = eval_set.select(range(min(eval_examples, len(eval_set))))
    return train_set, eval_set


def task_sets(r, tokenizer) -> tuple:
    """(train, eval, number of labels) of a recipe's task (`TaskFields`), tokenized for the engine."""
    from bequest.engine.data import labelled

    train_set, eval_set = task_splits(r.data, train_examples=r.train_examples, eval_examples=r.eval_examples, files=r)
    labels = train_set.features["label"].num_classes
    return labelled(train_set, tokenizer, r.max_len), labelled(eval_set, tokenizer, r.max_len), labels
