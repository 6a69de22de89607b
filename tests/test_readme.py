"""The README's commands keep working: the quick start, the recipe example, and CI runs its test line."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bequest.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
# Appended to README commands so they finish in seconds; flags given later win.
FAST = ["--steps", "2", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "500", "--seq-len", "32",
        "--eval-every", "1", "--eval-blocks", "2", "--batch-size", "2"]
TUNE = ["--max-len", "24", "--train-examples", "16", "--eval-examples", "8", "--batch-size", "4", "--eval-every", "1"]
SHORT = {"pretrain": FAST, "continue-pretrain": ["--steps", "2", "--seq-len", "32", "--eval-blocks", "2",
                                                 "--batch-size", "2", "--eval-every", "1"],
         "finetune": ["--steps", "2", *TUNE], "upgrade": TUNE, "learn": ["--steps-per-task", "2", *TUNE],
         "demo": ["--quick"]}


def write_learn_files(folder: Path) -> None:
    """Stand-ins for the labelled files the README's `learn` example reads, laid out as the README says."""
    moods = {"positive": "fast and clear", "negative": "slow and confusing"}
    rows = [{"text": f"{words}, review {i}", "label": mood} for i in range(40) for mood, words in moods.items()]
    (folder / "reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tickets").mkdir()
    for split, n in (("train", 30), ("validation", 8)):
        lines = [f"{kind} report number {i},{kind}" for i in range(n) for kind in ("bug", "feature")]
        (folder / "tickets" / f"{split}.csv").write_text("text,label\n" + "\n".join(lines) + "\n")


def bequest_commands() -> list[list[str]]:
    cmds = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "bequest":
                    cmds.append(words[1:])
    return cmds


def test_ci_runs_the_readme_test_command():
    test_line = next(body.strip() for lang, body in BLOCKS if lang == "bash" and "pytest" in body)
    assert test_line in (ROOT / ".ci" / "run").read_text()


@pytest.mark.timeout(900)  # may run the session's quick demo (conftest.demo_run) in its setup
@pytest.mark.xdist_group("demo")  # on the worker that runs it for tests/test_demo.py
def test_readme_commands_run(tmp_path, monkeypatch, demo_run):
    monkeypatch.chdir(tmp_path)
    write_learn_files(tmp_path)
    cmds = bequest_commands()
    assert cmds[0] == ["demo"]  # the first thing a newcomer runs shows what bequest is for
    for cmd in cmds:
        if cmd[0] == "demo":  # the slowest command: run once for the session, with --quick (conftest.demo_run)
            assert cmd + SHORT["demo"] == demo_run["command"]
            continue
        if cmd[0] in SHORT:  # the README's own commands, cut down to seconds
            cmd = cmd + SHORT[cmd[0]]
            if cmd[0] == "upgrade":
                cmd += ["--steps", str(min(2, int(cmd[cmd.index("--steps") + 1])))]
        result = CliRunner().invoke(app, cmd)
        assert result.exit_code == 0, (cmd, result.output)


def test_readme_recipe_example(tmp_path):
    body = next(body for lang, body in BLOCKS if lang == "yaml")
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(body)
    assert yaml.safe_load(body)["family"] == "llama"
    result = CliRunner().invoke(app, ["pretrain", "--recipe", str(recipe), *FAST, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
