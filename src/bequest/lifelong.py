"""`bequest lifelong`: pre-training through a stream of domains (ELLE, Qin et al. 2022; METHODS.md section 6).

Domains arrive in order. Stage k trains on domain k; before it, for `method: elle`, the model is grown
(any `bequest.grow` operator, per the grow schedule), a function-recovering warm-up trains it on the
memory of the earlier domains, and then it learns the new domain with memory replay: every batch holds
exactly round(replay_fraction * batch_size) blocks drawn from a bounded memory (memory_size random
training blocks kept per earlier domain). The baselines in the same command: `naive` (fixed size, no
replay), `replay` (replay only) and `grow` (growth only).

Domain prompts: one special token per domain, `<|domain:NAME|>`, added to the tokenizer up front (so
the vocabulary never changes mid-stream). Every block of that domain is fed as [prompt, t1 .. tL]. The
prompt's row of the token embedding is the learned prompt vector, so it is saved, reloaded
(`from_pretrained`) and grown like any other row, and exact growth still preserves the function. Use it
when fine-tuning on a domain's tasks by prepending `prompt_id(tokenizer, domain)`. Prompted or not, the
same tokens are scored: t2 .. tL (the prompt and t1 carry no label), so perplexities compare across
methods.

Metrics, after every stage k (domains d_0 .. d_k seen), with ppl_j(k) the validation perplexity of
domain j after stage k (exp of the mean token NLL over its first eval_blocks blocks):
  AP(k)  = mean over j <= k of ppl_j(k)
  AP+(k) = mean over j < k of (ppl_j(k) - ppl_j(j)); None at k = 0 (no earlier domain)
Perplexities of every domain are also taken right after growth (`ppl_grown`): with exact growth they equal
the previous stage's.

Outputs: OUT/stage{k}-{domain}/ (HF folders; lineage parent = the previous stage), OUT/metrics.json,
OUT/ap.png (AP and AP+ per stage) and OUT/domains.png (each domain's perplexity per stage). Resumable
stage by stage: a finished stage is loaded on rerun, an unfinished one starts over.

Equal budgets: `budget_flops` sets each stage's steps from the engine's FLOP count of the model it
trains (warm-up included), so a grown model gets fewer steps for the same FLOPs per domain.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import transformers
from datasets import Dataset, concatenate_datasets
from pydantic import Field, field_validator

from bequest import data
from bequest.anatomy import FAMILIES, anatomy, build_model, make_config
from bequest.data.prepare import check_room, domain_texts, special_ids
from bequest.engine import lm_blocks, prepare_work, processes, train, train_flops_per_token
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_model, write_model
from bequest.recipe import BlockFields, GrowFields, OutputFields, ShapeFields, TrainFields, defaults

Method = Literal["elle", "naive", "replay", "grow"]
# What each method does at every stage after the first.
METHODS = {
    "elle": dict(grow=True, recover=True, replay=True, prompts=True),
    "naive": dict(grow=False, recover=False, replay=False, prompts=False),
    "replay": dict(grow=False, recover=False, replay=True, prompts=False),
    "grow": dict(grow=True, recover=False, replay=False, prompts=False),
}
SIZES = ("hidden", "heads", "kv_heads", "ffn", "layers")


@defaults(seq_len=64, eval_blocks=32)
class LifelongRecipe(ShapeFields, GrowFields, BlockFields, TrainFields, OutputFields):
    out: str = Field(..., description="output folder: one model folder per stage, metrics.json, ap.png, domains.png")
    steps: int = Field(200, ge=1, description="optimizer steps of training on each new domain")
    domains: str = Field(
        ",".join(data.DOMAINS),
        description="the stream, comma-separated: embedded corpus domains and/or paths to text/jsonl/csv/parquet",
    )
    method: Method = Field("elle", description="elle, or a baseline: naive, replay (replay only), grow (growth only)")
    base: str | None = Field(None, description="start from this causal LM folder (default: a fresh model, shape below)")
    grow_schedule: str = Field(
        "hidden+32,layers+1",
        description="growth before each new domain: 'hidden+32,layers+1' every time, or one per growth separated "
        "by ';' (the last repeats); 'key=N' sets a size; keys: hidden, heads, kv_heads, ffn, layers",
    )
    warmup_steps: int = Field(
        10, ge=0, description="function-recovering warm-up: steps on memory of earlier domains after growth (elle)"
    )
    replay_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of every batch drawn from memory (elle, replay)"
    )
    memory_size: int = Field(64, ge=1, description="training blocks kept in memory per domain")
    prompts: bool = Field(True, description="learn a domain prompt token per domain (elle only)")
    budget_flops: float | None = Field(
        None, gt=0, description="training FLOPs per domain (warm-up included); sets each stage's steps over --steps"
    )

    @field_validator("grow_schedule")
    @classmethod
    def _check_schedule(cls, value):
        parse_schedule(value)
        return value


# ---------------------------------------------------------------- growth schedule


def parse_schedule(text: str) -> list[list[tuple[str, str, int]]]:
    """'hidden+32,layers+1;layers=6' -> one list of (key, op, n) per growth."""
    out = []
    for stage in text.split(";"):
        steps = []
        for item in filter(None, (s.strip() for s in stage.split(","))):
            m = re.fullmatch(r"(\w+)\s*([+=])\s*(\d+)", item)
            if not m or m[1] not in SIZES:
                raise ValueError(f"{item!r} is not KEY+N or KEY=N with KEY one of {', '.join(SIZES)}")
            steps.append((m[1], m[2], int(m[3])))
        out.append(steps)
    return out


def next_shape(anat, growth: list[tuple[str, str, int]]) -> dict:
    """The target sizes of one growth; the MLP keeps its ratio to the hidden size unless it is set."""
    shape = {k: getattr(anat, k) for k in SIZES}
    for key, op, n in growth:
        shape[key] = shape[key] + n if op == "+" else n
    if not any(k == "ffn" for k, _, _ in growth):
        shape["ffn"] = anat.ffn * shape["hidden"] // anat.hidden
    if not any(k in ("heads", "kv_heads") for k, _, _ in growth):  # let grow keep the head size and group
        shape.pop("heads"), shape.pop("kv_heads")
    return shape


# ---------------------------------------------------------------- prompts, blocks, replay


def prompt_token(domain: str) -> str:
    return f"<|domain:{domain}|>"


def prompt_id(tokenizer, domain: str) -> int | None:
    """The token id of `domain`'s learned prompt, or None if the tokenizer has none."""
    tid = tokenizer.convert_tokens_to_ids(prompt_token(domain))
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def encode(blocks: list[list[int]], prompt: int | None, pad: int | None) -> dict:
    """input_ids and labels; the first block token is never scored, so prompted or not the same tokens are."""
    ids, labels = [], []
    for b in blocks:
        lab = [-100 if t == pad else t for t in b]  # what the engine's causal collator does
        lab[0] = -100
        ids.append(b if prompt is None else [prompt, *b])
        labels.append(lab if prompt is None else [-100, *lab])
    return {"input_ids": ids, "labels": labels}


def collate(features: list[dict]) -> dict:
    return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "labels")}


def replay_order(n_new: int, n_memory: int, batch: int, batches: int, fraction: float, seed: int) -> list[int]:
    """Indices into new (0 .. n_new-1) + memory (n_new ..) blocks, batch by batch: each consecutive `batch`
    window holds exactly round(fraction * batch) memory blocks, at shuffled places. Both pools are walked
    through fresh permutations, so every block is seen before any repeats."""
    rng = np.random.default_rng(seed)
    m = round(fraction * batch) if n_memory else 0
    if n_new == 0:
        m = batch  # memory only: the recovery warm-up

    def stream(n, offset):
        while True:
            yield from (offset + rng.permutation(n)).tolist()

    new, mem = stream(n_new, 0) if n_new else None, stream(n_memory, n_new) if m else None
    order = []
    for _ in range(batches):
        window = [next(mem) for _ in range(m)] + [next(new) for _ in range(batch - m)]
        order += [window[i] for i in rng.permutation(batch)]
    return order


class StreamTrainer(transformers.Trainer):
    """Batches in the order the stream built them (replay windows stay whole), labels as encoded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = collate

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


@torch.no_grad()
def perplexity(model, encoded: Dataset, batch_size: int = 16) -> float:
    """exp(mean NLL) over the labelled tokens of `encoded`."""
    mode = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = collate([encoded[j] for j in range(i, min(i + batch_size, len(encoded)))])
        logits = model(input_ids=b["input_ids"].to(device)).logits[:, :-1].float()
        labels = b["labels"][:, 1:].to(device)
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += (labels != -100).sum().item()
    model.train(mode)
    return math.exp(min(nll / count, 50.0))


def stream_metrics(ppl: list[dict], domains: list[str]) -> list[dict]:
    """AP and AP+ after every stage from ppl[k][domain] (see the module docstring)."""
    out = []
    for k in range(len(ppl)):
        ap = float(np.mean([ppl[k][d] for d in domains[: k + 1]]))
        plus = float(np.mean([ppl[k][d] - ppl[j][d] for j, d in enumerate(domains[:k])])) if k else None
        out.append({"AP": ap, "AP+": plus})
    return out


# ---------------------------------------------------------------- the stream


def _domain_name(spec: str) -> str:
    return spec if spec in data.DOMAINS else Path(spec).stem


def _tokenizer_and_model(r: LifelongRecipe, specs: list[str], names: list[str], prompts: bool):
    if r.base:
        model, tokenizer = load_model(r.base)
        if tokenizer is None:
            raise BequestError(f"{r.base} has no tokenizer.json; save the tokenizer beside the model")
    else:
        fam = FAMILIES[r.family]
        own = None if all(s in data.DOMAINS for s in specs) else [t for s in specs for t in domain_texts(s, "train")["text"]]
        tokenizer = data.train_tokenizer(fam.tokenizer, r.vocab, texts=own)
    if prompts:  # every domain's prompt up front: the vocabulary stays fixed through the stream
        tokenizer.add_tokens([prompt_token(n) for n in names], special_tokens=True)
    if r.base:
        if anatomy(model).task != "causal_lm":
            raise BequestError(f"{r.base} is not a causal LM; lifelong pre-training here needs one (GPT-2, Llama, ...)")
        if prompts and len(tokenizer) > anatomy(model).vocab:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = make_config(
            r.family, layers=r.layers, hidden=r.hidden, heads=r.heads, ffn=r.ffn, kv_heads=r.kv_heads,
            vocab=len(tokenizer), positions=r.seq_len + prompts, **special_ids(tokenizer),
        )
        transformers.set_seed(r.seed)
        model = build_model(config, "causal_lm")
    check_room(anatomy(model), r.seq_len + prompts, "--seq-len (+1 for the prompt)")
    return tokenizer, model


def _stage_steps(r: LifelongRecipe, model, per_step: int, seq: int, recover: int) -> tuple[int, int, int]:
    """(recovery steps, training steps, FLOPs per token) of a stage; a FLOP budget sets the steps."""
    fpt = train_flops_per_token(anatomy(model), seq)
    if r.budget_flops is None:
        return recover, r.steps, fpt
    total = int(r.budget_flops // (per_step * seq * fpt))
    recover = min(recover, total // 2)
    return recover, max(1, total - recover), fpt


def _plot(metrics: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, names = metrics["stages"], metrics["domains"]
    x = range(len(stages))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(x, [s["AP"] for s in stages], "o-")
    ax[0].set(title=f"AP ({metrics['method']})", xlabel="after stage", ylabel="mean perplexity, seen domains")
    ax[1].plot(x[1:], [s["AP+"] for s in stages[1:]], "o-", color="C3")
    ax[1].set(title="AP+ (forgetting)", xlabel="after stage", ylabel="mean ppl increase, earlier domains")
    for a in ax:
        a.set_xticks(list(x), [f"{k}:{n}" for k, n in enumerate(names)], rotation=30)
    fig.tight_layout()
    fig.savefig(folder / "ap.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, name in enumerate(names):
        ax.plot(range(j, len(stages)), [s["ppl"][name] for s in stages[j:]], "o-", label=name)
    ax.set(xlabel="after stage", ylabel="validation perplexity", yscale="log", title="per-domain perplexity")
    ax.set_xticks(list(x), [f"{k}:{n}" for k, n in enumerate(names)], rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "domains.png", dpi=100)
    plt.close("all")


def _grow(model, growth, r: LifelongRecipe, k: int):
    from bequest.grow import grow

    shape = next_shape(anatomy(model), growth)
    return grow(model, **shape, width=r.width, depth=r.depth, placement=r.placement, noise=r.noise, seed=r.seed + k).model.train()


def _check_growth(model, schedule, r: LifelongRecipe) -> None:
    """Operators and the first growth's sizes, refused before any stage trains."""
    from bequest.grow import depth, targets, width

    width.check(r.width)
    depth.check(r.depth)
    targets(anatomy(model), **next_shape(anatomy(model), schedule[0]))


def lifelong(r: LifelongRecipe) -> dict:
    """Pre-train through a stream of domains: ELLE (growth, recovery warm-up, replay, domain prompts) or a baseline."""
    state = processes()
    check_output(r.out, r.overwrite)
    specs = [s.strip() for s in r.domains.split(",") if s.strip()]
    names = [_domain_name(s) for s in specs]
    if not specs or len(set(names)) != len(names):
        raise BequestError(f"--domains {r.domains!r} must name distinct domains; e.g. {','.join(data.DOMAINS[:3])}")
    if not r.base and "causal_lm" not in FAMILIES[r.family].tasks:
        raise BequestError(f"{r.family} is not a causal LM family; pick gpt2, llama, mistral or qwen2")
    plan = METHODS[r.method]
    use_prompts = plan["prompts"] and r.prompts
    schedule = parse_schedule(r.grow_schedule)
    tokenizer, model = _tokenizer_and_model(r, specs, names, use_prompts)
    if plan["grow"] and len(specs) > 1:
        _check_growth(model, schedule, r)
    pad = tokenizer.pad_token_id

    # Encoded training blocks, evaluation blocks and the bounded memory of every domain.
    train_sets, eval_sets, memory = [], [], []
    for k, (spec, name) in enumerate(zip(specs, names)):
        prompt = prompt_id(tokenizer, name) if use_prompts else None
        blocks = list(lm_blocks(domain_texts(spec, "train"), tokenizer, r.seq_len)["input_ids"])
        held = list(lm_blocks(domain_texts(spec, "validation"), tokenizer, r.seq_len)["input_ids"])[: r.eval_blocks]
        if not blocks or not held:
            raise BequestError(f"domain {name!r} is shorter than one {r.seq_len}-token block; add text or lower it")
        keep = np.random.default_rng([r.seed, k]).permutation(len(blocks))[: r.memory_size]
        train_sets.append(Dataset.from_dict(encode(blocks, prompt, pad)))
        eval_sets.append(Dataset.from_dict(encode(held, prompt, pad)))
        memory.append(train_sets[-1].select(sorted(keep.tolist())))

    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    per_step = r.batch_size * r.grad_accum * state.num_processes
    micro = per_step // r.batch_size  # micro-batches per optimizer step; each one is a replay window

    def evaluate(m) -> dict:
        return {n: perplexity(m, e, r.batch_size) for n, e in zip(names, eval_sets)}

    parent, stages = r.base, []
    for k, name in enumerate(names):
        folder = work / f"stage{k}-{name}"
        done = folder / "stage.json"
        if done.exists():  # finished before an interruption
            model, _ = load_model(folder)
            stages.append(json.loads(done.read_text()))
            parent = str(Path(r.out) / folder.name)
            continue
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished stage starts over
        folder.mkdir(parents=True)
        row = {"stage": k, "domain": name, "ppl_grown": None, "recover_steps": 0, "flops": 0}
        earlier = concatenate_datasets(memory[:k]) if k else None
        if k and plan["grow"]:
            growth = schedule[min(k - 1, len(schedule) - 1)]
            model = _grow(model, growth, r, k)
            row["ppl_grown"] = evaluate(model)
        recover = r.warmup_steps if k and plan["recover"] and plan["grow"] else 0
        recover, steps, fpt = _stage_steps(r, model, per_step, r.seq_len + use_prompts, recover)
        if recover:  # function-recovering warm-up: memory of the earlier domains only
            order = replay_order(0, len(earlier), r.batch_size, recover * micro, 1.0, seed=r.seed * 1000 + k)
            spec = r.model_copy(update={"steps": recover, "warmup": min(r.warmup, recover // 2),
                                        "eval_every": recover, "save_every": max(r.save_every, recover)})
            held = earlier.select(range(min(len(earlier), r.eval_blocks)))
            m = train(model, tokenizer, "causal_lm", earlier.select(order), held, folder / "recover", spec,
                      flops_per_token=fpt, trainer_class=StreamTrainer, progress=False)
            row.update(recover_steps=recover, flops=m["flops"])
            shutil.move(folder / "recover" / "metrics.jsonl", folder / "recover.jsonl")
            shutil.rmtree(folder / "recover")
        fraction = r.replay_fraction if k and plan["replay"] else 0.0
        pool = concatenate_datasets([train_sets[k], earlier]) if fraction else train_sets[k]
        order = replay_order(len(train_sets[k]), len(pool) - len(train_sets[k]), r.batch_size, steps * micro, fraction,
                             seed=r.seed * 1000 + k + 500)
        spec = r.model_copy(update={"steps": steps})
        m = train(model, tokenizer, "causal_lm", pool.select(order), eval_sets[k], folder, spec, flops_per_token=fpt,
                  trainer_class=StreamTrainer, progress=False)
        row.update(steps=steps, replay_fraction=fraction, memory_per_batch=round(fraction * r.batch_size),
                   flops=row["flops"] + m["flops"],
                   shape={key: getattr(anatomy(model), key) for key in SIZES}, ppl=evaluate(model))
        if state.is_main_process:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            write_model(folder, model, tokenizer, operation=f"lifelong:{r.method}", parent=parent, recipe=recipe)
            done.write_text(json.dumps(row, indent=1))
        state.wait_for_everyone()
        stages.append(row)
        parent = str(Path(r.out) / folder.name)

    for row, extra in zip(stages, stream_metrics([s["ppl"] for s in stages], names)):
        row.update(extra)
    metrics = {"method": r.method, "domains": names, "prompts": use_prompts, "stages": stages,
               "flops": sum(s["flops"] for s in stages), "AP": stages[-1]["AP"], "AP+": stages[-1]["AP+"]}
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as out:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            _plot(metrics, out)
        plus = "n/a" if metrics["AP+"] is None else f"{metrics['AP+']:.3f}"
        print(f"saved {r.out}: {len(stages)} stages, AP {metrics['AP']:.3f}, AP+ {plus}, {metrics['flops']:.3g} FLOPs")
    state.wait_for_everyone()
    return metrics

