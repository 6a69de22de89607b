"""`bequest pretrain`: train a small model from scratch, the ancestor every other verb starts from.

With --grow-at it grows deeper while it trains (progressive stacking, Gong et al. 2019): at each given
step the model is grown by a `bequest.grow` depth operator (`stack` by default: the trained blocks copied
on top), its AdamW moments along with it, and training goes on under the same schedule
(engine/growing.py). The growths are rows of metrics.jsonl and a list in the card's lineage.
"""

from __future__ import annotations

import json
import shutil

import transformers
from pydantic import Field, ValidationInfo, field_validator

from bequest import data
from bequest.anatomy import FAMILIES, build_model, make_config
from bequest.data.prepare import lm_splits, special_ids, text_splits
from bequest.engine import growth_events, prepare_work, processes, train_growing
from bequest.grow import DEPTH, GrowSpec
from bequest.grow.spec import parse_grow_at, resized
from bequest.io import atomic_dir, check_output, write_model
from bequest.recipe import CorpusFields, GrowFields, OutputFields, ShapeFields, TrainFields, defaults, without
from bequest.report import write_report


@without("width")
@defaults(depth="stack")
class PretrainRecipe(ShapeFields, GrowFields, CorpusFields, TrainFields, OutputFields):
    out: str = Field(..., description="output model folder")
    grow_at: str | None = Field(
        None, description="grow deeper while training (progressive stacking): 'STEP:SIZE' items like "
        "'200:layers*2,400:layers*2' (SIZE: layers*N, layers+N or layers=N), each by the --depth operator; the "
        "optimizer state grows along and the learning-rate schedule goes on",
    )

    @field_validator("grow_at")
    @classmethod
    def _check_grow_at(cls, value, info: ValidationInfo):
        if value is not None and {"steps", "layers", "depth", "placement"} <= info.data.keys():
            growths(value, **{k: info.data[k] for k in ("steps", "layers", "depth", "placement")})
        return value

    def growths(self) -> list[tuple[int, int]]:
        """(step, layers after it) of every growth --grow-at asks for."""
        return [] if self.grow_at is None else growths(self.grow_at, self.steps, self.layers, self.depth, self.placement)


def growths(text: str, steps: int, layers: int, depth: str, placement: str) -> list[tuple[int, int]]:
    """(step, layers after it) per growth of a --grow-at text; a ValueError names what is wrong."""
    out, last = [], 0
    for step, growth in parse_grow_at(text):
        if not last < step < steps:
            raise ValueError(f"growth step {step} must come after {last} and before --steps {steps}; list the steps "
                             "in increasing order within the run")
        wider = [f"{k}{op}{n}" for k, op, n in growth if k != "layers"]
        if wider:
            raise ValueError(f"{wider[0]}: --grow-at grows depth only; widen a saved model with `bequest grow`")
        target = layers
        for _, op, n in growth:
            target = resized(target, op, n)
        if target <= layers:
            raise ValueError(f"the growth at step {step} takes {layers} layers to {target}; a growth must add layers")
        DEPTH[depth](layers, target, placement)  # the operator's own limits (solar's, a placement's) refuse here
        out.append((step, target))
        last, layers = step, target
    return out


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
    plan = [(step, _grower(r, layers, k)) for k, (step, layers) in enumerate(r.growths())]
    model, metrics = train_growing(model, tokenizer, task, train_set, eval_set, work, r, plan, seq_len=r.seq_len)
    grown = [{"step": e["step"], **e["growth"]} for e in growth_events(work)]
    if state.is_main_process:
        recipe = r.model_dump()
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            write_model(folder, model, tokenizer, operation="pretrain", recipe=recipe,
                        lineage={"growth": grown} if grown else None)
            (folder / "eval.json").write_text(json.dumps(metrics, indent=1))
            write_report(folder, r.out)
        steps = "".join(f"; {g['from']['layers']} -> {g['to']['layers']} layers at step {g['step']} (loss "
                        f"{g['loss_before']:.4f} -> {g['loss_after']:.4f})" for g in grown)
        print(f"saved {r.out}: eval loss {metrics['eval_loss']:.4f}, {metrics['flops']:.3g} training FLOPs{steps}")
    state.wait_for_everyone()
    return metrics


def _grower(r: PretrainRecipe, layers: int, k: int):
    """The k-th growth of the run: the model grown to `layers` blocks by --depth."""
    from bequest.grow import grow

    spec = GrowSpec(layers=layers, depth=r.depth, placement=r.placement, noise=r.noise, seed=r.seed + k)
    return lambda model: grow(model, spec)
