"""MIGU and `bequest learn`: the mask by hand, T = 0 is plain training, masked rows stay put, two processes
share one statistic, and the continual-learning metrics of a hand-computed matrix."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
import yaml
from datasets import Dataset
from torch import nn
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from bequest import data
from bequest.anatomy import FAMILIES, build_model, make_config
from bequest.cli import app
from bequest.continual import continual_metrics
from bequest.engine import TrainFields, labelled, train
from bequest.engine.migu import MIGU, MIGUTrainer, keep_top
from bequest.engine.replay import Memory
from bequest.errors import BequestError
from bequest.io import load_model, read_lineage, save_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- the mask, by hand


@pytest.mark.parametrize("threshold,kept", [(0.0, 10), (0.3, 7), (0.5, 5), (0.7, 3), (0.9, 1)])
def test_keep_top_keeps_exactly_the_largest_rows(threshold, kept):
    stat = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.0, 6.0, 4.0])
    mask = keep_top(stat, threshold)
    assert int(mask.sum()) == kept
    assert set(stat[mask].tolist()) == set(range(10 - kept, 10))


class Toy(nn.Module):
    """A Linear, then GPT-2's Conv1D (weight [in, out]), then a LayerNorm that must stay unmasked."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 10)
        self.c = Conv1D(6, 10)
        self.norm = nn.LayerNorm(6)
        with torch.no_grad():
            # Real tokens are [1, 0, 0]: a's feature i gives i + 1. The padding token is [0, 1, 0]: it would
            # give 100 * (10 - i), ranking a's rows the other way round if it were counted.
            self.a.weight.copy_(torch.tensor([[i + 1.0, 100.0 * (10 - i), 0.0] for i in range(10)]))
            self.a.bias.zero_()
            self.c.weight.zero_()
            self.c.weight[0] = torch.tensor([3.0, -6.0, 1.0, -2.0, 5.0, 4.0])  # |c_j| = |w_0j| * a_0
            self.c.bias.zero_()

    def forward(self, x, attention_mask=None):
        return self.norm(self.c(self.a(x)))


REAL, PAD = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
X, MASK = torch.tensor([[REAL, REAL, PAD]]), torch.tensor([[1, 1, 0]])


def test_hand_built_mask_rows_columns_and_padding():
    toy = Toy().train()
    migu = MIGU(toy, threshold=0.7)
    assert {n: axis for n, (_, axis) in migu.layers.items()} == {"a": 0, "c": 1}  # Conv1D: features are columns
    migu.attach()
    migu.reset()
    out = toy(X, attention_mask=MASK)
    (out * torch.randn_like(out)).sum().backward()
    before = {n: p.grad.clone() for n, p in toy.named_parameters()}
    assert torch.equal(migu.stats["a"], torch.tensor([2.0 * (i + 1) for i in range(10)]))  # padding left out
    migu.apply()
    # a: 10 rows, T = 0.7 masks floor(7) -> rows 7, 8, 9 (the largest) keep their gradient.
    assert migu.masks["a"].nonzero().flatten().tolist() == [7, 8, 9]
    assert torch.equal(toy.a.weight.grad[7:], before["a.weight"][7:]) and not toy.a.weight.grad[:7].any()
    assert before["a.weight"][:7].any()
    # c: 6 columns, floor(4.2) = 4 masked; |w_0j| * 2 tokens = 6, 12, 2, 4, 10, 8 -> columns 1 and 4 kept.
    assert migu.masks["c"].nonzero().flatten().tolist() == [1, 4]
    kept = torch.tensor([False, True, False, False, True, False])
    assert torch.equal(toy.c.weight.grad[:, kept], before["c.weight"][:, kept]) and not toy.c.weight.grad[:, ~kept].any()
    for name in ("a.bias", "c.bias", "norm.weight", "norm.bias"):  # biases and norms are never masked
        assert torch.equal(dict(toy.named_parameters())[name].grad, before[name])
    migu.apply()  # a second call in the same step changes nothing (MIGUTrainer calls it before clipping)
    assert torch.equal(toy.a.weight.grad[7:], before["a.weight"][7:])
    # Without the attention mask the padding token counts and turns a's ranking around.
    migu.reset()
    toy(X)
    assert keep_top(migu.stats["a"], 0.7).nonzero().flatten().tolist() == [0, 1, 2]
    migu.detach()


def test_statistic_sums_micro_batches_and_skips_evaluation():
    toy = Toy().train()
    migu = MIGU(toy, threshold=0.5)
    migu.attach()
    b1, b2 = torch.randn(2, 4, 3), torch.randn(3, 2, 3)
    m1, m2 = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), torch.ones(3, 2, dtype=torch.long)
    single = []
    for b, m in ((b1, m1), (b2, m2)):
        migu.reset()
        toy(b, attention_mask=m)
        single.append(migu.flat.clone())
    migu.reset()
    toy(b1, attention_mask=m1)
    toy(b2, attention_mask=m2)  # gradient accumulation: two micro-batches, one optimizer step
    torch.testing.assert_close(migu.flat, single[0] + single[1])
    toy.eval()
    toy(b1, attention_mask=m1)
    torch.testing.assert_close(migu.flat, single[0] + single[1])
    migu.detach()
    assert MIGU(toy, skip=("c",)).layers.keys() == {"a"}


class TiedToy(nn.Module):
    """An embedding, a LayerNorm and a Linear with bias, and an LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 10)
        self.norm = nn.LayerNorm(10)
        self.a = nn.Linear(10, 10)
        self.head = nn.Linear(10, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, attention_mask=None):
        return self.head(self.a(self.norm(self.embed(ids))))


def test_scope_all_masks_embeddings_norms_and_biases_by_their_output_features():
    torch.manual_seed(0)
    toy = TiedToy().train()
    assert MIGU(toy).layers.keys() == {"a", "head"}  # the paper's scope: linear layers only
    migu = MIGU(toy, threshold=0.7, scope="all")
    # The tied weight is masked once, by the head's rows (vocabulary entries), not again by the embedding.
    assert {n: axis for n, (_, axis) in migu.layers.items()} == {"a": 0, "head": 0, "norm": 0}
    migu.attach()
    migu.reset()
    out = toy(torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    (out * torch.randn_like(out)).sum().backward()
    before = {n: p.grad.clone() for n, p in toy.named_parameters()}
    migu.apply()
    grads = {n: p.grad for n, p in toy.named_parameters()}
    for name, params in (("a", ("a.weight", "a.bias")), ("norm", ("norm.weight", "norm.bias"))):
        keep = migu.masks[name]
        assert int(keep.sum()) == 3
        for p in params:  # a weight's rows, its bias's entries and a norm's gain and shift share one mask
            assert torch.equal(grads[p][keep], before[p][keep]) and not grads[p][~keep].any()
    keep = migu.masks["head"]
    assert torch.equal(grads["embed.weight"][keep], before["embed.weight"][keep]) and not grads["embed.weight"][~keep].any()
    with pytest.raises(BequestError, match="scope"):
        MIGU(toy, scope="everything")
    migu.detach()


def test_scope_all_masks_an_untied_embedding_by_columns():
    emb = nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 2)).train()
    migu = MIGU(emb, threshold=0.5, scope="all")
    assert {n: axis for n, (_, axis) in migu.layers.items()} == {"0": 1, "1": 0}  # embedding features are columns
    migu.attach()
    migu.reset()
    emb(torch.tensor([[0, 1, 2]])).sum().backward()
    migu.apply()
    keep = migu.masks["0"]
    assert int(keep.sum()) == 4 and not emb[0].weight.grad[:, ~keep].any() and emb[0].weight.grad[:3, keep].all()
    migu.detach()


# ---------------------------------------------------------------- through the engine


def _classifier(family: str, seed: int = 0):
    tokenizer = data.train_tokenizer(data.tokenizer_kind(family), 500)
    config = make_config(family, layers=1, hidden=32, heads=2, vocab=len(tokenizer), positions=64,
                         num_labels=len(data.task_labels("kind")), pad_token_id=tokenizer.pad_token_id,
                         **({"kv_heads": 2} if family == "llama" else {}))
    transformers.set_seed(seed)
    return build_model(config, "seq_cls"), tokenizer


def _kind_sets(tokenizer, n: int = 32):
    return (labelled(data.load_task("kind", "train").select(range(n)), tokenizer, 48),
            labelled(data.load_task("kind", "validation").select(range(8)), tokenizer, 48))


def test_threshold_zero_is_plain_training_bit_for_bit(tmp_path):
    spec = TrainFields(steps=4, batch_size=4, grad_accum=2, lr=3e-3, warmup=0, eval_every=100, save_every=100)
    states, masks = [], None
    for name, threshold in (("plain", None), ("t0", 0.0), ("t07", 0.7)):
        model, tokenizer = _classifier("gpt2")
        callbacks = [] if threshold is None else [MIGU(model, threshold)]
        kind = transformers.Trainer if threshold is None else MIGUTrainer
        train(model, tokenizer, "seq_cls", *_kind_sets(tokenizer), tmp_path / name, spec, callbacks=callbacks,
              trainer_class=kind, resume=False, progress=False)
        states.append(model.state_dict())
        if threshold == 0.0:
            masks = callbacks[0].masks
    assert masks and all(bool(m.all()) for m in masks.values())  # the machinery ran and kept every row
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_gradient_accumulation_masks_once_per_optimizer_step(tmp_path):
    class Counting(MIGU):
        passes, per_step = 0, []

        def _capture(self, module, args, kwargs):
            self.passes += module.training  # the engine's evaluations run too, in eval mode
            return super()._capture(module, args, kwargs)

        def apply(self, step=0):
            if not self._applied:
                self.per_step = [*self.per_step, self.passes]
                self.passes = 0
            return super().apply(step)

    model, tokenizer = _classifier("gpt2")
    migu = Counting(model, 0.7)
    spec = TrainFields(steps=3, batch_size=4, grad_accum=2, lr=3e-3, warmup=0, eval_every=100, save_every=100)
    train(model, tokenizer, "seq_cls", *_kind_sets(tokenizer), tmp_path, spec, callbacks=[migu],
          trainer_class=MIGUTrainer, resume=False, progress=False)
    assert migu.per_step == [2, 2, 2]  # two micro-batches measured, one mask, per optimizer step


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                                            modules_to_save=["classifier"]))


@pytest.mark.parametrize("family,lora,scope", [("gpt2", False, "linear"), ("bert", True, "linear"),
                                               ("gpt2", False, "all"), ("llama", False, "all")])
def test_masked_rows_receive_no_update(tmp_path, family, lora, scope):
    model, tokenizer = _classifier(family)
    if lora:
        model = _lora(model)
        # LoRA's B starts at zero, so A would get no gradient at the first step; start from a trained-looking B.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    migu = MIGU(model, 0.7, skip=("classifier", "score"), scope=scope)
    if lora:
        assert migu.layers and all("lora_A" in n or "lora_B" in n for n in migu.layers)
    params = {(name, k): (p, ax) for name, targets in migu.targets.items() for k, (p, ax) in enumerate(targets)}
    if scope == "all":  # embeddings, norms (LayerNorm, Llama's RMSNorm) and biases (GPT-2 has them) are in
        assert any(p.dim() == 1 and k == 0 for (_, k), (p, _) in params.items())
        assert any(isinstance(migu.layers[n][0], nn.Embedding) for n in migu.layers)
        assert any(k == 1 for _, k in params) == (family == "gpt2")
    before = {key: p.detach().clone() for key, (p, _) in params.items()}
    # One step from a fresh AdamW without weight decay: a zero gradient row moves by exactly nothing.
    spec = TrainFields(steps=1, batch_size=8, lr=1e-2, warmup=0, weight_decay=0.0, eval_every=100, save_every=100)
    train(model, tokenizer, "seq_cls", *_kind_sets(tokenizer), tmp_path, spec, callbacks=[migu],
          trainer_class=MIGUTrainer, resume=False, progress=False)
    for (name, k), (p, ax) in params.items():
        keep = migu.masks[name]
        changed = p.detach() != before[(name, k)]
        moved = changed.movedim(ax, 0).reshape(keep.numel(), -1).any(1)  # per output feature
        assert not moved[~keep].any(), (name, k)
        assert moved[keep].any(), (name, k)
        assert int(keep.sum()) == keep.numel() - int(0.7 * keep.numel() + 1e-9)


class _Before(MIGU):
    """Records every masked layer's weight as it is just before each optimizer step."""

    def apply(self, step: int = 0) -> None:
        super().apply(step)
        self.before = {n: m.weight.detach().clone() for n, (m, _) in self.layers.items()}


@pytest.mark.parametrize("hold", [False, True])
def test_hold_keeps_masked_rows_through_momentum_and_weight_decay(tmp_path, hold):
    model, tokenizer = _classifier("gpt2")
    migu = _Before(model, 0.7, skip=("score",), hold=hold)
    # Several steps with weight decay: from the second on, AdamW's momentum moves rows masked now but kept before.
    spec = TrainFields(steps=4, batch_size=8, lr=1e-2, warmup=0, weight_decay=0.1, eval_every=100, save_every=100)
    train(model, tokenizer, "seq_cls", *_kind_sets(tokenizer), tmp_path, spec, callbacks=[migu],
          trainer_class=MIGUTrainer, resume=False, progress=False)
    moved_masked = 0
    for name, (module, axis) in migu.layers.items():
        keep = migu.masks[name]
        moved = (module.weight.detach() != migu.before[name]).any(dim=1 - axis)
        assert moved[keep].any(), name
        moved_masked += int(moved[~keep].sum())
    assert (moved_masked == 0) if hold else (moved_masked > 0)


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, transformers
    from bequest import data
    from bequest.anatomy import build_model, make_config
    from bequest.engine import TrainFields, labelled, train
    from bequest.engine.migu import MIGU, MIGUTrainer
    from bequest.continual import LearnRecipe, learn

    class Recording(MIGU):
        def _all_reduce(self, flat):
            if not hasattr(self, "local"):
                self.local = flat.clone()
                super()._all_reduce(flat)
                self.reduced = flat.clone()
                return flat
            return super()._all_reduce(flat)

    out, tiny = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    tok = data.train_tokenizer("bpe", 500)
    config = make_config("gpt2", layers=1, hidden=32, heads=2, vocab=len(tok), positions=64, num_labels=4,
                         pad_token_id=tok.pad_token_id)
    transformers.set_seed(0)
    model = build_model(config, "seq_cls")
    sets = [labelled(data.load_task("kind", s).select(range(n)), tok, 48) for s, n in (("train", 32), ("validation", 8))]
    migu = Recording(model, 0.7)
    spec = TrainFields(steps=2, batch_size=4, lr=3e-3, warmup=0, eval_every=100, save_every=100)
    train(model, tok, "seq_cls", *sets, os.path.join(out, "engine"), spec, callbacks=[migu], trainer_class=MIGUTrainer,
          resume=False, progress=False)
    digest = float(sum(p.double().sum() for p in model.parameters()))
    record = {"local": migu.local.tolist(), "reduced": migu.reduced.tolist(), "digest": digest,
              "masks": {n: m.tolist() for n, m in migu.masks.items()}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    learn(LearnRecipe(model=tiny, out=os.path.join(out, "stream"), tasks="kind,visibility", method="migu",
                      steps_per_task=2, batch_size=4, max_len=32, eval_examples=8, warmup=0), progress=False)
""")


def test_two_processes_share_one_statistic(tmp_path, tiny_models):
    data.train_tokenizer("bpe", 500)  # into the cache first, so the two processes do not both train it
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(script), str(tmp_path), str(tiny_models["gpt2"])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    local = [torch.tensor(x["local"]) for x in ranks]
    assert not torch.allclose(local[0], local[1])  # each process saw its own half of the batch
    for x in ranks:  # both hold the sum over processes, so both mask the same rows
        torch.testing.assert_close(torch.tensor(x["reduced"]), local[0] + local[1])
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["digest"] == ranks[1]["digest"]
    stream = json.loads((tmp_path / "stream" / "metrics.json").read_text())
    assert stream["tasks"] == ["kind", "visibility"] and stream["bwt"] is not None


# ---------------------------------------------------------------- metrics and replay


def test_metrics_of_a_hand_computed_matrix():
    r = [[0.90, 0.10, 0.20],
         [0.95, 0.80, 0.30],
         [0.50, 0.70, 0.90]]
    m = continual_metrics(r)
    assert m["average_accuracy"] == pytest.approx((0.50 + 0.70 + 0.90) / 3)
    assert m["bwt"] == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)
    assert m["forgetting"] == pytest.approx(((0.95 - 0.50) + (0.80 - 0.70)) / 2)  # the best earlier row, not R[j][j]
    assert m["fwt"] is None  # no accuracies before training, no forward transfer
    assert continual_metrics([[0.4]], [0.1]) == {"average_accuracy": 0.4, "last_task_accuracy": 0.4, "bwt": None,
                                                 "forgetting": None, "fwt": None}


def test_forward_transfer_and_last_task_accuracy_by_hand():
    r = [[0.90, 0.10, 0.20],
         [0.95, 0.80, 0.30],
         [0.50, 0.70, 0.85]]
    before = [0.25, 0.40, 0.05]
    m = continual_metrics(r, before)
    # Task j's accuracy after task j-1 (the superdiagonal) minus its accuracy before any training, for j >= 1:
    # (0.10 - 0.40) + (0.30 - 0.05). The sign flipped would give +0.025, the diagonal 0.625, b[j-1] -0.125,
    # the subdiagonal 0.6.
    assert m["fwt"] == pytest.approx(((0.10 - 0.40) + (0.30 - 0.05)) / 2) == pytest.approx(-0.025)
    assert m["last_task_accuracy"] == pytest.approx(0.85)  # the last row's last entry, not its mean nor R[0][0]
    assert m["average_accuracy"] == pytest.approx((0.50 + 0.70 + 0.85) / 3)
    assert continual_metrics([row[:2] for row in r[:2]], before[:2])["fwt"] == pytest.approx(0.10 - 0.40)


def test_replay_memory_is_bounded_shared_and_mixed_at_its_fraction():
    memory = Memory(size=50, seed=0)
    first, second = Dataset.from_dict({"x": list(range(100))}), Dataset.from_dict({"x": list(range(100, 200))})
    memory.add(first)
    assert len(memory.kept[0]) == 50
    memory.add(second)
    assert [len(d) for d in memory.kept] == [25, 25]
    assert set(memory.kept[0]["x"]) <= set(range(100)) and set(memory.kept[1]["x"]) <= set(range(100, 200))
    current = Dataset.from_dict({"x": list(range(1000, 1180))})
    mixed = memory.mix(current, 0.1, seed=1)
    assert len(mixed) == 200 and sum(x < 1000 for x in mixed["x"]) == 20  # 10% replayed
    assert memory.mix(current, 0.1, seed=1)["x"] == mixed["x"]  # deterministic


# ---------------------------------------------------------------- the verb


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Untrained 1-layer models with their tokenizers, saved like any model folder."""
    root = tmp_path_factory.mktemp("learn-models")
    out = {}
    for family in ("gpt2", "bert", "llama"):
        tok = data.train_tokenizer(FAMILIES[family].tokenizer, 500)
        task = "masked_lm" if "masked_lm" in FAMILIES[family].tasks else "causal_lm"
        ids = {f"{k}_id": getattr(tok, f"{k}_id") for k in ("pad_token", "bos_token", "eos_token")}
        config = make_config(family, layers=1, hidden=32, heads=2, vocab=len(tok), positions=64,
                             **({"kv_heads": 2} if family == "llama" else {}),
                             **{k: v for k, v in ids.items() if v is not None})
        transformers.set_seed(0)
        out[family] = save_model(root / family, build_model(config, task), tok, operation="test")
    return out


FAST = ["--tasks", "kind,visibility", "--steps-per-task", "3", "--batch-size", "4", "--max-len", "32",
        "--eval-examples", "16", "--train-examples", "64", "--warmup", "0", "--eval-every", "3"]


def test_learn_writes_matrix_metrics_heatmap_and_model(tmp_path, tiny_models):
    out = tmp_path / "run"
    r = invoke("learn", "--model", tiny_models["gpt2"], "--method", "migu+replay", *FAST, out)
    assert r.exit_code == 0, r.output
    matrix = json.loads((out / "matrix.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert matrix["tasks"] == ["kind", "visibility"] and len(matrix["accuracy"]) == 2
    assert all(len(row) == 2 for row in matrix["accuracy"]) and len(matrix["initial"]) == 2
    figures = continual_metrics(matrix["accuracy"], matrix["initial"])
    assert {k: metrics[k] for k in figures} == figures and metrics["fwt"] is not None
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "recipe.yaml").exists()
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["1-kind", "2-visibility"]
    assert not list(out.glob("tasks/*/checkpoints")) and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # The last row is the saved model's real accuracy, the initial row the untrained one's (the base model's body
    # under the same seeded union head): score both again, by hand, inside each task's labels.
    from bequest.continual.run import _union_head

    model, tok = load_model(out)
    assert matrix["accuracy"][-1] == pytest.approx(_scored(model, tok, matrix))
    untrained = _union_head(load_model(tiny_models["gpt2"])[0], list(model.config.id2label.values()), seed=0)
    assert matrix["initial"] == pytest.approx(_scored(untrained, tok, matrix))
    assert matrix["initial"] != pytest.approx(matrix["accuracy"][0])  # training the first task moved something
    assert model.config.id2label[len(model.config.id2label) - 1] == f"visibility:{matrix['labels']['visibility'][-1]}"


def _scored(model, tok, matrix) -> list[float]:
    """Accuracy on each embedded task of a learn run (16 validation examples, 32 tokens), argmax inside its labels."""
    model.eval()
    offset, out = 0, []
    for name in matrix["tasks"]:
        n = len(matrix["labels"][name])
        ds = labelled(data.load_task(name, "validation").select(range(16)), tok, 32)
        batch = transformers.DataCollatorWithPadding(tok)([{k: ex[k] for k in ("input_ids", "attention_mask")} for ex in ds])
        with torch.no_grad():
            pred = model(**batch).logits[:, offset : offset + n].argmax(-1)
        out.append((pred == torch.tensor(ds["label"])).float().mean().item())
        offset += n
    return out


@pytest.mark.parametrize("family,extra", [
    ("bert", ["--lora", "--method", "random-mask"]),
    ("llama", ["--classify", "generate", "--method", "migu", "--lora"]),
    ("gpt2", ["--classify", "generate", "--method", "replay"]),
])
def test_learn_families_lora_and_generation(tmp_path, tiny_models, family, extra):
    out = tmp_path / "run"
    r = invoke("learn", "--model", tiny_models[family], *extra, *FAST, out)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["average_accuracy"] <= 1.0 and metrics["forgetting"] is not None
    model = load_model(out)[0]  # the merged model is a plain, loadable folder
    if "--lora" in extra:  # the adapter folder has its card, and the union head's classes for its host
        assert (out / "adapter" / "adapter_config.json").exists()
        assert read_lineage(out / "adapter")["operation"] == "learn"
        assert "library_name: peft" in (out / "adapter" / "README.md").read_text()
        head = "generate" not in extra
        assert (out / "adapter" / "labels.json").exists() == head
        if head:
            names = json.loads((out / "adapter" / "labels.json").read_text())["names"]
            assert dict(enumerate(names)) == model.config.id2label and names[0].startswith("kind:")


# ---------------------------------------------------------------- the user's own files as tasks


def _user_files(root):
    """A .jsonl file (labels neg/pos) and a folder of .csv files with a validation file (bug/feature/question),
    text in a column named `body`."""
    root.mkdir(exist_ok=True)
    moods = ["neg", "pos"]
    rows = [{"body": f"the {'awful slow' if i % 2 == 0 else 'great fast'} parser, take {i}", "label": moods[i % 2]}
            for i in range(60)]
    (root / "sentiment.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    kinds = ["bug", "feature", "question"]
    (root / "tickets").mkdir(exist_ok=True)
    for split, n in (("train", 30), ("validation", 7)):
        lines = [f"please look at ticket {split} {i} about the {kinds[i % 3]},{kinds[i % 3]}" for i in range(n)]
        (root / "tickets" / f"{split}.csv").write_text("body,label\n" + "\n".join(lines) + "\n")
    return root


FILES = ["--text-column", "body", "--validation-fraction", "0.3"]


def test_learn_on_user_files_mixed_with_an_embedded_task(tmp_path, tiny_models):
    files, out = _user_files(tmp_path / "mine"), tmp_path / "run"
    tasks = f"{files / 'sentiment.jsonl'},kind,{files / 'tickets'}/"
    r = invoke("learn", "--model", tiny_models["gpt2"], *FAST, "--tasks", tasks, *FILES, out)
    assert r.exit_code == 0, r.output
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["tasks"] == ["sentiment", "kind", "tickets"]  # a file's stem, a folder's name
    assert matrix["labels"] == {"sentiment": ["neg", "pos"], "kind": data.task_labels("kind"),
                                "tickets": ["bug", "feature", "question"]}
    assert len(matrix["accuracy"]) == 3 and all(len(row) == 3 for row in [matrix["initial"], *matrix["accuracy"]])
    # tickets is scored on its 7 validation rows (its 30 training rows would give 16ths: --eval-examples 16)
    assert all(abs(7 * row[2] - round(7 * row[2])) < 1e-9 for row in [matrix["initial"], *matrix["accuracy"]])
    assert load_model(out)[0].config.id2label[len(data.task_labels("kind")) + 2] == "tickets:bug"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == matrix["tasks"] and metrics["fwt"] is not None
    assert metrics["last_task_accuracy"] == matrix["accuracy"][-1][-1]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())  # what was read, and how, as finetune records it
    assert recipe["tasks"] == tasks and "data" not in recipe
    assert {k: recipe[k] for k in ("text_column", "label_column", "validation_fraction")} == \
        {"text_column": "body", "label_column": "label", "validation_fraction": 0.3}
    report = (out / "report.md").read_text()
    assert "before training" in report and "forward transfer" in report


def test_learn_generates_the_labels_of_user_files(tmp_path, tiny_models):
    files, out = _user_files(tmp_path / "mine"), tmp_path / "run"
    r = invoke("learn", "--model", tiny_models["gpt2"], "--classify", "generate", *FAST,
               "--tasks", f"{files / 'tickets'},{files / 'sentiment.jsonl'}", *FILES, out)
    assert r.exit_code == 0, r.output
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["tasks"] == ["tickets", "sentiment"] and matrix["labels"]["sentiment"] == ["neg", "pos"]
    assert all(0.0 <= a <= 1.0 for row in [matrix["initial"], *matrix["accuracy"]] for a in row)


@pytest.mark.parametrize("tasks,extra,expected", [
    ("kind,{d}/nope.jsonl", [], "unknown task '{d}/nope.jsonl' in --tasks"),
    ("{d}/single.jsonl,kind", [], "task single: {d}/single.jsonl: every row has the label 'pos'"),
    ("kind,{d}/sentiment.jsonl", ["--text-column", "body", "--label-column", "mood"],
     "task sentiment: {d}/sentiment.jsonl has no column 'mood'"),
    ("{d}/tickets,kind", [], "task tickets: {d}/tickets/train.csv has no column 'text'"),
    ("{d}/sentiment.jsonl,{d}/again/sentiment.csv", [], "names the task 'sentiment' twice"),
    ("kind,{d}/a,b.jsonl", [], "'{d}/a,b.jsonl' has a comma, which separates tasks"),
])
def test_bad_task_files_exit_2_naming_the_task(tmp_path, tiny_models, tasks, extra, expected):
    d = _user_files(tmp_path / "mine")
    (d / "single.jsonl").write_text("".join(json.dumps({"text": f"row {i}", "label": "pos"}) + "\n" for i in range(20)))
    (d / "again").mkdir()
    (d / "again" / "sentiment.csv").write_text("text,label\nfine,pos\nbad,neg\n")
    (d / "a,b.jsonl").write_text((d / "sentiment.jsonl").read_text())
    r = invoke("learn", "--model", tiny_models["gpt2"], "--tasks", tasks.format(d=d), *extra, tmp_path / "out")
    assert r.exit_code == 2 and expected.format(d=d) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("args,expected", [
    (["--tasks", "kind,colour"], "unknown task 'colour'"),
    (["--tasks", "kind,kind"], "each task once"),
    (["--steps", "3", "--steps-per-task", "4"], "disagree"),
    (["--threshold", "1.0"], "threshold"),
])
def test_bad_learn_settings_exit_2(tmp_path, tiny_models, args, expected):
    r = invoke("learn", "--model", tiny_models["gpt2"], *args, tmp_path / "out")
    assert r.exit_code == 2 and expected in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_generate_needs_a_causal_model(tmp_path, tiny_models):
    r = invoke("learn", "--model", tiny_models["bert"], "--classify", "generate", tmp_path / "out")
    assert r.exit_code == 2 and "use --classify head" in r.output, r.output


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_union_head_keeps_the_body(tiny_models, family):
    from bequest.continual.run import _union_head

    source, _ = load_model(tiny_models[family])  # a causal or masked LM, as pre-trained
    model = _union_head(source, ["a:x", "a:y", "b:x"], seed=0)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "b:x"
    mine = dict(model.named_parameters())
    shared = [n for n, _ in source.named_parameters() if n in mine]
    assert len(shared) >= 10 and all(torch.equal(mine[n], dict(source.named_parameters())[n]) for n in shared)
