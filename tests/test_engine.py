"""The engine on its own: classification runs, FLOP accounting agrees with the real weights."""

import json
import math

import pytest
import torch
import transformers

from bequest import data
from bequest.anatomy import anatomy, build_model, make_config
from bequest.errors import BequestError
from bequest.engine import TrainFields, forward_flops_per_token, labelled, matmul_params, train, train_flops_per_token
from conftest import CASES, tiny


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2"])
def test_sequence_classification_learns(tmp_path, family):
    tokenizer = data.train_tokenizer(data.tokenizer_kind(family), 500)
    names = data.task_labels("kind")
    train_set = labelled(data.load_task("kind", "train").select(range(400)), tokenizer, 48)
    eval_set = labelled(data.load_task("kind", "validation").select(range(64)), tokenizer, 48)
    config = make_config(family, layers=1, hidden=32, heads=2, vocab=len(tokenizer), positions=64,
                         num_labels=len(names), pad_token_id=tokenizer.pad_token_id)
    transformers.set_seed(0)
    model = build_model(config, "seq_cls")
    spec = TrainFields(steps=40, batch_size=16, lr=3e-3, warmup=4, eval_every=40, save_every=100)
    final = train(model, tokenizer, "seq_cls", train_set, eval_set, tmp_path, spec, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["step"] == 0 and final["eval_loss"] < evals[0]["eval_loss"] - 0.1
    assert 0.0 <= final["eval_accuracy"] <= 1.0 and "eval_perplexity" not in final
    # The reported accuracy is the real one: recompute it from the trained model's predictions.
    model.eval()
    collate = transformers.DataCollatorWithPadding(tokenizer)
    batch = collate([{k: ex[k] for k in ("input_ids", "attention_mask", "label")} for ex in eval_set])
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert final["eval_accuracy"] == pytest.approx((pred == batch["labels"]).float().mean().item())


@pytest.mark.parametrize("family,task", CASES)
def test_flops_count_every_multiplied_weight(family, task):
    model = tiny(family, task)
    anat = anatomy(model)
    slots = anat.slots(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    in_blocks = sum(params[n].numel() for n, s in slots.items()
                    if s.kind == "weight" and s.layer is not None and s.role.startswith(("attn.", "mlp.")))
    head = anat.vocab * anat.hidden if task in ("causal_lm", "masked_lm") else 0
    assert matmul_params(anat) == in_blocks + head
    seq = 16
    assert forward_flops_per_token(anat, seq) == 2 * (in_blocks + head) + 4 * anat.layers * seq * anat.hidden
    assert train_flops_per_token(anat, seq) == 3 * forward_flops_per_token(anat, seq)


# ---------------------------------------------------------------- settings the Trainer applies itself


class _Seen(transformers.TrainerCallback):
    """What the Trainer ran with: its arguments, and the forwards of one module in training (their count and
    output dtypes)."""

    def __init__(self, module):
        self.args, self.calls, self.dtypes = None, 0, set()
        # Counted as it starts: a recomputation may stop once it has what the backward pass needs.
        module.register_forward_pre_hook(self._count)
        module.register_forward_hook(self._dtype)

    def _count(self, module, args):
        self.calls += module.training

    def _dtype(self, module, args, output):
        if module.training:
            self.dtypes.add(output.dtype)

    def on_train_begin(self, args, state, control, **kwargs):
        self.args = args


def _lm_run(tmp_path, peft: str | None = None, **settings):
    """A tiny GPT-2 trained 2 steps of 2 blocks with `settings`; (final metrics, what the Trainer saw, model)."""
    from datasets import Dataset

    from bequest.peft import new_config, with_module

    tokenizer = data.train_tokenizer("bpe", 500)
    config = make_config("gpt2", layers=1, hidden=32, heads=2, vocab=len(tokenizer), positions=32)
    transformers.set_seed(0)
    model = build_model(config, "causal_lm")
    seen = _Seen(model.transformer.h[0].mlp)  # a residual add would hand on fp32 whatever the precision
    if peft:
        model = with_module(model, new_config(peft, model))
    seen.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blocks = Dataset.from_dict({"input_ids": torch.randint(5, 500, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()})
    spec = TrainFields(steps=2, batch_size=2, warmup=0, eval_every=2, save_every=100, **settings)
    final = train(model, tokenizer, "causal_lm", blocks, blocks.select(range(2)), tmp_path, spec, callbacks=[seen],
                  progress=False)
    return final, seen, model


def test_bf16_trains_in_bf16_and_keeps_fp32_weights(tmp_path):
    final, seen, model = _lm_run(tmp_path, bf16=True)
    assert seen.args.bf16 and not seen.args.fp16
    assert seen.dtypes == {torch.bfloat16}  # the block ran under bf16 autocast, on CPU too
    assert all(p.dtype == torch.float32 for p in model.parameters()) and math.isfinite(final["eval_loss"])
    _, plain, _ = _lm_run(tmp_path / "fp32")
    assert plain.dtypes == {torch.float32} and not plain.args.bf16  # fp32 stays the default


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_is_refused_without_cuda():
    with pytest.raises(BequestError, match="--fp16 needs a CUDA GPU and this machine has none; use --bf16"):
        TrainFields(fp16=True)
    with pytest.raises(BequestError, match="--bf16 and --fp16 both ask for mixed precision; give one of them"):
        TrainFields(fp16=True, bf16=True)


@pytest.mark.parametrize("peft", [None, "lora", "bottleneck"])
def test_gradient_checkpointing_recomputes_blocks_and_learns_the_same(tmp_path, peft):
    _, seen, model = _lm_run(tmp_path / "on", peft, gradient_checkpointing=True)
    _, plain, reference = _lm_run(tmp_path / "off", peft)
    assert seen.calls == 2 * plain.calls > 0  # every training forward of the block ran again in the backward pass
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == seen.start.keys()
    for name, p in reference.named_parameters():
        if p.requires_grad:  # the same update, under a frozen host too: gradients pass through the recomputation
            assert not torch.equal(trained[name], seen.start[name]) and torch.allclose(trained[name], p, atol=1e-6), name


def test_a_model_that_cannot_recompute_is_refused(tmp_path, monkeypatch):
    with pytest.raises(BequestError, match=r"prefix tuning cannot recompute activations \(its virtual keys"):
        _lm_run(tmp_path / "prefix", "prefix", gradient_checkpointing=True)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "supports_gradient_checkpointing", False)
    with pytest.raises(BequestError, match="GPT2LMHeadModel cannot recompute its activations; drop --gradient-che"):
        _lm_run(tmp_path / "plain", gradient_checkpointing=True)


def test_report_to_takes_known_installed_integrations_only(monkeypatch):
    assert TrainFields().report_targets() == "none" and TrainFields(report_to="all").report_targets() == "all"
    with pytest.raises(BequestError, match="--report-to tensorbord is not an integration transformers knows; .*tensorboard"):
        TrainFields(report_to="tensorbord")
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(BequestError, match=r"--report-to tensorboard needs the tensorboard package, which is not "
                                           r"installed; `pip install tensorboard`, or drop --report-to tensorboard"):
        TrainFields(report_to="tensorboard")
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    assert TrainFields(report_to="tensorboard").report_targets() == ["tensorboard"]
