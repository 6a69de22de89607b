"""`bequest upgrade`: a zoo of task weights on OLD moved onto a continued, a grown (once and twice) and
an independently trained successor, with its failures reported per source and its reruns resumed."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from bequest.data.tasks import load_task
from bequest.finetune import FinetuneRecipe, finetune
from bequest.grow.command import GrowRecipe, grow_command
from bequest.io import load_model, read_lineage
from bequest.peft import read_module
from bequest.pretrain import PretrainRecipe, pretrain
from bequest.recycle import ContinueRecipe, continue_pretrain
from bequest.upgrade import UpgradeRecipe, upgrade
from conftest import probe

VOCAB = 500
SMALL = dict(seq_len=32, batch_size=4, eval_blocks=4, lr=3e-3, warmup=1, save_every=100)
TASK = dict(data="kind", max_len=24, train_examples=48, eval_examples=24, batch_size=8, warmup=1, save_every=100)
KINDS = ["lora", "ia3", "prefix", "prompt", "bottleneck"]
EXACT = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """OLD, its continued, grown (once, twice) and independent successors, and task weights on OLD."""
    root = tmp_path_factory.mktemp("upgrade")
    base = dict(family="gpt2", heads=2, vocab=VOCAB, domain="text", eval_every=8, **SMALL)
    pretrain(PretrainRecipe(out=str(root / "old"), layers=1, hidden=32, steps=8, **base))
    pretrain(PretrainRecipe(out=str(root / "independent"), layers=2, hidden=48, steps=8, seed=1, **base))
    pretrain(PretrainRecipe(out=str(root / "other-vocab"), layers=1, hidden=32, steps=2, seed=1,
                            **{**base, "vocab": 400}))
    continue_pretrain(ContinueRecipe(model=str(root / "old"), out=str(root / "continued"), domain="data", steps=4,
                                     eval_every=4, **SMALL))
    grow_command(GrowRecipe(src=str(root / "old"), out=str(root / "grown"), hidden=48, heads=3, ffn=160))
    grow_command(GrowRecipe(src=str(root / "grown"), out=str(root / "twice"), layers=3))
    finetune(FinetuneRecipe(model=str(root / "old"), out=str(root / "full"), steps=6, eval_every=6, **TASK),
             progress=False)
    for kind in KINDS:
        finetune(FinetuneRecipe(model=str(root / "old"), out=str(root / kind), peft=kind, steps=6, eval_every=6,
                                lr=1e-2, virtual_tokens=4, **TASK), progress=False)
    return root


def _plain_peft_lora(zoo, folder):
    """A LoRA made with plain peft (no bequest recipe beside it), nudged so that it changes the output."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(zoo / "old", "seq_cls", num_labels=4)[0],
                           LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["c_attn", "c_fc"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _logits(model_dir, source, ids):
    """Logits of `source` (an adapter or fine-tune folder) on the model in `model_dir`, loaded as peft would."""
    from peft import PeftModel

    if (source / "bottleneck_config.json").exists():  # bequest's own format: peft has no bottleneck adapters
        from bequest.peft import attach

        host = load_model(model_dir, "seq_cls", num_labels=4)[0]
        return attach(host, read_module(source)).eval()(input_ids=ids).logits
    if (source / "adapter_config.json").exists():
        host = load_model(model_dir, "seq_cls", num_labels=4)[0]
        return PeftModel.from_pretrained(host, str(source)).eval()(input_ids=ids).logits
    return load_model(source)[0].eval()(input_ids=ids).logits


def _run(zoo, out, to, sources, **kw):
    return upgrade(UpgradeRecipe(from_=str(zoo / "old"), to=str(zoo / to), sources=[str(s) for s in sources],
                                 out=str(out), **{**dict(steps=0, max_len=24, eval_examples=24), **kw}), progress=False)


# ---------------------------------------------------------------- grown successors: exact at step 0


@pytest.mark.parametrize("to", ["grown", "twice"])
def test_grown_successor_computes_what_old_computed_for_every_kind(tmp_path, zoo, to):
    sources = [zoo / k for k in [*KINDS, "full"]]
    rows = _run(zoo, tmp_path / "out", to, sources)
    ids = probe(vocab=VOCAB, length=12)
    for source, row in zip(sources, rows):
        assert row["path"] == "port" and row["relation"] == "grown", row
        assert len(row["details"].get("ports", row["details"].get("grown"))) == (1 if to == "grown" else 2)
        before = _logits(zoo / "old", source, ids)
        after = _logits(zoo / to, tmp_path / "out" / source.name, ids)
        assert (before - after).abs().max() <= EXACT, source.name
        assert row["acc_step0"] == pytest.approx(row["acc_old"])
    # Every landed folder carries its card (the source and path it took) and says its classes by name.
    names = load_task("kind", "train").features["label"].names
    for source in sources:
        lineage = read_lineage(tmp_path / "out" / source.name)
        assert (lineage["source"], lineage["path"], lineage["parent"]) == (str(source), "port", str(zoo / to))
    assert read_module(tmp_path / "out" / "lora").labels == names
    assert load_model(tmp_path / "out" / "full")[0].config.id2label == dict(enumerate(names))


# ---------------------------------------------------------------- an unrelated successor of another shape


def test_unrelated_successor_takes_every_kind_through_measured_maps(tmp_path, zoo):
    sources = [zoo / k for k in [*KINDS, "full"]]
    rows = _run(zoo, tmp_path / "out", "independent", sources)
    ids = probe(vocab=VOCAB, length=12)
    for source, row in zip(sources, rows):
        assert row["path"] == "transfer" and row["relation"] == "unrelated", row
        assert row["details"]["mode"] == "transferred" and len(row["details"]["layers"]) == 2
        assert 0.0 <= row["acc_step0"] <= 1.0 and row["acc_old"] is not None
        assert torch.isfinite(_logits(zoo / "independent", tmp_path / "out" / source.name, ids)).all()


# ---------------------------------------------------------------- a continued successor, by the command line


def test_continued_successor_takes_the_zoo_reports_a_broken_source_and_resumes(tmp_path, zoo):
    from bequest.cli import app

    broken = tmp_path / "broken"
    shutil.copytree(zoo / "lora", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00")
    plain = _plain_peft_lora(zoo, tmp_path / "plain")
    sources = [zoo / "lora", zoo / "ia3", broken, zoo / "full", plain]
    out = tmp_path / "out"
    args = ["upgrade", "--from", zoo / "old", "--to", zoo / "continued", *sources, out, "--steps", 2, "--eval-every",
            1, "--max-len", 24, "--eval-examples", 16, "--train-examples", 32, "--batch-size", 8, "--data", "kind",
            "--compare-fresh"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "1 of 5 sources failed" in error[0] and "broken" in error[0], result.output
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["status"] for row in table] == ["upgraded", "upgraded", "failed", "upgraded", "upgraded"]
    assert all(row["path"] == "reuse" for row in table if row["status"] == "upgraded")
    assert "safetensors" in table[2]["reason"] or "truncated" in table[2]["reason"]
    assert all(row["fresh_final"] for row in table if row["status"] == "upgraded")
    assert (out / "summary.png").stat().st_size > 1000 and "| source |" in (out / "summary.md").read_text()
    # Every landed folder loads as plain peft / transformers would load it, on NEW.
    ids = probe(vocab=VOCAB, length=12)
    for source in (zoo / "lora", zoo / "ia3", zoo / "full", plain):
        assert torch.isfinite(_logits(zoo / "continued", out / source.name, ids)).all()
    assert read_lineage(out / "lora")["operation"] == "upgrade"
    assert read_lineage(out / "lora")["parent"] == str(zoo / "continued")
    report = json.loads((out / "lora" / "upgrade.json").read_text())
    assert [s for s, _ in report["curve"]] == [0, 1, 2] and report["fresh"]["curve"][0][0] == 0
    # A rerun skips what landed and tries the broken source again; once it is fixed, all land.
    shutil.rmtree(broken)
    shutil.copytree(zoo / "lora", broken)
    again = CliRunner().invoke(app, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    assert again.output.count("already upgraded") == 4 and (out / "broken" / "upgrade.json").exists()


def test_a_rerun_with_other_settings_is_refused(tmp_path, zoo):
    _run(zoo, tmp_path / "out", "continued", [zoo / "lora"])
    with pytest.raises(Exception, match="other settings .*max_len"):
        _run(zoo, tmp_path / "out", "continued", [zoo / "lora"], max_len=20)


def test_a_path_the_relation_does_not_allow_fails_that_source_with_the_fix(tmp_path, zoo):
    with pytest.raises(Exception, match="1 of 1 sources failed"):
        _run(zoo, tmp_path / "out", "grown", [zoo / "lora"], method="reuse")
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["sources"][0]
    assert row["status"] == "failed" and "--method port or transfer" in row["reason"]


# ---------------------------------------------------------------- another tokenizer


def test_distillation_alone_crosses_tokenizers(tmp_path, zoo):
    """A successor with its own vocabulary learns from OLD+SOURCE, which reads the text with OLD's tokenizer."""
    from bequest.io import load_tokenizer
    from bequest.upgrade.teacher import Retokenized

    old_tok, new_tok = load_tokenizer(zoo / "old"), load_tokenizer(zoo / "other-vocab")
    assert len(old_tok) != len(new_tok)
    teacher = load_model(zoo / "full")[0].eval()
    text = ["def parse(self, path): return open(path).read()", "a short line"]
    own = old_tok(text, padding=True, return_tensors="pt")
    theirs = new_tok(text, padding=True, return_tensors="pt")
    expected = teacher(**own).logits
    got = Retokenized(teacher, new_tok, old_tok, 64)(**theirs).logits
    assert torch.allclose(got, expected, atol=1e-6)

    rows = _run(zoo, tmp_path / "out", "other-vocab", [zoo / "lora", zoo / "full"], method="distill", steps=2,
                eval_every=1, train_examples=16, batch_size=4)
    assert [r["path"] for r in rows] == ["distill", "distill"] and all(len(r["curve"]) == 3 for r in rows)
    kd = [json.loads(x) for x in (tmp_path / "out" / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_kl" in row for row in kd)
