"""Every verb over a shared set of broken inputs: exit code 2, one error line, nothing left behind.

The inputs are what a user's disk really holds after a bad copy, a half download or a hand edit: model
folders with a tensor missing, extra or of the wrong shape, broken headers and configs, pickle-only
weights; broken adapters; data files that cannot train a classifier; outputs that cannot be written.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bequest.cli import app
from bequest.finetune import FinetuneRecipe, finetune
from bequest.pretrain import PretrainRecipe, pretrain

TINY = dict(layers=1, hidden=32, heads=2, vocab=500, seq_len=32, batch_size=4, eval_blocks=2, steps=1, eval_every=1)
WEIGHTS = "model.safetensors"


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    save_file(change(tensors), str(folder / WEIGHTS), metadata={"format": "pt"})


def _header(folder: Path, header) -> None:
    raw = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw)


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN_MODELS = {
    "missing tensor": lambda f: _rewrite(f, lambda t: {k: v for k, v in t.items() if not k.endswith("h.0.mlp.c_fc.weight")}),
    "extra tensor": lambda f: _rewrite(f, lambda t: {**t, "transformer.h.7.mlp.c_fc.weight": torch.zeros(2, 2)}),
    "wrong-shape tensor": lambda f: _rewrite(f, lambda t: {**t, "transformer.wpe.weight": torch.zeros(3, 32)}),
    "header is a list": lambda f: _header(f, [1, 2, 3]),
    "header lacks offsets": lambda f: _header(f, {"transformer.wte.weight": {"dtype": "F32", "shape": [2, 2]}}),
    "truncated weights": lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-40]),
    "empty weights": lambda f: (f / WEIGHTS).write_bytes(b""),
    "pickle-only weights": lambda f: (f / WEIGHTS).rename(f / "pytorch_model.bin"),
    "heads of the wrong type": lambda f: _config(f, n_head="two"),
    "zero heads": lambda f: _config(f, n_head=0),
    "unsupported family": lambda f: _config(f, model_type="t5"),
    "config is not JSON": lambda f: (f / "config.json").write_text("{not json"),
    "no config": lambda f: (f / "config.json").unlink(),
    "not a folder": lambda f: shutil.rmtree(f),
}

# Each verb with its model argument(s) as {placeholder}; MODEL is the broken one, GOOD a healthy one.
VERBS = {
    "info": ["info", "{MODEL}"],
    "grow": ["grow", "{MODEL}", "{OUT}", "--layers", "2"],
    "finetune": ["finetune", "--model", "{MODEL}", "--steps", "1", "--max-len", "32", "{OUT}"],
    "continue-pretrain": ["continue-pretrain", "--model", "{MODEL}", "--steps", "1", "--seq-len", "32", "{OUT}"],
    "inherit": ["inherit", "--teacher", "{MODEL}", "--steps", "1", "--seq-len", "32", "{OUT}"],
    "learn": ["learn", "--model", "{MODEL}", "--tasks", "kind", "--steps", "1", "--max-len", "32", "{OUT}"],
    "lifelong": ["lifelong", "--base", "{MODEL}", "--domains", "text", "--steps", "1", "--seq-len", "31", "{OUT}"],
    "recycle (old base)": ["recycle", "--old-base", "{MODEL}", "--new-base", "{GOOD}", "--task-weights", "{TUNED}",
                           "--method", "init", "--steps", "1", "--max-len", "32", "{OUT}"],
    "recycle (new base)": ["recycle", "--old-base", "{GOOD}", "--new-base", "{MODEL}", "--task-weights", "{TUNED}",
                           "--steps", "1", "--max-len", "32", "{OUT}"],
    "analyze": ["analyze", "weights", "--a", "{MODEL}", "--b", "{GOOD}", "{OUT}"],
    "port (host)": ["port", "--adapter", "{ADAPTER}", "--to", "{MODEL}", "{OUT}"],
    "export (base)": ["export", "{ADAPTER}", "{OUT}", "--base", "{MODEL}"],
}
# Every verb meets three kinds of breakage; `info`, `grow` and `finetune` meet all of them.
SAMPLE = ("missing tensor", "header is a list", "zero heads")
CASES = [(v, m) for v in VERBS for m in BROKEN_MODELS if v in ("info", "grow", "finetune") or m in SAMPLE]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pretrain(PretrainRecipe(out=str(root / "good"), **TINY))
    tuned = dict(model=str(root / "good"), steps=1, eval_every=1, max_len=32, batch_size=4, eval_examples=4,
                 train_examples=8, data="kind")
    finetune(FinetuneRecipe(out=str(root / "tuned"), **tuned), progress=False)
    finetune(FinetuneRecipe(out=str(root / "adapter"), peft="lora", **tuned), progress=False)
    return root


def run(words: list[str], **places) -> tuple[int, str]:
    result = CliRunner().invoke(app, [w.format(**places) for w in words])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        "a traceback instead of a one-line error", result.exception)
    return result.exit_code, result.output


def one_error_line(output: str) -> bool:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: ")


@pytest.mark.parametrize("verb, broken", CASES, ids=[f"{v}: {m}" for v, m in CASES])
def test_broken_model_is_one_line_and_nothing_is_left(good, tmp_path, verb, broken):
    model = tmp_path / "model"
    shutil.copytree(good / "good", model)
    BROKEN_MODELS[broken](model)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = run(VERBS[verb], MODEL=model, GOOD=good / "good", TUNED=good / "tuned", ADAPTER=good / "adapter",
                       OUT=tmp_path / "out")
    assert code == 2 and one_error_line(output), output
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was left behind"


BROKEN_ADAPTERS = {
    "config is a list": lambda f: (f / "adapter_config.json").write_text("[1, 2]"),
    "unknown peft type": lambda f: _adapter_config(f, peft_type="NOPE"),
    "targets match nothing": lambda f: _adapter_config(f, target_modules=["no_such_module"]),
    "no weights": lambda f: (f / "adapter_model.safetensors").unlink(),
    "truncated weights": lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00"),
}


def _adapter_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


ADAPTER_VERBS = {
    "port": ["port", "--adapter", "{ADAPTER}", "--to", "{GOOD}", "{OUT}"],
    "recycle": ["recycle", "--old-base", "{GOOD}", "--new-base", "{GOOD}", "--task-weights", "{ADAPTER}", "--steps", "1",
                "--max-len", "32", "{OUT}"],
    "export": ["export", "{ADAPTER}", "{OUT}", "--base", "{GOOD}"],
}


@pytest.mark.parametrize("verb", ADAPTER_VERBS)
@pytest.mark.parametrize("broken", BROKEN_ADAPTERS)
def test_broken_adapter_is_one_line_and_nothing_is_left(good, tmp_path, verb, broken):
    adapter = tmp_path / "adapter"
    shutil.copytree(good / "adapter", adapter)
    BROKEN_ADAPTERS[broken](adapter)
    words = ADAPTER_VERBS[verb]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = run(words, GOOD=good / "good", ADAPTER=adapter, OUT=tmp_path / "out")
    assert code == 2 and one_error_line(output), output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _rows(labels) -> str:
    return "\n".join(json.dumps({"text": f"document {i} about something", "label": y}) for i, y in enumerate(labels))


BROKEN_DATA = {
    "one label": _rows(["a"] * 40),
    "mixed label types": _rows([1, "b"] * 20),
    "empty file": "",
    "no label column": "\n".join(json.dumps({"text": f"document {i}"}) for i in range(40)),
}


SHORT = ["--steps", "1", "--max-len", "32", "{OUT}"]
DATA_VERBS = {"finetune": ["finetune", "--model", "{GOOD}", "--data", "{DATA}", *SHORT],
              "learn": ["learn", "--model", "{GOOD}", "--tasks", "kind,{DATA}", *SHORT]}


@pytest.mark.parametrize("verb", DATA_VERBS)
@pytest.mark.parametrize("broken", BROKEN_DATA)
def test_broken_data_is_one_line_and_nothing_is_left(good, tmp_path, broken, verb):
    (tmp_path / "data.jsonl").write_text(BROKEN_DATA[broken])
    code, output = run(DATA_VERBS[verb], GOOD=good / "good", DATA=tmp_path / "data.jsonl", OUT=tmp_path / "out")
    assert code == 2 and one_error_line(output), output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "port", "analyze", "grow"])
def test_unwritable_or_existing_output_is_one_line(good, tmp_path, verb):
    words = {
        "pretrain": ["pretrain", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "500", "--seq-len", "32",
                     "--steps", "1", "{OUT}"],
        "finetune": ["finetune", "--model", "{GOOD}", "--steps", "1", "--max-len", "32", "{OUT}"],
        "port": ["port", "--adapter", "{ADAPTER}", "--to", "{GOOD}", "{OUT}"],
        "analyze": ["analyze", "weights", "--a", "{GOOD}", "--b", "{GOOD}", "{OUT}"],
        "grow": ["grow", "{GOOD}", "{OUT}", "--layers", "2"],
    }[verb]
    for out in ("/proc/bequest-fuzz/out", tmp_path / "exists"):
        (tmp_path / "exists").mkdir(exist_ok=True)
        code, output = run(words, GOOD=good / "good", ADAPTER=good / "adapter", OUT=out)
        assert code == 2 and one_error_line(output), (out, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"] and not any((tmp_path / "exists").iterdir())
