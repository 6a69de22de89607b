"""Every training verb finishes under two processes (accelerate on CPU, gloo), and the README's
scaling-out line really starts two of them.

One launch runs all the verbs one after the other (the start-up of a launch costs more than a tiny run).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from bequest import data

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "500", "--seq-len", "32", "--batch-size", "4",
        "--eval-blocks", "4", "--eval-every", "3"]

DRIVER = '''
import json, sys
from pathlib import Path
from bequest.continual import LearnRecipe, learn
from bequest.finetune import FinetuneRecipe, finetune
from bequest.inherit import InheritRecipe, inherit
from bequest.lifelong import LifelongRecipe, lifelong
from bequest.pretrain import PretrainRecipe, pretrain
from bequest.recycle import ContinueRecipe, RecycleRecipe, continue_pretrain, recycle

root = Path(sys.argv[1])
lm = dict(seq_len=32, batch_size=4, eval_blocks=4, eval_every=2, steps=2)
task = dict(data="kind", max_len=32, batch_size=4, eval_examples=8, train_examples=16, eval_every=2, steps=2)
pretrain(PretrainRecipe(out=str(root / "g1"), layers=1, hidden=32, heads=2, vocab=500, **lm))
pretrain(PretrainRecipe(out=str(root / "stacked"), layers=1, hidden=32, heads=2, vocab=500, grow_at="1:layers*2", **lm))
continue_pretrain(ContinueRecipe(model=str(root / "g1"), out=str(root / "g1c"), domain="data", **lm))
inherit(InheritRecipe(teacher=str(root / "g1"), out=str(root / "g2"), layers=2, init="grow", **lm))
finetune(FinetuneRecipe(model=str(root / "g1"), out=str(root / "tuned"), peft="lora", **task), progress=False)
recycle(RecycleRecipe(old_base=str(root / "g1"), new_base=str(root / "g1c"), task_weights=str(root / "tuned"),
                      out=str(root / "recycled"), **task), progress=False)
learn(LearnRecipe(model=str(root / "g1"), out=str(root / "learned"), tasks="kind,visibility", max_len=32,
                  batch_size=4, eval_examples=8, train_examples=16, steps_per_task=2, warmup=0), progress=False)
for method in ("elle", "naive", "replay", "grow"):
    lifelong(LifelongRecipe(out=str(root / f"lifelong-{method}"), method=method, domains="text,data", layers=1,
                            hidden=32, heads=2, vocab=500, seq_len=31, batch_size=10, eval_blocks=4, steps=2,
                            warmup_steps=2, eval_every=2))
'''


def launch(*args, port: int, timeout: int = 500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def test_every_training_verb_finishes_under_two_processes(tmp_path):
    data.train_tokenizer("bpe", 500)  # into the cache first, so the two processes do not both train it
    (tmp_path / "driver.py").write_text(DRIVER)
    r = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(tmp_path / "driver.py"), str(tmp_path), port=29541)
    assert r.returncode == 0, r.stderr[-4000:]
    for out in ("g1", "stacked", "g1c", "g2", "tuned", "recycled", "learned", *(f"lifelong-{m}" for m in ("elle", "naive", "replay", "grow"))):
        assert (tmp_path / out).is_dir() and not (tmp_path / f".{out}.partial").exists(), out
    rows = [json.loads(x) for x in (tmp_path / "g1" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["tokens"] for x in rows) == 2 * 2 * 4 * 32  # 2 steps x 2 processes x 4 blocks x 32 tokens
    grew = [x for x in map(json.loads, (tmp_path / "stacked" / "metrics.jsonl").read_text().splitlines()) if "growth" in x]
    assert [(x["step"], x["growth"]["to"]["layers"]) for x in grew] == [(1, 2)]
    assert json.loads((tmp_path / "stacked" / "config.json").read_text())["n_layer"] == 2
    stages = json.loads((tmp_path / "lifelong-elle" / "metrics.json").read_text())["stages"]
    assert stages[1]["recover_steps"] == 2 and (tmp_path / "lifelong-elle" / "stage1-data" / "recover.jsonl").exists()


def test_readme_scaling_out_line_starts_two_processes(tmp_path):
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in re.findall(r"^accelerate launch .*$", readme, re.M) if "-m bequest" in x)
    words = shlex.split(line)
    verb_at = words.index("-m")
    launcher, command = words[2:verb_at], words[verb_at:]
    command = [w for w in command[:-1]] + TINY + ["--steps", "3", str(tmp_path / "out")]
    data.train_tokenizer("bpe", 500)
    r = launch(*launcher, *command, port=29543, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["tokens"] for x in rows) == 3 * 2 * 4 * 32, "the documented line must run two processes"
    # Only the main process logs: evaluations at the start, step 3, and the closing one.
    assert [x["step"] for x in rows if "eval_loss" in x] == [0, 3, 3]
