"""`bequest pretrain`: train a small model from scratch, the ancestor every other verb starts from."""

from __future__ import annotations

import json
import shutil

import transformers
from pydantic import Field

from bequest import data
from bequest.anatomy import FAMILIES, anatomy, build_model, make_config
from bequest.data.prepare import lm_splits, special_ids, text_splits
from bequest.engine import prepare_work, processes, train, train_flops_per_token
from bequest.io import atomic_dir, check_output, write_model
from bequest.recipe import CorpusFields, OutputFields, ShapeFields, TrainFields
from bequest.report import write_report


class PretrainRecipe(ShapeFields, CorpusFields, TrainFields, OutputFields):
    out: str = Field(..., description="output model folder")


def pretrain(r: PretrainRecipe) -> dict:
    """Train a tiny model from scratch on the embedded corpus (or your text) and save an HF folder."""
    state = processes()
    check_output(r.out, r.overwrite)
    fam = FAMILIES[r.family]
    task = "masked_lm" if "masked_lm" in fam.tasks else "causal_lm"
    train_text, eval_text = text_splits(r)
    # Your own corpus gets its own tokenizer; the embedded one shares a cached tokenizer across runs.
    own_text = None if r.corpus == "default" else list(train_text["text"])
    tokenizer = data.train_tokenizer(fam.tokenizer, r.vocab, texts=own_text)
    config = make_config(
        r.family, layers=r.layers, hidden=r.hidden, heads=r.heads, ffn=r.ffn, kv_heads=r.kv_heads,
        vocab=len(tokenizer), positions=r.seq_len, **special_ids(tokenizer),
    )
    transformers.set_seed(r.seed)
    model = build_model(config, task)
    train_set, eval_set = lm_splits(train_text, eval_text, tokenizer, task, r)

    work = prepare_work(r.out, r.model_dump(exclude={"overwrite"}), r.overwrite)
    flops = train_flops_per_token(anatomy(model), r.seq_len)
    metrics = train(model, tokenizer, task, train_set, eval_set, work, r, flops_per_token=flops)
    if state.is_main_process:
        recipe = r.model_dump()
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            write_model(folder, model, tokenizer, operation="pretrain", recipe=recipe)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
            write_report(folder, r.out)
        print(f"saved {r.out}: eval loss {metrics['eval_loss']:.4f}, {metrics['flops']:.3g} training FLOPs")
    state.wait_for_everyone()
    return metrics
