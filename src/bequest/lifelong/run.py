"""`bequest lifelong` itself: the stage loop, then the model, the domains' data and the Trainer it needs."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import torch
import transformers
from datasets import Dataset

from bequest import data
from bequest.anatomy import FAMILIES, anatomy, build_model, make_config
from bequest.data.corpus import domains, named_domains
from bequest.data.prepare import cached_blocks, check_room, domain_texts, special_ids
from bequest.engine import prepare_work, processes, train
from bequest.engine.replay import Memory, memory_share
from bequest.errors import BequestError
from bequest.grow.spec import SIZES, parse_schedule
from bequest.io import atomic_dir, check_output, load_model, make_dir, write_model
from bequest.lifelong.metrics import perplexity, plot, stage_metrics
from bequest.lifelong.prompts import collate, encode, prompt_id, prompt_token
from bequest.lifelong.recipe import METHODS, LifelongRecipe
from bequest.lifelong.schedule import check_growth, grow_stage, rewarm_factor, stage_steps
from bequest.report import write_report


def lifelong(r: LifelongRecipe) -> dict:
    """Pre-train through a stream of domains: ELLE (growth, recovery warm-up, replay, domain prompts) or a baseline."""
    state = processes()
    check_output(r.out, r.overwrite)
    specs = r.stream()
    names = [_domain_name(s, r.corpus) for s in specs]
    if not specs or len(set(names)) != len(names):
        raise BequestError(f"--domains {r.domains!r} must name distinct domains; e.g. {','.join(domains(r.corpus)[:3])}")
    if not r.base and "causal_lm" not in FAMILIES[r.family].tasks:
        raise BequestError(f"{r.family} is not a causal LM family; pick gpt2, llama, mistral or qwen2")
    plan = METHODS[r.method]
    if plan["replay"] and len(specs) > 1:
        memory_share(r.replay_fraction, r.batch_size)  # refused here, not after the first stage has trained
    use_prompts = plan["prompts"] and r.prompts
    schedule = parse_schedule(r.grow_schedule)
    tokenizer, model = _tokenizer_and_model(r, specs, names, use_prompts)
    if plan["grow"] and len(specs) > 1:
        check_growth(model, schedule, r)
    train_sets, eval_sets = _domain_sets(r, specs, names, tokenizer, use_prompts)
    memory = Memory(seed=r.seed, per_source=r.memory_size)
    trainer_class = partial(RewarmTrainer, lr_floor=r.lr_floor) if plan["rewarm"] else WindowTrainer

    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    per_step = r.batch_size * r.grad_accum * state.num_processes
    micro = per_step // r.batch_size  # micro-batches per optimizer step; each one is a replay window

    def evaluate(m) -> dict:
        return {n: perplexity(m, e, r.batch_size) for n, e in zip(names, eval_sets)}

    parent, stages = r.base, []
    for k, name in enumerate(names):
        if k:
            memory.add(train_sets[k - 1])
        folder = work / f"stage{k}-{name}"
        done = folder / "stage.json"
        if done.exists():  # finished before an interruption
            model, _ = load_model(folder)
            stages.append(json.loads(done.read_text()))
            parent = str(Path(r.out) / folder.name)
            continue
        if state.is_main_process:  # an unfinished stage starts over
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        state.wait_for_everyone()
        row = {"stage": k, "domain": name, "ppl_grown": None, "recover_steps": 0, "flops": 0}
        if k and plan["grow"]:
            growth = schedule[min(k - 1, len(schedule) - 1)]
            model = grow_stage(model, growth, r, k)
            row["ppl_grown"] = evaluate(model)
        recover = r.warmup_steps if k and plan["recover"] and plan["grow"] else 0
        recover, steps, fpt = stage_steps(r, model, per_step, r.seq_len + use_prompts, recover)
        if recover:  # function-recovering warm-up: memory of the earlier domains only
            windows = memory.windows(None, r.batch_size, recover * micro, 1.0, seed=r.seed * 1000 + k)
            spec = r.model_copy(update={"steps": recover, "warmup": min(r.warmup, recover // 2),
                                        "eval_every": recover, "save_every": max(r.save_every, recover)})
            earlier = memory.pool()
            held = earlier.select(range(min(len(earlier), r.eval_blocks)))
            m = train(model, tokenizer, "causal_lm", windows, held, folder / "recover", spec,
                      flops_per_token=fpt, trainer_class=WindowTrainer, progress=False)
            row.update(recover_steps=recover, flops=m["flops"])
            if state.is_main_process:  # the only process that logged
                shutil.move(folder / "recover" / "metrics.jsonl", folder / "recover.jsonl")
                if (folder / "recover" / "runs").is_dir():  # --report-to tensorboard: the stage's runs/recover
                    shutil.move(folder / "recover" / "runs", make_dir(folder / "runs") / "recover")
                shutil.rmtree(folder / "recover")
            state.wait_for_everyone()
        fraction = r.replay_fraction if k and plan["replay"] else 0.0
        windows = memory.windows(train_sets[k], r.batch_size, steps * micro, fraction, seed=r.seed * 1000 + k + 500)
        spec = r.model_copy(update={"steps": steps})
        m = train(model, tokenizer, "causal_lm", windows, eval_sets[k], folder, spec, flops_per_token=fpt,
                  trainer_class=trainer_class, progress=False)
        row.update(steps=steps, replay_fraction=fraction, memory_per_batch=memory_share(fraction, r.batch_size),
                   flops=row["flops"] + m["flops"],
                   shape={key: getattr(anatomy(model), key) for key in SIZES}, ppl=evaluate(model))
        if state.is_main_process:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            write_model(folder, model, tokenizer, operation=f"lifelong:{r.method}", parent=parent, recipe=recipe)
            done.write_text(json.dumps(row, indent=1))
        state.wait_for_everyone()
        stages.append(row)
        parent = str(Path(r.out) / folder.name)

    for row, extra in zip(stages, stage_metrics([s["ppl"] for s in stages], names)):
        row.update(extra)
    metrics = {"method": r.method, "domains": names, "prompts": use_prompts, "stages": stages,
               "flops": sum(s["flops"] for s in stages), "AP": stages[-1]["AP"], "AP+": stages[-1]["AP+"]}
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as out:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            plot(metrics, out)
            write_report(out, r.out)
        plus = "n/a" if metrics["AP+"] is None else f"{metrics['AP+']:.3f}"
        print(f"saved {r.out}: {len(stages)} stages, AP {metrics['AP']:.3f}, AP+ {plus}, {metrics['flops']:.3g} FLOPs")
    state.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------- the model and the domains


def _domain_name(spec: str, corpus: str) -> str:
    return spec if named_domains(spec, corpus) else Path(spec).stem


def _tokenizer_and_model(r: LifelongRecipe, specs: list[str], names: list[str], prompts: bool):
    if r.base:
        model, tokenizer = load_model(r.base)
        if tokenizer is None:
            raise BequestError(f"{r.base} has no tokenizer.json; save the tokenizer beside the model")
    else:
        fam = FAMILIES[r.family]
        # The default corpus shares one cached tokenizer across runs; other text gets one of its own.
        default = r.corpus == "default" and all(named_domains(s) for s in specs)
        own = None if default else [t for s in specs for t in domain_texts(s, "train", r, r.corpus)["text"]]
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


def _domain_sets(r: LifelongRecipe, specs: list[str], names: list[str], tokenizer, prompts: bool):
    """Every domain's encoded training blocks and its first eval_blocks validation blocks."""
    train_sets, eval_sets = [], []
    for spec, name in zip(specs, names):
        prompt = prompt_id(tokenizer, name) if prompts else None
        blocks = cached_blocks(domain_texts(spec, "train", r, r.corpus), tokenizer, r.seq_len)
        held = cached_blocks(domain_texts(spec, "validation", r, r.corpus), tokenizer, r.seq_len)[: r.eval_blocks]
        if not len(blocks) or not len(held):
            raise BequestError(f"domain {name!r} is shorter than one {r.seq_len}-token block; add text or lower it")
        train_sets.append(Dataset.from_dict(encode(blocks, prompt, tokenizer.pad_token_id)))
        eval_sets.append(Dataset.from_dict(encode(held, prompt, tokenizer.pad_token_id)))
    return train_sets, eval_sets


# ---------------------------------------------------------------- training


class WindowTrainer(transformers.Trainer):
    """Batches in the order `Memory.windows` built them (each replay window stays one batch), labels as encoded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = collate

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class RewarmTrainer(WindowTrainer):
    """A WindowTrainer whose learning rate follows `rewarm_factor`: re-warmed from lr_floor x peak, re-decayed to it."""

    def __init__(self, *args, lr_floor: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_floor = lr_floor

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            factor = partial(rewarm_factor, steps=num_training_steps, warmup=warmup, floor=self.lr_floor)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler
