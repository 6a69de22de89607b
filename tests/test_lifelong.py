"""Lifelong pre-training (ELLE): replay windows, AP/AP+, growth schedules, and a 3-domain stream end to end."""

import importlib.util
import json
from functools import partial
from pathlib import Path

from importlib import metadata

import numpy as np
import pytest
import yaml
from datasets import Dataset
from typer.testing import CliRunner

import bequest.lifelong.run as lifelong_run
from bequest.anatomy import anatomy
from bequest.engine.replay import Memory, replay_order
from bequest.errors import BequestError
from bequest.io import load_model, read_lineage
from bequest.data import packages
from bequest.lifelong import (
    LifelongRecipe, encode, lifelong, next_shape, parse_schedule, perplexity, prompt_id, rewarm_factor, stage_metrics,
)
from conftest import tiny

STREAM = ("text", "data", "system")
SMALL = dict(domains=",".join(STREAM), hidden=32, heads=2, layers=1, vocab=500, seq_len=32, batch_size=4,
             eval_blocks=4, memory_size=8, replay_fraction=0.25, warmup_steps=2, steps=3, eval_every=3,
             save_every=100, lr=3e-3, warmup=1, grow_schedule="hidden+16,layers+1")


@pytest.mark.parametrize("batch,fraction", [(16, 0.1), (8, 0.25), (5, 0.5), (4, 0.0)])
def test_every_batch_holds_the_set_fraction_of_memory(batch, fraction):
    n_new, n_mem, batches = 37, 11, 30
    order = replay_order(n_new, n_mem, batch, batches, fraction, seed=3)
    assert len(order) == batch * batches and all(0 <= i < n_new + n_mem for i in order)
    want = round(fraction * batch)
    assert [sum(i >= n_new for i in order[b * batch:(b + 1) * batch]) for b in range(batches)] == [want] * batches
    # Each pool is walked through whole permutations: every block is drawn, none twice more than another.
    counts = np.bincount(order, minlength=n_new + n_mem)
    assert counts[:n_new].min() >= 1 and counts[:n_new].max() - counts[:n_new].min() <= 1
    if want:
        assert counts[n_new:].min() >= 1 and counts[n_new:].max() - counts[n_new:].min() <= 1
    # Memory only (the recovery warm-up) and no memory at all.
    assert all(i >= 0 for i in replay_order(0, 7, 4, 3, 1.0, seed=0)) and len(replay_order(0, 7, 4, 3, 1.0, 0)) == 12
    assert all(i < n_new for i in replay_order(n_new, 0, batch, 5, 0.5, seed=0))


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_a_fraction_that_rounds_to_no_replay_is_refused(batch):
    # round(0.1 * 5) is round(0.5) = 0 too (round half to even): replay would silently be off.
    with pytest.raises(BequestError, match="--batch-size to 6 or more"):
        replay_order(37, 11, batch, 3, 0.1, seed=0)
    assert len(replay_order(37, 11, 6, 3, 0.1, seed=0)) == 18


def test_lifelong_refuses_a_replay_that_rounds_to_none_before_training(tmp_path):
    r = LifelongRecipe(out=str(tmp_path / "r"), **{**SMALL, "replay_fraction": 0.1}, method="replay")
    with pytest.raises(BequestError, match="--replay-fraction 0.1 of a batch of 4"):
        lifelong(r)
    assert not (tmp_path / ".r.partial").exists()


def test_per_domain_memory_and_its_windows():
    memory = Memory(seed=0, per_source=5)
    memory.add(Dataset.from_dict({"x": list(range(20))}))
    memory.add(Dataset.from_dict({"x": list(range(100, 103))}))
    assert [len(d) for d in memory.kept] == [5, 3]  # a cap per domain, in corpus order
    assert memory.kept[0]["x"] == sorted(memory.kept[0]["x"])
    new = Dataset.from_dict({"x": list(range(1000, 1040))})
    windows = memory.windows(new, 8, 4, 0.25, seed=1)["x"]
    assert [sum(x < 1000 for x in windows[i:i + 8]) for i in range(0, 32, 8)] == [2] * 4
    assert all(x < 1000 for x in memory.windows(None, 8, 2, 1.0, seed=1)["x"])


def test_ap_and_ap_plus_by_hand():
    domains = ["a", "b", "c"]
    ppl = [{"a": 10.0, "b": 50.0, "c": 60.0},
           {"a": 12.0, "b": 20.0, "c": 40.0},
           {"a": 15.0, "b": 23.0, "c": 8.0}]
    got = stage_metrics(ppl, domains)
    assert got[0] == {"AP": 10.0, "AP+": None}
    assert got[1]["AP"] == pytest.approx((12 + 20) / 2) and got[1]["AP+"] == pytest.approx(12 - 10)
    assert got[2]["AP"] == pytest.approx((15 + 23 + 8) / 3)
    assert got[2]["AP+"] == pytest.approx(((15 - 10) + (23 - 20)) / 2)


def test_schedule_parsing_and_shapes():
    assert parse_schedule("hidden+32, layers+1") == [[("hidden", "+", 32), ("layers", "+", 1)]]
    assert parse_schedule("layers+1;hidden=96") == [[("layers", "+", 1)], [("hidden", "=", 96)]]
    assert parse_schedule("layers*2") == [[("layers", "*", 2)]]
    for bad in ("width+3", "layers/2", "layers*"):
        with pytest.raises(ValueError, match="KEY\\+N, KEY\\*N or KEY=N"):
            parse_schedule(bad)
    a = anatomy(tiny("gpt2", "causal_lm", hidden=32, heads=2, ffn=64))
    assert next_shape(a, [("hidden", "+", 16), ("layers", "+", 1)]) == {"hidden": 48, "ffn": 96, "layers": 3}
    assert next_shape(a, [("ffn", "=", 100)]) == {"hidden": 32, "ffn": 100, "layers": 2}
    assert next_shape(a, [("hidden", "*", 2), ("layers", "*", 2)]) == {"hidden": 64, "ffn": 128, "layers": 4}


def test_prompted_and_plain_blocks_score_the_same_tokens():
    plain = {k: v.tolist() for k, v in encode([[5, 6, 0, 7]], None, pad=0).items()}
    prompted = {k: v.tolist() for k, v in encode([[5, 6, 0, 7]], 99, pad=0).items()}
    assert plain == {"input_ids": [[5, 6, 0, 7]], "labels": [[-100, 6, -100, 7]]}
    assert prompted == {"input_ids": [[99, 5, 6, 0, 7]], "labels": [[-100, -100, 6, -100, 7]]}


def test_three_domain_stream_end_to_end_and_resume(tmp_path, monkeypatch):
    real, calls, firsts = lifelong_run.train, [], []

    def dies_in_stage_two(*args, **kwargs):
        calls.append(Path(args[5]).name)
        firsts.append([row[0] for row in args[3]["input_ids"]])  # each block's prompt: which domain it is from
        if len(calls) == 4:  # stage 0 train, stage 1 recover + train, then stage 2's recovery
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lifelong_run, "train", dies_in_stage_two)
    out = tmp_path / "elle"
    r = LifelongRecipe(out=str(out), **SMALL)
    with pytest.raises(KeyboardInterrupt):
        lifelong(r)
    assert not out.exists() and (tmp_path / ".elle.partial" / "stage1-data" / "stage.json").exists()
    metrics = lifelong(r)
    assert calls[4:] == ["recover", "stage2-system"]  # stages 0 and 1 were kept

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["domains"] == list(STREAM)
    assert (out / "ap.png").stat().st_size > 1000 and (out / "domains.png").stat().st_size > 1000
    stages = saved["stages"]
    assert [(s["shape"]["hidden"], s["shape"]["layers"]) for s in stages] == [(32, 1), (48, 2), (64, 3)]
    assert [(s["recover_steps"], s["replay_fraction"]) for s in stages] == [(0, 0), (2, 0.25), (2, 0.25)]
    assert [s["memory_per_batch"] for s in stages] == [0, 1, 1]

    # Exact growth: at the moment of growth every domain's perplexity is the previous stage's.
    for prev, s in zip(stages, stages[1:]):
        for d in STREAM:
            assert s["ppl_grown"][d] == pytest.approx(prev["ppl"][d], rel=1e-4)
    # AP and AP+ by hand from the stored perplexities.
    p = [s["ppl"] for s in stages]
    assert stages[2]["AP"] == pytest.approx(np.mean([p[2]["text"], p[2]["data"], p[2]["system"]]))
    assert stages[2]["AP+"] == pytest.approx(((p[2]["text"] - p[0]["text"]) + (p[2]["data"] - p[1]["data"])) / 2)
    assert stages[1]["AP+"] == pytest.approx(p[1]["text"] - p[0]["text"]) and stages[0]["AP+"] is None

    # What trained: stage 1's recovery warm-up on memory only, then every batch of 4 holds exactly one
    # memory block (round(0.25 * 4)); stage 2's batches draw theirs from both earlier domains.
    model, tok = load_model(out / "stage2-system")
    ids = {d: prompt_id(tok, d) for d in STREAM}
    assert set(firsts[0]) == {ids["text"]} and set(firsts[1]) == {ids["text"]}
    for trained, domain in ((firsts[2], "data"), (firsts[5], "system")):
        windows = [trained[i:i + 4] for i in range(0, len(trained), 4)]
        assert len(windows) == 3 and all(sum(t != ids[domain] for t in w) == 1 for w in windows)
    assert set(firsts[4]) == {ids["text"], ids["data"]}

    # Every stage is a normal HF folder whose lineage points at the previous one.
    parents = [None, str(out / "stage0-text"), str(out / "stage1-data")]
    for k, (d, parent) in enumerate(zip(STREAM, parents)):
        folder = out / f"stage{k}-{d}"
        assert read_lineage(folder)["parent"] == parent and read_lineage(folder)["operation"] == "lifelong:elle"
        assert not (folder / "checkpoints").exists() and (folder / "metrics.jsonl").exists()

    # The domain prompts are stored with the model: reloaded, they give the recorded perplexity, and
    # the wrong domain's prompt gives another.
    assert len(set(ids.values())) == 3 and None not in ids.values()
    from bequest import data
    from bequest.engine import lm_blocks

    blocks = list(lm_blocks(data.load_corpus("data", "validation"), tok, 32)["input_ids"])[:4]
    right = perplexity(model, Dataset.from_dict(encode(blocks, ids["data"], tok.pad_token_id)))
    wrong = perplexity(model, Dataset.from_dict(encode(blocks, ids["system"], tok.pad_token_id)))
    assert right == pytest.approx(stages[2]["ppl"]["data"], rel=1e-5) and wrong != pytest.approx(right, rel=1e-6)


def test_naive_baseline_keeps_size_and_budget_sets_steps(tmp_path):
    budget = 2.5e8
    r = LifelongRecipe(out=str(tmp_path / "naive"), **{**SMALL, "domains": "text,data"}, method="naive",
                       budget_flops=budget)
    metrics = lifelong(r)
    stages = metrics["stages"]
    assert [s["shape"]["hidden"] for s in stages] == [32, 32] and not metrics["prompts"]
    assert all(s["ppl_grown"] is None and s["recover_steps"] == 0 and s["replay_fraction"] == 0 for s in stages)
    for s in stages:  # the budget, spent to within one step
        per_step = s["flops"] / s["steps"]
        assert budget - per_step < s["flops"] <= budget
    model, tok = load_model(tmp_path / "naive" / "stage1-data")
    assert prompt_id(tok, "text") is None


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_of_a_recovery_warm_up_stay_with_their_stage(tmp_path):
    r = LifelongRecipe(out=str(tmp_path / "elle"), **{**SMALL, "domains": "text,data", "steps": 2}, method="elle",
                       report_to="tensorboard")
    assert lifelong(r)["stages"][1]["recover_steps"] == 2
    for events in ("stage0-text/runs", "stage1-data/runs", "stage1-data/runs/recover"):
        assert list((tmp_path / "elle" / events).glob("events.out.tfevents.*")), events


def test_cli_refuses_bad_settings_in_one_line(tmp_path):
    from bequest.cli import app
    bad = CliRunner().invoke(app, ["lifelong", str(tmp_path / "x"), "--grow-schedule", "width+3"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "KEY+N" in bad.output, bad.output
    bad = CliRunner().invoke(app, ["lifelong", str(tmp_path / "x"), "--domains", "text,text"])
    assert bad.exit_code == 2 and "distinct" in bad.output, bad.output
    bad = CliRunner().invoke(app, ["lifelong", str(tmp_path / "x"), "--family", "bert", "--domains", "text"])
    assert bad.exit_code == 2 and "'qwen2', not 'bert'" in bad.output, bad.output  # the causal families
    bad = CliRunner().invoke(app, ["lifelong", str(tmp_path / "x"), "--width", "nope", "--domains", "text,data",
                                   "--vocab", "500", "--hidden", "32", "--heads", "2"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "width" in bad.output, bad.output
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_llama_growth_only_keeps_perplexity_at_growth(tmp_path):
    r = LifelongRecipe(out=str(tmp_path / "grow"), **{**SMALL, "domains": "text,data", "steps": 2}, family="llama",
                       kv_heads=1, method="grow")
    stages = lifelong(r)["stages"]
    assert stages[1]["shape"] == {"hidden": 48, "heads": 3, "kv_heads": 1, "ffn": 192, "layers": 2}
    assert stages[1]["ppl_grown"]["text"] == pytest.approx(stages[0]["ppl"]["text"], rel=1e-4)
    assert stages[1]["recover_steps"] == 0 and stages[1]["replay_fraction"] == 0


def test_rewarm_factor_by_hand():
    f = partial(rewarm_factor, steps=10, warmup=2, floor=0.1)
    assert [f(s) for s in (0, 1, 2)] == pytest.approx([0.1, 0.55, 1.0])  # re-warms from the floor
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine re-decay
    assert f(10) == pytest.approx(0.1) and f(12) == pytest.approx(0.1)  # where the next stage starts from
    assert rewarm_factor(0, 5, 0, 0.2) == 1.0 and rewarm_factor(5, 5, 0, 0.2) == pytest.approx(0.2)


def test_rewarm_restarts_the_learning_rate_each_domain_with_the_replay_share_on_the_packages_corpus(
        tmp_path, monkeypatch):
    # Three small installed packages stand in for the big domains (same code path, seconds to build).
    monkeypatch.setattr(packages, "DOMAINS", {"stdlib": (), "rich": ("rich",), "pydantic": ("pydantic",),
                                              "accelerate": ("accelerate",)})
    packages._domain_docs.cache_clear()
    real_train, real_sets, stages, sets = lifelong_run.train, lifelong_run._domain_sets, [], []

    def recording(*args, trainer_class, **kwargs):
        lrs, batches = [], []

        def make(*a, **kw):  # the verb's own Trainer, watched: the rate and the batch of every step
            t = trainer_class(*a, **kw)
            step = t.training_step

            def watched(model, inputs, *rest, **more):
                lrs.append(t.lr_scheduler.get_last_lr()[0])
                batches.append(inputs["input_ids"].tolist())
                return step(model, inputs, *rest, **more)

            t.training_step = watched
            return t

        metrics = real_train(*args, trainer_class=make, **kwargs)
        stages.append((lrs, batches))
        return metrics

    monkeypatch.setattr(lifelong_run, "train", recording)
    monkeypatch.setattr(lifelong_run, "_domain_sets", lambda *a: sets.append(real_sets(*a)) or sets[-1])
    lr, steps, warmup = 3e-3, 5, 2
    r = LifelongRecipe(out=str(tmp_path / "rw"), **{**SMALL, "domains": "rich,pydantic,accelerate", "steps": steps,
                                                   "warmup": warmup}, corpus="packages", method="rewarm")
    metrics = lifelong(r)
    packages._domain_docs.cache_clear()

    want = [lr * rewarm_factor(s, steps, warmup, r.lr_floor) for s in range(steps)]
    assert [lrs for lrs, _ in stages] == [pytest.approx(want)] * 3
    for lrs, _ in stages:  # every domain: from the floor up to the peak, then back down towards the floor
        assert lrs[0] == pytest.approx(0.1 * lr) and lrs[warmup] == pytest.approx(lr)
        assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])) and lrs[-1] > 0.1 * lr
    new = [{tuple(ids[1:]) for ids in ds["input_ids"]} for ds in sets[0][0]]  # each domain's training blocks
    for k, (_, batches) in enumerate(stages):  # round(0.25 * 4) = 1 memory block in every batch after the first
        assert len(batches) == steps and all(len(b) == 4 for b in batches)
        assert [sum(tuple(row[1:]) not in new[k] for row in b) for b in batches] == [0 if k == 0 else 1] * steps
    s = metrics["stages"]
    assert [x["replay_fraction"] for x in s] == [0, 0.25, 0.25] and not metrics["prompts"]
    assert [x["shape"]["hidden"] for x in s] == [32] * 3
    saved = yaml.safe_load((tmp_path / "rw" / "stage2-accelerate" / "recipe.yaml").read_text())
    assert saved["method"] == "rewarm" and saved["corpus_versions"]["accelerate"] == metadata.version("accelerate")
