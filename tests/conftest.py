"""Tiny random models of every family x head, and a shared tokenizer cache for the session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bequest.anatomy import FAMILIES, build_model, make_config

GQA = {"llama", "mistral", "qwen2"}
CASES = [(fam, task) for fam in sorted(FAMILIES) for task in FAMILIES[fam].tasks]
DEMO, STOP_AFTER = ["demo", "--quick"], 3
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


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's first command, `bequest demo`, with --quick, in an empty folder: stopped after stage 3 as a
    Ctrl-C would stop it, then run again. Shared by tests/test_demo.py and tests/test_readme.py (one quick
    demo per session: it is the slowest thing the suite runs)."""
    from typer.testing import CliRunner

    from bequest.cli import app
    from bequest.report.demo import G1, G1_NEXT, UPGRADED, ZOO

    where, before = tmp_path_factory.mktemp("demo"), Path.cwd()
    os.chdir(where)
    try:
        os.environ["BEQUEST_DEMO_STOP_AFTER"] = str(STOP_AFTER)
        try:
            first = CliRunner().invoke(app, DEMO)
        finally:
            del os.environ["BEQUEST_DEMO_STOP_AFTER"]
        out = where / "bequest-demo"
        stopped = json.loads((out / "demo.json").read_text())
        left = {name: files_of(out / name) for name in (G1, ZOO, G1_NEXT, UPGRADED["continue"])}
        second = CliRunner().invoke(app, DEMO)
    finally:
        os.chdir(before)
    assert first.exit_code != 0 and f"stopped after stage {STOP_AFTER}" in first.output, first.output
    assert second.exit_code == 0, second.output
    return {"command": DEMO, "out": out, "first": first.output, "second": second.output, "stopped": stopped,
            "left": left, "where": where}
