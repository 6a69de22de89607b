"""The engine on its own: classification runs, FLOP accounting agrees with the real weights."""

import json

import pytest
import torch
import transformers

from bequest import data
from bequest.anatomy import anatomy, build_model, make_config
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
