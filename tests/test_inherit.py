"""Knowledge inheritance: the KD loss and its invariants, the KD Trainer, and `inherit` end to end."""

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from safetensors.torch import load_file
from typer.testing import CliRunner

from bequest import data
from bequest.anatomy import anatomy
from bequest.engine import TrainFields, forward_flops_per_token, train, train_flops_per_token
from bequest.engine.kd import KD, KDTrainer, TeacherMeter, TopKTable, alpha_at, kd_loss, precompute_topk
from bequest.errors import BequestError
from bequest.data import same_tokenizer
from bequest.inherit import InheritRecipe, inherit
from bequest.io import load_model, read_lineage, write_model
from bequest.pretrain import PretrainRecipe, pretrain
from conftest import probe, tiny

VOCAB = 500
SMALL = dict(seq_len=32, batch_size=4, eval_blocks=4, domain="text", lr=3e-3, warmup=1)


def rows(folder: Path) -> list[dict]:
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny trained GPT-2 and BERT teachers (G1), pre-trained once for the module."""
    root = tmp_path_factory.mktemp("teachers")
    for family in ("gpt2", "bert"):
        pretrain(PretrainRecipe(out=str(root / family), family=family, layers=1, hidden=32, heads=2, vocab=VOCAB,
                                steps=12, eval_every=12, save_every=100, **SMALL))
    return root


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("bert", "masked_lm")])
def test_alpha_zero_is_plain_cross_entropy(family, task):
    model = tiny(family, task).eval()
    ids = probe()
    labels = ids.clone()
    if task == "masked_lm":
        labels[:, ::3] = -100  # only some positions carry a label
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        loss, parts = kd_loss(out.logits, None, labels, alpha=0.0, shift=task == "causal_lm")
    assert torch.allclose(loss, out.loss, rtol=0, atol=1e-6) and set(parts) == {"ce", "alpha"}
    # ...and a teacher passed along with alpha = 0 changes nothing, to the last bit.
    with_teacher, _ = kd_loss(out.logits, torch.randn_like(out.logits), labels, alpha=0.0, shift=task == "causal_lm")
    assert torch.equal(with_teacher, loss)


def test_identical_teacher_has_zero_kl_and_labels_select_positions():
    logits = torch.randn(2, 7, 50) * 3
    labels = torch.randint(0, 50, (2, 7))
    loss, parts = kd_loss(logits, logits.clone(), labels, alpha=1.0, shift=True)
    assert parts["kl"].abs() < 1e-6 and loss.abs() < 1e-5
    # Positions without a label do not count, however wrong the teacher is there; causal: logit t -> label t+1.
    teacher = logits.clone()
    teacher[:, 3] = torch.randn(2, 50) * 10
    labels[:, 4] = -100
    _, parts = kd_loss(logits, teacher, labels, alpha=1.0, shift=True)
    assert parts["kl"].abs() < 1e-6
    # Sequence classification logits have no positions.
    cls = torch.randn(5, 3)
    _, parts = kd_loss(cls, cls.clone(), torch.tensor([0, 1, 2, 1, 0]), alpha=0.5)
    assert parts["kl"].abs() < 1e-6
    # The hidden-state term: beta * MSE, on the labelled positions.
    hidden = torch.randn(2, 7, 16)
    loss, parts = kd_loss(logits, logits, labels, alpha=0.5, shift=True, beta=0.3, student_hidden=hidden,
                          teacher_hidden=hidden + 1)
    assert parts["mse"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.5 * parts["ce"].item() + 0.3, abs=1e-5)
    # For a classifier it is the mean over real tokens: whatever padding holds does not count.
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    teacher_hidden = hidden + 1
    teacher_hidden[1, 3:] += 100.0
    _, parts = kd_loss(cls[:2], cls[:2], torch.tensor([0, 1]), alpha=0.0, beta=1.0, student_hidden=hidden,
                       teacher_hidden=teacher_hidden, attention_mask=mask)
    assert parts["mse"].item() == pytest.approx(1.0)


def test_kd_trainer_on_a_classifier_with_the_hidden_state_term(tmp_path):
    student = tiny("bert", "seq_cls")
    teacher = tiny("bert", "seq_cls")
    teacher.load_state_dict(student.state_dict())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = KDTrainer(model=student, args=args, teacher=teacher, kd=KD(alpha=0.4, schedule="constant", beta=2.0))
    batch = {"input_ids": probe(), "attention_mask": torch.ones(2, 16, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    student.eval()  # same dropout-free forward as the teacher; the trainer only checks .training to pick the loss
    student.training = True
    loss = trainer.compute_loss(student, batch)
    parts = {k: v[-1] for k, v in trainer._parts.items()}
    assert parts["kl"].abs() < 1e-6 and parts["mse"].abs() < 1e-10
    assert loss.item() == pytest.approx(0.6 * parts["ce"].item(), abs=1e-6)


def test_alpha_schedules():
    assert [alpha_at("linear", t, 10) for t in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert alpha_at("linear", 2, 8, alpha0=0.5) == pytest.approx(0.375)
    assert alpha_at("linear", 0, 0) == 0.0  # T_KI = 0: no teacher at all
    assert [alpha_at("switch", t, 10, 0.7) for t in (0, 9, 10, 11)] == [0.7, 0.7, 0.0, 0.0]
    assert [alpha_at("constant", t, 10, 0.3) for t in (0, 10, 1000)] == [0.3, 0.3, 0.3]
    with pytest.raises(BequestError, match="linear, constant, switch"):
        alpha_at("cosine", 0, 10)


def test_top_k_converges_to_the_full_loss():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 9, VOCAB, generator=g) * 2
    teacher = torch.randn(3, 9, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (3, 9), generator=g)
    full, _ = kd_loss(student, teacher, labels, alpha=0.8, shift=True)
    errors = [abs(kd_loss(student, teacher, labels, alpha=0.8, shift=True, top_k=k)[0] - full).item()
              for k in (1, 10, 50, 200, VOCAB)]
    assert errors[-1] < 1e-5, errors  # K = vocab is the full loss
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_precomputed_top_k_equals_on_the_fly(tmp_path):
    teacher = tiny("gpt2", "causal_lm", vocab=VOCAB).eval()
    blocks = Dataset.from_dict({"input_ids": probe(VOCAB, batch=6, length=16).tolist()})
    table = TopKTable(precompute_topk(teacher, blocks, 10, tmp_path / "t.safetensors", batch_size=4))
    assert table.tokens == 6 * 16 and set(load_file(tmp_path / "t.safetensors")) == {"input_ids", "values", "indices"}
    ids = torch.tensor(blocks[[4, 1, 4]]["input_ids"])  # a batch in another order, with a repeat
    student = torch.randn(3, 16, VOCAB)
    with torch.no_grad():
        online, _ = kd_loss(student, teacher(input_ids=ids).logits, ids, alpha=0.6, top_k=10, shift=True)
    stored, _ = kd_loss(student, table(ids), ids, alpha=0.6, top_k=10, shift=True)
    assert torch.allclose(online, stored, atol=1e-5)
    with pytest.raises(BequestError, match="no precomputed teacher logits"):
        table(torch.zeros(1, 16, dtype=torch.long))


# ---------------------------------------------------------------- the Trainer


class _Kept(KDTrainer):
    last = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        type(self).last = self


def test_trainer_freezes_teacher_and_counts_its_flops_only_while_alpha_positive(tmp_path):
    tok = data.train_tokenizer("bpe", VOCAB)
    blocks = Dataset.from_dict({"input_ids": probe(VOCAB, batch=32, length=16, seed=3).tolist()})
    teacher = tiny("gpt2", "causal_lm", vocab=VOCAB, seed=1)
    student = tiny("gpt2", "causal_lm", vocab=VOCAB, hidden=48, heads=4, seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fpt, tfpt = train_flops_per_token(anatomy(student), 16), forward_flops_per_token(anatomy(teacher), 16)
    meter = TeacherMeter(0, tfpt, fpt)
    spec = TrainFields(steps=6, batch_size=4, lr=1e-2, warmup=0, eval_every=3, save_every=3)
    bound = functools.partial(_Kept, teacher=teacher, kd=KD(t_ki=2, top_k=None), meter=meter)
    final = train(student, tok, "causal_lm", blocks, blocks.select(range(4)), tmp_path, spec, flops_per_token=fpt,
                  trainer_class=bound, progress=False)
    trainer = _Kept.last
    # The teacher: untouched, no gradients, not in the optimizer, not in a checkpoint.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    saved = load_file(tmp_path / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert set(saved) <= set(student.state_dict()) and saved["transformer.wte.weight"].shape[1] == 48
    # linear schedule, T_KI = 2: the teacher ran at steps 0 and 1 only.
    per_step = 4 * 16
    assert meter.teacher_tokens == 2 * per_step and final["tokens"] == 6 * per_step
    logged = [r for r in rows(tmp_path) if "flops_with_teacher" in r]
    assert {r["step"] for r in logged} >= {0, 3, 6}
    for r in logged:
        assert r["teacher_tokens"] == min(r["step"], 2) * per_step
        assert r["flops_with_teacher"] == r["flops"] + r["teacher_tokens"] * tfpt
    # A resumed run keeps counting from its checkpoint: resume at step 3 and the teacher count is still 2 steps.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-6")
    again = TeacherMeter(0, tfpt, fpt)
    train(student, tok, "causal_lm", blocks, blocks.select(range(4)), tmp_path, spec, flops_per_token=fpt,
          trainer_class=functools.partial(KDTrainer, teacher=teacher, kd=KD(t_ki=2), meter=again), progress=False)
    assert again.teacher_tokens == 2 * per_step and rows(tmp_path)[-1]["teacher_tokens"] == 2 * per_step
    kd_rows = [r for r in rows(tmp_path) if "kd_ce" in r]
    assert kd_rows and all("kd_alpha" in r for r in kd_rows)
    # Past T_KI the training loss is the student's plain cross-entropy, with no teacher forward pass.
    batch = trainer.data_collator([blocks[i] for i in range(4)])
    student.train()
    trainer.teacher = None  # would fail loudly if it were still called
    assert trainer.state.global_step == 6 and trainer.alpha() == 0.0
    mine = trainer.compute_loss(student, batch)
    out = student(**batch)
    assert torch.equal(mine, kd_loss(out.logits, None, batch["labels"], alpha=0.0, shift=True)[0])
    assert torch.allclose(mine, out.loss, rtol=0, atol=1e-6)  # HF's own loss sums in another order


# ---------------------------------------------------------------- inherit end to end


def test_three_generation_chain_with_growth_writes_loadable_folders(tmp_path, teachers):
    g1 = teachers / "gpt2"
    out = tmp_path / "chain"
    r = InheritRecipe(out=str(out), teacher=str(g1), steps=4, eval_every=2, save_every=100, t_ki=2,
                      generations="[{layers: 1, hidden: 48}, {layers: 2, hidden: 64, init: grow}]", **SMALL)
    result = inherit(r)
    summary = json.loads((out / "summary.json").read_text())["generations"]
    assert [s["generation"] for s in summary] == [2, 3] and [s["hidden"] for s in summary] == [48, 64]
    assert read_lineage(g1)["operation"] == "pretrain"
    for n, parent in ((2, g1), (3, out / "gen2")):
        folder = out / f"gen{n}"
        lineage = read_lineage(folder)
        assert lineage["operation"] == "inherit" and lineage["parent"] == str(parent)
        model, tok = load_model(folder)
        assert tok is not None and anatomy(model).hidden == summary[n - 2]["hidden"]
        assert not (folder / "checkpoints").exists()
        assert rows(folder)[-1]["flops_with_teacher"] > rows(folder)[-1]["flops"]
    assert result["generations"] == summary and sorted(p.name for p in tmp_path.iterdir()) == ["chain"]
    # Exact growth: G3 starts where its teacher G2 ended.
    start = [x for x in rows(out / "gen3") if "eval_loss" in x][0]
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(summary[0]["eval_loss"], abs=1e-4)


def test_masked_lm_student_learns_from_bert_teacher(tmp_path, teachers):
    out = tmp_path / "s"
    final = inherit(InheritRecipe(out=str(out), teacher=str(teachers / "bert"), layers=2, hidden=48, steps=6,
                                  eval_every=3, save_every=100, t_ki=4, alpha_schedule="switch", **SMALL))
    evals = [x["eval_loss"] for x in rows(out) if "eval_loss" in x]
    assert evals[-1] < evals[0] and final["teacher_tokens"] == 4 * 4 * 32
    model, _ = load_model(out)
    assert anatomy(model).task == "masked_lm" and anatomy(model).layers == 2


def test_vocabulary_mismatch_is_refused_before_work(tmp_path, teachers):
    model, _ = load_model(teachers / "gpt2")
    other = tmp_path / "other"
    other.mkdir()
    write_model(other, model, data.train_tokenizer("bpe", 600), operation="test")
    out = tmp_path / "s"
    with pytest.raises(BequestError, match="different vocabularies;.*--layers/--hidden"):
        inherit(InheritRecipe(out=str(out), teacher=str(teachers / "gpt2"), student=str(other), **SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    _, own = load_model(teachers / "gpt2")
    assert same_tokenizer(own, load_model(teachers / "gpt2")[1])
    assert not same_tokenizer(own, load_model(other)[1]) and not same_tokenizer(own, load_model(teachers / "bert")[1])


def test_cli_verb_with_precomputed_top_k(tmp_path, teachers):
    from bequest.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    out = tmp_path / "s"
    args = ["--teacher", teachers / "gpt2", "--seq-len", 32, "--batch-size", 4, "--eval-blocks", 4, "--domain", "text",
            "--steps", 4, "--eval-every", 2]
    r = invoke("inherit", out, *args, "--layers", 2, "--hidden", 48, "--t-ki", 2, "--top-k", 5, "--precompute")
    assert r.exit_code == 0, r.output
    lineage = read_lineage(out)
    assert lineage["parent"] == str(teachers / "gpt2") and lineage["recipe"]["top_k"] == 5
    assert not (out / "teacher_topk.safetensors").exists()
    last = rows(out)[-1]
    assert last["teacher_tokens"] > 4 * 4 * 32  # the whole training set, read once up front
    bad = invoke("inherit", tmp_path / "t", *args, "--student", teachers / "bert", "--layers", 2)
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not both" in bad.output, bad.output
    bad = invoke("inherit", tmp_path / "t", *args, "--generations", "2y48")
    assert bad.exit_code == 2 and "LAYERSxHIDDEN" in bad.output
    assert invoke("inherit", out, *args).exit_code == 2  # existing output


def test_interrupted_chain_resumes_without_retraining_finished_generations(tmp_path, teachers, monkeypatch):
    import bequest.inherit as module

    real, calls = module._train_generation, []

    def dies_in_g3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_train_generation", dies_in_g3)
    out = tmp_path / "chain"
    r = InheritRecipe(out=str(out), teacher=str(teachers / "gpt2"), steps=2, eval_every=2, save_every=100,
                      generations="1x48,1x64", **SMALL)
    with pytest.raises(KeyboardInterrupt):
        inherit(r)
    assert not out.exists() and (tmp_path / ".chain.partial" / "gen2" / "eval.json").exists()
    inherit(r)
    assert len(calls) == 3  # G2 was kept, only G3 trained again
    assert anatomy(load_model(out / "gen3")[0]).hidden == 64
    assert read_lineage(out / "gen3")["parent"] == str(out / "gen2")
