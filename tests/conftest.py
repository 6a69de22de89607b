"""Tiny random models of every family x head, and a shared tokenizer cache for the session."""

from __future__ import annotations

import os

import pytest
import torch

from bequest.anatomy import FAMILIES, build_model, make_config

GQA = {"llama", "mistral", "qwen2"}
CASES = [(fam, task) for fam in sorted(FAMILIES) for task in FAMILIES[fam].tasks]
LM_TASK = {fam: ("masked_lm" if "masked_lm" in FAMILIES[fam].tasks else "causal_lm") for fam in FAMILIES}


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # Tokenizers are trained once per session into a private cache, never the user's home.
    os.environ["BEQUEST_CACHE"] = str(tmp_path_factory.mktemp("bequest-cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # tiny models gain nothing from threads, and a busy machine punishes them


def tiny(family: str, task: str, seed: int = 0, **shape):
    shape = {"layers": 2, "hidden": 32, "heads": 4, "ffn": 64, "vocab": 120, "positions": 32, **shape}
    if family in GQA:
        shape.setdefault("kv_heads", 2)
    torch.manual_seed(seed)
    return build_model(make_config(family, num_labels=3, **shape), task)


def probe(vocab: int = 120, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, length), generator=g)
