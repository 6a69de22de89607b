"""`bequest pretrain`: train a small model from scratch, the ancestor every other verb starts from."""

from __future__ import annotations

import json
import shutil
from typing import Literal

import transformers
from pydantic import Field

from bequest import data
from bequest.anatomy import FAMILIES, anatomy, build_model, make_config
from bequest.engine import TrainFields, fixed_masks, lm_blocks, prepare_work, processes, train, train_flops_per_token
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_model, write_model

Family = Literal["gpt2", "bert", "roberta", "llama", "mistral", "qwen2"]


class PretrainRecipe(TrainFields):
    out: str = Field(..., description="output model folder")
    family: Family = Field("gpt2", description="model family")
    layers: int = Field(2, ge=1, description="transformer blocks")
    hidden: int = Field(64, ge=8, description="hidden size")
    heads: int = Field(4, ge=1, description="attention heads (hidden / heads = head size)")
    kv_heads: int | None = Field(None, ge=1, description="KV heads for grouped-query attention (Llama-like)")
    ffn: int | None = Field(None, ge=1, description="MLP width (default 4 x hidden)")
    vocab: int = Field(8000, ge=300, description="tokenizer vocabulary size, trained locally on the corpus")
    seq_len: int = Field(128, ge=8, description="tokens per training block")
    corpus: str = Field("default", description="'default' (embedded stdlib corpus) or a path to your text/jsonl/csv/parquet")
    domain: str | None = Field(None, description="one domain of the embedded corpus (default: all)")
    eval_blocks: int = Field(64, ge=1, description="validation blocks evaluated each time")
    overwrite: bool = Field(False, description="replace an existing output folder")


def corpus_splits(corpus: str, domain: str | None):
    if corpus == "default":
        return data.load_corpus(domain, "train"), data.load_corpus(domain, "validation")
    if domain is not None:
        raise BequestError("--domain selects a part of the embedded corpus; drop it when --corpus is a path")
    return data.load_text_files(corpus, "train"), data.load_text_files(corpus, "validation")


def lm_splits(train_text, eval_text, tokenizer, task: str, r) -> tuple:
    """Packed training blocks and a capped evaluation set (fixed masks for masked LM)."""
    train_set = lm_blocks(train_text, tokenizer, r.seq_len)
    eval_set = lm_blocks(eval_text, tokenizer, r.seq_len)
    eval_set = eval_set.select(range(min(r.eval_blocks, len(eval_set))))
    if task == "masked_lm":
        eval_set = fixed_masks(eval_set, tokenizer, seed=r.seed)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise BequestError(f"corpus {r.corpus!r} is shorter than one {r.seq_len}-token block; add text or lower --seq-len")
    return train_set, eval_set


def load_lm(path, seq_len: int, purpose: str):
    """(model, tokenizer, anatomy) of a saved language model that can take `seq_len`-token blocks."""
    model, tokenizer = load_model(path)
    a = anatomy(model)
    if a.task not in ("causal_lm", "masked_lm"):
        raise BequestError(f"{path} is a {a.task} model; {purpose} needs a causal or masked LM")
    if tokenizer is None:
        raise BequestError(f"{path} has no tokenizer.json; {purpose} reuses it, save it beside the model")
    room = a.positions - a.family.position_offset
    if seq_len > room:
        raise BequestError(f"--seq-len {seq_len} exceeds {path}'s {room} positions; lower it")
    return model, tokenizer, a


def pretrain(r: PretrainRecipe) -> dict:
    """Train a tiny model from scratch on the embedded corpus (or your text) and save an HF folder."""
    state = processes()
    check_output(r.out, r.overwrite)
    fam = FAMILIES[r.family]
    task = "masked_lm" if "masked_lm" in fam.tasks else "causal_lm"
    train_text, eval_text = corpus_splits(r.corpus, r.domain)
    # Your own corpus gets its own tokenizer; the embedded one shares a cached tokenizer across runs.
    own_text = None if r.corpus == "default" else list(train_text["text"])
    tokenizer = data.train_tokenizer(fam.tokenizer, r.vocab, texts=own_text)
    specials = {f"{k}_id": getattr(tokenizer, f"{k}_id") for k in ("pad_token", "bos_token", "eos_token")}
    config = make_config(
        r.family, layers=r.layers, hidden=r.hidden, heads=r.heads, ffn=r.ffn, kv_heads=r.kv_heads,
        vocab=len(tokenizer), positions=r.seq_len, **{k: v for k, v in specials.items() if v is not None},
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
        print(f"saved {r.out}: eval loss {metrics['eval_loss']:.4f}, {metrics['flops']:.3g} training FLOPs")
    state.wait_for_everyone()
    return metrics
