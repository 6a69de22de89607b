"""Recyclable tuning: delta-init, adapter reuse, the distillation loss, continue-pretrain and the analyses."""

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from bequest.analyze import AnalyzeRecipe, analyze, evaluate, interpolate, weight_stats
from bequest.engine import labelled
from bequest.data.prepare import task_splits
from bequest.finetune import FinetuneRecipe, finetune
from bequest.io import load_tokenizer
from bequest.io import load_model, partial_dir, read_lineage
from bequest.peft import read_module
from bequest.pretrain import PretrainRecipe, pretrain
from bequest.recycle import ContinueRecipe, RecycleRecipe, continue_pretrain, recycle
from bequest.task_weights import delta_init, kd_trainer
from conftest import probe, tiny

VOCAB = 500
SMALL = dict(seq_len=32, batch_size=4, eval_blocks=4, lr=3e-3, warmup=1, save_every=100)
TASK = dict(data="kind", max_len=32, train_examples=48, eval_examples=24, batch_size=8, warmup=1, save_every=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """M_i (text domain), M_{i+1} (continued on the data domain), a wider base, and task weights on M_i."""
    root = tmp_path_factory.mktemp("recycle")
    base = dict(family="gpt2", layers=1, heads=2, vocab=VOCAB, domain="text", eval_every=8, **SMALL)
    pretrain(PretrainRecipe(out=str(root / "old"), hidden=32, steps=8, **base))
    pretrain(PretrainRecipe(out=str(root / "wide"), hidden=48, steps=1, **base))
    continue_pretrain(ContinueRecipe(model=str(root / "old"), out=str(root / "new"), domain="data", steps=6,
                                     eval_every=6, **SMALL))
    finetune(FinetuneRecipe(model=str(root / "old"), out=str(root / "full"), steps=6, eval_every=6, lr=3e-3, **TASK),
             progress=False)
    finetune(FinetuneRecipe(model=str(root / "old"), out=str(root / "lora"), peft="lora", steps=6, eval_every=6,
                            lr=1e-2, **TASK), progress=False)
    return root


def _recipe(world, out, **kw):
    fields = dict(old_base=str(world / "old"), new_base=str(world / "new"), task_weights=str(world / "full"), steps=4,
                  eval_every=2, lr=1e-3, **TASK)
    return RecycleRecipe(out=str(out), **{**fields, **kw})


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("family,lm", [("gpt2", "causal_lm"), ("bert", "masked_lm"), ("llama", "causal_lm")])
def test_delta_init_onto_an_unchanged_base_reproduces_the_tuned_model_exactly(family, lm):
    base = tiny(family, lm, seed=0)
    tuned = tiny(family, "seq_cls", seed=1)  # every weight differs from the base, as after long tuning
    moved = delta_init(base, base, tuned)
    for (name, p), (_, q) in zip(tuned.named_parameters(), moved.named_parameters()):
        assert torch.equal(p, q), name
    # A changed base: the body moves by (new - old), the head stays as tuned.
    new = tiny(family, lm, seed=2)
    moved = delta_init(base, new, tuned)
    old_p, new_p = dict(base.named_parameters()), dict(new.named_parameters())
    from bequest.anatomy import TASK_ROLES, anatomy

    a_base, a_tuned = anatomy(base), anatomy(tuned)
    base_names = a_base.names(old_p)
    for name, slot in a_tuned.slots(dict(tuned.named_parameters())).items():
        got, had = moved.get_parameter(name), tuned.get_parameter(name)
        if slot.role in TASK_ROLES:
            assert torch.equal(got, had), name
        else:
            b = base_names[str(slot)]
            assert torch.allclose(got, had + new_p[b] - old_p[b], atol=1e-6), name


def test_delta_init_refuses_a_base_of_another_shape():
    from bequest.errors import BequestError

    with pytest.raises(BequestError, match="recycling needs bases of the tuned model's shape"):
        delta_init(tiny("gpt2", "causal_lm"), tiny("gpt2", "causal_lm", hidden=48), tiny("gpt2", "seq_cls"))


# ---------------------------------------------------------------- interpolation


def test_interpolation_reproduces_its_endpoints():
    a, b = tiny("bert", "seq_cls", seed=0), tiny("bert", "seq_cls", seed=1)
    for lam, want in ((0.0, a), (1.0, b)):
        got = interpolate(a, b, lam)
        for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
            assert torch.equal(p, q), (lam, name)
    mid = interpolate(a, b, 0.5)
    assert torch.allclose(mid.classifier.weight, (a.classifier.weight + b.classifier.weight) / 2)
    same = weight_stats(a, a)
    assert same["l2"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert weight_stats(a, b)["l2"] > 0 and len(weight_stats(a, b)["per_layer"]) == 2


# ---------------------------------------------------------------- distillation


def test_alpha_and_beta_zero_is_plain_cross_entropy(tmp_path):
    student, teacher = tiny("bert", "seq_cls", seed=0), tiny("bert", "seq_cls", seed=1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    mask = torch.ones(2, 16, dtype=torch.long)
    batch = {"input_ids": probe(), "attention_mask": mask, "labels": torch.tensor([0, 2])}
    r = RecycleRecipe(out="o", old_base="a", new_base="b", task_weights="t", alpha=0.0, beta=0.0)
    trainer = kd_trainer(teacher, r)(model=student, args=args)
    student.eval()
    with torch.no_grad():
        plain = student(**batch).loss
    student.training = True  # the trainer picks the KD loss by .training; eval() keeps dropout off
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
    assert torch.allclose(loss, plain, rtol=0, atol=1e-6)
    # With alpha and beta on, the old model's logits and hidden states come in.
    r = r.model_copy(update={"alpha": 0.5, "beta": 1.0})
    trainer = kd_trainer(teacher, r)(model=student, args=args)
    with torch.no_grad():
        mixed = trainer.compute_loss(student, dict(batch))
    parts = {k: v[-1] for k, v in trainer._parts.items()}
    assert parts["kl"] > 0 and parts["mse"] > 0 and not torch.allclose(mixed, plain)


# ---------------------------------------------------------------- end to end


def test_continue_pretrain_records_its_lineage(world):
    lineage = read_lineage(world / "new")
    assert lineage["operation"] == "continue-pretrain" and lineage["parent"] == str(world / "old")
    assert lineage["recipe"]["domain"] == "data"
    old, _ = load_model(world / "old")
    new, _ = load_model(world / "new")
    assert not torch.equal(old.transformer.h[0].attn.c_attn.weight, new.transformer.h[0].attn.c_attn.weight)


@pytest.mark.parametrize("weights", ["full", "lora"])
def test_init_onto_the_same_base_starts_where_the_tuned_model_ended(tmp_path, world, weights):
    r = _recipe(world, tmp_path / "out", new_base=str(world / "old"), task_weights=str(world / weights), method="init")
    metrics = recycle(r, progress=False)
    tuned = json.loads((world / weights / "eval.json").read_text())["eval_accuracy"]
    assert metrics["curve"][0] == (0, pytest.approx(tuned))
    if weights == "full":
        assert read_lineage(tmp_path / "out")["operation"] == "recycle-init"
        assert load_model(tmp_path / "out")[0].config.num_labels == 4
    else:
        assert read_module(tmp_path / "out").kind == "lora"
        config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(world / "old")


@pytest.mark.parametrize("weights,method", [("full", "combined"), ("lora", "distill"), ("full", "fresh")])
def test_every_method_trains_on_the_new_base(tmp_path, world, weights, method):
    r = _recipe(world, tmp_path / "out", task_weights=str(world / weights), method=method, beta=0.1)
    metrics = recycle(r, progress=False)
    assert [s for s, _ in metrics["curve"]] == [0, 2, 4]
    assert (tmp_path / "out" / "eval.json").exists() and not partial_dir(tmp_path / "out").exists()
    if method != "fresh":
        rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        assert any("kd_kl" in row and "kd_mse" in row for row in rows)


def test_an_adapter_that_does_not_fit_the_new_base_exits_2_and_writes_nothing(tmp_path, world):
    from bequest.cli import app
    out = tmp_path / "out"
    args = ["recycle", out, "--old-base", world / "old", "--new-base", world / "wide", "--task-weights",
            world / "lora", "--data", "kind", "--method", "init", "--steps", 2, "--max-len", 32]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert "does not fit" in r.output and "is [" in r.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- analyses


def test_analyses_write_json_and_figures(tmp_path, world):
    common = dict(a=str(world / "full"), data="kind", max_len=32, eval_examples=16)
    moved = tmp_path / "moved"
    recycle(_recipe(world, moved, method="init"), progress=False)
    result = analyze(AnalyzeRecipe(kind="lmc", b=str(moved), out=str(tmp_path / "lmc"), points=5, **common))
    tok = load_tokenizer(world / "full")
    encoded = labelled(task_splits("kind", eval_examples=16)[1], tok, 32)
    for row, path in ((result["points"][0], world / "full"), (result["points"][-1], moved)):
        assert row == {"lambda": row["lambda"], **evaluate(load_model(path)[0], encoded, tok)}
    assert len(result["points"]) == 5 and result["loss_barrier"] >= 0
    sim = analyze(AnalyzeRecipe(kind="similarity", b=str(world / "new"), out=str(tmp_path / "sim"), **common))
    assert len(sim["matrix"]) == 2 and len(sim["matrix"][0]) == 2  # embeddings + 1 block, each side
    att = analyze(AnalyzeRecipe(kind="similarity", features="attention", b=str(world / "full"),
                                out=str(tmp_path / "att"), **common))
    assert att["matrix"][0][0] == pytest.approx(1.0)  # a model is its own best match
    analyze(AnalyzeRecipe(kind="weights", b=str(world / "new"), out=str(tmp_path / "w"), **common))
    for kind, folder in (("lmc", "lmc"), ("similarity", "sim"), ("similarity", "att"), ("weights", "w")):
        assert (tmp_path / folder / f"{kind}.png").stat().st_size > 1000
        assert json.loads((tmp_path / folder / f"{kind}.json").read_text())["kind"] == kind


@pytest.mark.parametrize("kind", ["ia3", "prefix", "prompt"])
def test_every_peft_type_is_carried_over_unchanged(tmp_path, world, kind):
    short = {**TASK, "max_len": 24}  # prompt and prefix tuning's virtual tokens take positions too
    source = tmp_path / kind
    tuned = finetune(FinetuneRecipe(model=str(world / "old"), out=str(source), peft=kind, steps=2, eval_every=2,
                                    lr=1e-2, **short), progress=False)
    r = _recipe(world, tmp_path / "same", new_base=str(world / "old"), task_weights=str(source), method="init",
                **{**short, "steps": 1, "eval_every": 1})
    assert recycle(r, progress=False)["curve"][0] == (0, pytest.approx(tuned["eval_accuracy"]))
    r = r.model_copy(update={"out": str(tmp_path / "new"), "new_base": str(world / "new"), "method": "combined"})
    recycle(r, progress=False)
    assert read_module(tmp_path / "new").kind == kind


@pytest.mark.parametrize("broken", ["missing", "truncated"])
def test_every_base_is_checked_whatever_the_method_reads(world, tmp_path, broken):
    """`--method init` with an adapter never loads the old base; a broken one must still be refused up front."""
    from bequest.cli import app
    import shutil

    old = tmp_path / "old"
    if broken == "truncated":
        shutil.copytree(world / "old", old)
        weights = old / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
    r = CliRunner().invoke(app, ["recycle", "--old-base", str(old), "--new-base", str(world / "new"), "--task-weights",
                                 str(world / "lora"), "--method", "init", "--data", "kind", "--steps", "1",
                                 str(tmp_path / "out")])
    assert r.exit_code == 2 and "error: " in r.output and str(old) in r.output, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
