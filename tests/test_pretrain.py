"""The engine through `bequest pretrain`: learning, determinism, resume after SIGKILL, 2 processes."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from bequest.cli import app
from bequest.engine.train import _Bookkeeping
from bequest.errors import BequestError

TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "500", "--seq-len", "32", "--batch-size", "4",
        "--eval-blocks", "8"]


# One thread everywhere: bit-identical comparisons need the same reduction order in every process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bequest", *map(str, args)], capture_output=True, text=True, env=ENV)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def evals(folder: Path) -> list[float]:
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_pretrain_lowers_validation_loss(tmp_path):
    out = tmp_path / "m"
    r = invoke("pretrain", "--family", "gpt2", *TINY, "--steps", "60", "--eval-every", "20", "--lr", "3e-3", out)
    assert r.exit_code == 0, r.output
    losses = evals(out)
    assert len(losses) >= 4  # step 0 and every 20 steps
    assert abs(losses[0] - math.log(500)) < 0.5  # an untrained model is about uniform over the vocabulary
    assert losses[-1] < losses[0] - 0.7, losses
    assert (out / "recipe.yaml").exists() and (out / "README.md").exists() and (out / "tokenizer.json").exists()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["steps"] == 60
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    info = invoke("info", out)
    assert info.exit_code == 0 and "lineage" in info.output and "pretrain" in info.output


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "mistral", "qwen2"])
def test_pretrain_every_family(tmp_path, family):
    out = tmp_path / family
    r = invoke("pretrain", "--family", family, *TINY, "--steps", "8", "--eval-every", "4", "--lr", "3e-3", out)
    assert r.exit_code == 0, r.output
    losses = evals(out)
    assert losses[-1] < losses[0], losses
    from bequest.io import load_model

    model, tok = load_model(out)
    assert model.config.model_type == family and tok is not None


def test_same_seed_same_weights(tmp_path):
    args = ["pretrain", "--family", "llama", *TINY, "--steps", "6", "--eval-every", "3"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert invoke(*args, "--seed", seed, tmp_path / name).exit_code == 0
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert not same_weights(tmp_path / "a", tmp_path / "c")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["pretrain", "--family", "gpt2", *TINY, "--steps", "40", "--eval-every", "10", "--save-every", "10"]
    assert cli(*args, tmp_path / "whole").returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bequest", *map(str, args), str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    ckpts = tmp_path / ".killed.partial" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "checkpoint-20").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "a killed run must not leave a folder that looks complete"
    assert (ckpts / "checkpoint-20").exists()
    resumed = cli(*args, killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Trainer restores weights, AdamW moments, scheduler, RNG and data position: bit-identical on CPU.
    assert same_weights(tmp_path / "whole", killed)
    rows = [json.loads(r) for r in (killed / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(r) for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]

    def timeless(rs):
        # Wall-clock figures differ between any two runs, and the Trainer's closing train_loss averages
        # only the steps this process ran; everything else must match exactly.
        skip = ("runtime", "per_second", "train_loss")
        return [{k: v for k, v in r.items() if not any(s in k for s in skip)} for r in rs]

    assert timeless(rows) == timeless(whole), "the resumed run's log must read as one uninterrupted run"


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("pretrain", *TINY, "--steps", "2", out)
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_recipe_file_and_flag_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"family": "qwen2", "layers": 1, "hidden": 32, "heads": 2, "vocab": 500,
                                      "seq_len": 32, "batch_size": 4, "eval_blocks": 4, "steps": 50, "eval_every": 2}))
    out = tmp_path / "m"
    r = invoke("pretrain", "--recipe", recipe, "--steps", "2", out)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["family"] == "qwen2" and saved["steps"] == 2 and saved["out"] == str(out)


@pytest.mark.parametrize(
    "content,expected",
    [
        ({"family": "gpt3"}, "family"),
        ({"layers": "many"}, "layers"),
        ({"stepz": 3}, "stepz"),
        ("family: [unclosed", "not valid YAML"),
        (["a", "b"], "must be a mapping"),
    ],
)
def test_bad_recipe_one_line_exit_2(tmp_path, content, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    r = invoke("pretrain", "--recipe", recipe, tmp_path / "m")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "m").exists()


def test_bad_flags_exit_2():
    r = invoke("pretrain", "--hidden", "30", "--heads", "4", "/nonexistent/x")
    assert r.exit_code == 2 and "multiple of --heads" in r.output


def test_nan_loss_is_a_clear_error(tmp_path):
    guard = _Bookkeeping(tmp_path / "m.jsonl", 1, True)

    class State:
        global_step, num_input_tokens_seen, is_world_process_zero = 7, 0, True

    with pytest.raises(BequestError, match="loss became nan at step 7; lower --lr"):
        guard.on_log(None, State(), None, logs={"loss": float("nan")})


def test_pretrain_on_your_own_text_files(tmp_path):
    import pydoc_data.topics

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [p.strip() for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p.strip()) > 40]
    (corpus / "train.txt").write_text("\n".join(lines[:1500]))
    (corpus / "validation.txt").write_text("\n".join(lines[1500:1700]))
    out = tmp_path / "m"
    r = invoke("pretrain", "--family", "llama", *TINY, "--steps", "4", "--eval-every", "2", "--corpus", corpus, out)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["corpus"] == str(corpus)
    bad = invoke("pretrain", *TINY, "--corpus", tmp_path / "nowhere", tmp_path / "n")
    assert bad.exit_code == 2 and "nowhere" in bad.output and not (tmp_path / "n").exists()


# ---------------------------------------------------------------- outputs under faults


def one_error_line(output: str, says: str) -> bool:
    """The error is one whole line of its own (progress bars of data preparation may come before it)."""
    lines = [line for line in output.splitlines() if "error:" in line]
    return len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0] and output.endswith(lines[0] + "\n")


def test_second_run_into_a_busy_out_is_refused(tmp_path):
    out = tmp_path / "m"
    args = ["pretrain", *TINY, "--steps", "400", "--eval-every", "400", "--save-every", "400"]
    first = subprocess.Popen([sys.executable, "-m", "bequest", *map(str, args), str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".m.partial").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = invoke(*args[:-6], "--steps", "2", out)
        assert second.exit_code == 2 and one_error_line(second.output, "in use by another bequest run")
    finally:
        first.kill()
        first.wait()


def test_stale_temporary_folder_of_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / ".m.tmp-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert invoke("pretrain", *TINY, "--steps", "2", tmp_path / "m").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_rerun_with_other_settings_replaces_a_run_without_progress(tmp_path):
    """After a NaN stop before any checkpoint, following the advice (another --lr) must just work; a run
    with checkpoints is kept until the user says --overwrite."""
    for name, progress in (("m", False), ("k", True)):
        work = tmp_path / f".{name}.partial"
        (work / "checkpoints" / "checkpoint-10").mkdir(parents=True)
        (work / "recipe.yaml").write_text(yaml.safe_dump({"lr": 100.0}))
        if progress:
            (work / "checkpoints" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert invoke("pretrain", *TINY, "--steps", "2", tmp_path / "m").exit_code == 0
    r = invoke("pretrain", *TINY, "--steps", "2", tmp_path / "k")
    assert r.exit_code == 2 and "a checkpoint in" in r.output and "--overwrite" in r.output, r.output
    assert invoke("pretrain", *TINY, "--steps", "2", "--overwrite", tmp_path / "k").exit_code == 0


def test_corrupt_resume_checkpoint_is_named(tmp_path, monkeypatch):
    import bequest.pretrain

    args = [*TINY, "--steps", "4", "--eval-every", "2", "--save-every", "2", tmp_path / "m"]

    def crash(*a, **k):
        raise RuntimeError("killed")  # the run dies after training, before its output is in place

    monkeypatch.setattr(bequest.pretrain, "atomic_dir", crash)
    assert isinstance(invoke("pretrain", *args).exception, RuntimeError)
    monkeypatch.undo()
    ckpts = tmp_path / ".m.partial" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (ckpts / "checkpoint-4" / "optimizer.pt").write_bytes(b"not a checkpoint")
    r = invoke("pretrain", *args)
    assert r.exit_code == 2 and "checkpoint-4 is unreadable" in r.output and "delete that folder" in r.output
    import shutil

    shutil.rmtree(ckpts / "checkpoint-4")
    r = invoke("pretrain", *args)
    assert r.exit_code == 0, r.output


def test_overwrite_through_a_symlink_leaves_no_old_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    assert invoke("pretrain", *TINY, "--steps", "2", "--overwrite", tmp_path / "link").exit_code == 0
    assert (tmp_path / "link" / "config.json").exists() and not (tmp_path / "link").is_symlink()
    assert (real / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_unwritable_out_and_unreadable_recipe_are_one_line_errors(tmp_path):
    r = invoke("pretrain", *TINY, "--steps", "2", "/proc/bequest-test/m")
    assert r.exit_code == 2 and one_error_line(r.output, "cannot write into"), r.output
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe\x00steps: 2")
    r = invoke("pretrain", "--recipe", recipe, tmp_path / "m")
    assert r.exit_code == 2 and one_error_line(r.output, "not UTF-8"), r.output


def test_fp16_on_a_machine_without_cuda_is_one_line_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    r = invoke("pretrain", *TINY, "--steps", "2", "--fp16", tmp_path / "m")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: --fp16 needs a CUDA GPU and this machine has none") and not (tmp_path / "m").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_leaves_event_files_in_the_output(tmp_path):
    out = tmp_path / "m"
    r = invoke("pretrain", *TINY, "--steps", "2", "--eval-every", "1", "--bf16", "--gradient-checkpointing",
               "--report-to", "tensorboard", out)
    assert r.exit_code == 0, r.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "runs").glob("events.out.tfevents.*"):  # the final evaluation opens a file of its own
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss", "eval/loss"} <= tags, tags
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["report_to"] == "tensorboard" and recipe["bf16"] and recipe["gradient_checkpointing"]


# ---------------------------------------------------------------- growing while training (--grow-at)

ONE_WORKER = pytest.mark.xdist_group("grow-at")  # the tests of grown_run: one worker, so the run is made once
GROWING = ["pretrain", "--family", "gpt2", *TINY, "--steps", "8", "--eval-every", "2", "--save-every", "2",
           "--warmup", "2", "--grow-at", "3:layers*2,6:layers*2"]


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """A 1-layer GPT-2 stacked to 2 layers at step 3 and to 4 at step 6, trained 8 steps in all."""
    out = tmp_path_factory.mktemp("grow-at") / "whole"
    r = invoke(*GROWING, out)
    assert r.exit_code == 0, r.output
    assert "1 -> 2 layers at step 3" in r.output and "2 -> 4 layers at step 6" in r.output
    return out


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


@ONE_WORKER
def test_grow_at_doubles_the_depth_at_the_given_steps(grown_run):
    from bequest.io import load_config, read_lineage

    assert load_config(grown_run).n_layer == 4
    growths = [r for r in rows_of(grown_run) if "growth" in r]
    assert [(g["step"], g["growth"]["from"]["layers"], g["growth"]["to"]["layers"]) for g in growths] == [
        (3, 1, 2), (6, 2, 4)]
    assert [g["growth"]["layers"] for g in growths] == [[0, 0], [0, 1, 0, 1]]  # stack: the blocks copied on top
    for g in growths:  # stack is not function-preserving: both losses are measured, and they differ
        assert math.isfinite(g["growth"]["loss_before"]) and g["growth"]["loss_after"] != g["growth"]["loss_before"]
    card = read_lineage(grown_run)["growth"]
    assert [(c["step"], c["to"]["layers"], c["depth"]) for c in card] == [(3, 2, "stack"), (6, 4, "stack")]
    tree = invoke("lineage", grown_run)
    assert tree.exit_code == 0 and "grown while training: 1 -> 2 -> 4 layers at steps 3, 6 (stack)" in tree.output
    nodes = json.loads(invoke("lineage", grown_run, "--json").output)["nodes"]
    assert [g["step"] for g in nodes[0]["growth"]] == [3, 6]
    assert "grown while training" in (grown_run / "report.md").read_text()


@ONE_WORKER
def test_grow_at_counts_each_phase_at_its_own_size(grown_run):
    from bequest.anatomy import anatomy, make_config
    from bequest.engine import train_flops_per_token
    from bequest.io import load_config

    vocab = load_config(grown_run).vocab_size

    def per_token(layers):
        config = make_config("gpt2", layers=layers, hidden=32, heads=2, ffn=128, vocab=vocab, positions=32)
        return train_flops_per_token(anatomy(config, "causal_lm"), 32)

    per_step = 4 * 32  # batch x block
    expected = per_step * (3 * per_token(1) + 3 * per_token(2) + 2 * per_token(4))
    final = json.loads((grown_run / "eval.json").read_text())
    assert final["flops"] == expected and final["tokens"] == 8 * per_step
    assert expected < 8 * per_step * per_token(4)  # not all of it at the final size
    flops = [r["flops"] for r in rows_of(grown_run)]
    assert flops == sorted(flops) and flops[-1] == expected


@ONE_WORKER
def test_grow_at_keeps_the_learning_rate_schedule(grown_run):
    import transformers

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    used = []  # the rate of step s is the schedule's after s - 1 steps, as the Trainer logs it
    for _ in range(8):
        used.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    logged = {r["step"]: r["learning_rate"] for r in rows_of(grown_run) if "learning_rate" in r}
    assert sorted(logged) == [2, 4, 6, 8]  # 4 and 8: just after a growth, and the last step
    assert all(logged[s] == pytest.approx(used[s - 1], rel=1e-9) for s in logged), (logged, used)


@ONE_WORKER
def test_grow_at_carries_adam_moments_and_resumes_at_the_grown_shape(grown_run, tmp_path, monkeypatch):
    import transformers

    from bequest.io import load_config, load_model

    save = transformers.Trainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 4:
            raise RuntimeError("killed")  # after the first checkpoint at the grown size

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    assert isinstance(invoke(*GROWING, killed).exception, RuntimeError)
    monkeypatch.undo()
    ckpts = tmp_path / ".killed.partial" / "checkpoints"
    before, after = ckpts / "checkpoint-3", ckpts / "phase-1" / "checkpoint-3"
    assert (ckpts / "phase-1" / "checkpoint-4").exists() and not (ckpts / "phase-2").exists()
    assert load_config(after).n_layer == 2 == load_config(ckpts / "phase-1" / "checkpoint-4").n_layer

    def adam(ckpt):
        """{parameter name: AdamW state} as the Trainer reads the checkpoint back on resume."""
        model, _ = load_model(ckpt, with_tokenizer=False)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "scratch"), report_to="none", use_cpu=True)
        opt = transformers.Trainer(model=model, args=args).create_optimizer()
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        return {n: opt.state[p] for n, p in model.named_parameters()}

    old, new = adam(before), adam(after)
    assert len(new) > len(old) and all(s["step"].item() == 3 for s in new.values())
    for name, state in old.items():
        copies = [name.replace(".h.0.", f".h.{j}.") for j in (0, 1)] if ".h.0." in name else [name]
        for copy in copies:
            for m in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[copy][m], state[m]), (copy, m)
        assert state["exp_avg_sq"].abs().sum() > 0, name  # real history, not zeros

    resumed = invoke(*GROWING, killed)
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(grown_run, killed)
    skip = ("runtime", "per_second", "train_loss")

    def timeless(rs):
        return [{k: v for k, v in r.items() if not any(s in k for s in skip)} for r in rs]

    assert timeless(rows_of(killed)) == timeless(rows_of(grown_run))


@pytest.mark.parametrize(
    "grow_at,says",
    [
        ("3:layers*2,2:layers*2", "must come after 3"),
        ("8:layers*2", "before --steps 8"),
        ("3:layers*1", "must add layers"),
        ("3:layers=1", "must add layers"),
        ("3:hidden+32", "grows depth only"),
        ("3:layers^2", "KEY*N"),
        ("layers*2", "STEP:SIZES"),
        ("3:", "names no sizes"),
    ],
)
def test_bad_grow_at_is_one_line_exit_2(tmp_path, grow_at, says):
    r = invoke("pretrain", *TINY, "--steps", "8", "--grow-at", grow_at, tmp_path / "m")
    assert r.exit_code == 2 and one_error_line(r.output, says), r.output
    assert not list(tmp_path.iterdir())


def test_grow_at_refuses_what_the_depth_operator_cannot_do(tmp_path):
    r = invoke("pretrain", *TINY, "--steps", "8", "--grow-at", "3:layers=3", "--depth", "solar", tmp_path / "m")
    assert r.exit_code == 2 and one_error_line(r.output, "at most 2"), r.output
