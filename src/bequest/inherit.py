"""`bequest inherit`: knowledge inheritance (Qin et al., NAACL 2022; docs/methods.md, section 2).

A small trained teacher guides a bigger student's pre-training: for the first T_KI steps the loss mixes
the student's own cross-entropy with a KL term towards the teacher (alpha_t decays linearly to 0 by
default), then the student learns alone. The student starts from scratch, from a folder, or grown from
the teacher (`--init grow`, growth + KI). A chain of generations (G1 -> G2 -> G3) runs in one recipe:
the teacher is generation 1, each trained student teaches the next and is saved to OUT/gen{n}.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import transformers
import yaml
from pydantic import Field, field_validator

from bequest.anatomy import FAMILIES, anatomy, build_model, make_config
from bequest.data import same_tokenizer
from bequest.data.prepare import lm_splits, special_ids, text_splits
from bequest.engine import forward_flops_per_token, prepare_work, processes, train, train_flops_per_token
from bequest.engine.kd import KD, SCHEDULES, KDTrainer, TeacherMeter, TopKTable, precompute_topk
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_lm, load_model, write_model
from bequest.recipe import (
    CorpusFields, Family, GrowFields, KDFields, ModelFolder, OutputFields, SizeFields, TrainFields,
)
from bequest.report import write_report

Init = Literal["scratch", "grow"]
REPORTED = ("eval_loss", "tokens", "flops", "teacher_flops", "flops_with_teacher", "t_ki")


class Generation(SizeFields):
    """One student of a chain; unset sizes come from the generation before (head size, ratios kept)."""

    family: Family | None = Field(None, description="student family (default: the recipe's, else its teacher's)")
    init: Init | None = Field(None, description="'scratch' or 'grow' (default: the recipe's --init)")
    steps: int | None = Field(None, ge=1, description="optimizer steps for this generation (default: --steps)")
    t_ki: int | None = Field(None, ge=0, description="teacher steps for this generation (default: --t-ki)")


class InheritRecipe(SizeFields, GrowFields, KDFields, CorpusFields, TrainFields, OutputFields):
    out: str = Field(..., description="output model folder (a chain writes OUT/gen2, OUT/gen3, ... and summary.json)")
    teacher: ModelFolder = Field(..., description="trained teacher model folder or cached hub id (causal or masked LM); "
                           "its tokenizer is reused")
    student: ModelFolder | None = Field(None, description="start the student from this model folder (or cached hub id) "
                                  "instead of a new shape")
    family: Family | None = Field(None, description="student family (default: the teacher's; needs the same LM head)")
    init: Init = Field("scratch", description="student start: 'scratch' (random) or 'grow' (grown from the teacher)")
    t_ki: int | None = Field(None, ge=0, description="steps the teacher teaches, T_KI (default: half of --steps)")
    alpha_schedule: Literal[SCHEDULES] = Field(
        "linear", description="alpha_t: linear (alpha*(1-t/T_KI), the paper's), constant, switch (alpha, 0 from T_KI)"
    )
    top_k: int | None = Field(None, ge=1, description="keep the teacher's K largest logits per position (default: all)")
    precompute: bool = Field(
        False, description="run the teacher once over the training set, keep its top-K logits (causal LM; --top-k)"
    )
    generations: list[Generation] | None = Field(
        None,
        description="a chain of students, each taught by the one before (YAML list of shapes, or 'LAYERSxHIDDEN,...')",
    )
    OLD_NAMES: ClassVar[dict[str, str]] = {"grow_width": "width", "grow_depth": "depth", "grow_noise": "noise"}

    @field_validator("generations", mode="before")
    @classmethod
    def _parse_generations(cls, value):
        # A flag arrives as one string: a YAML list of mappings, or the short form '4x128,8x256'.
        if not isinstance(value, str):
            return value
        parsed = yaml.safe_load(value)
        if not isinstance(parsed, str):
            return parsed
        shapes = []
        for item in parsed.split(","):
            m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
            if not m:
                raise ValueError(f"{item.strip()!r} is not LAYERSxHIDDEN (e.g. 4x128)")
            shapes.append({"layers": int(m[1]), "hidden": int(m[2])})
        return shapes


# ---------------------------------------------------------------- the student


def _shape(g: Generation, t) -> dict:
    """A generation's sizes; the defaults keep the teacher's (`t`, an Anatomy) head size and ratios."""
    hidden = g.hidden or t.hidden
    heads = g.heads or (hidden // t.head_dim if hidden % t.head_dim == 0 else t.heads)
    group = t.heads // t.kv_heads
    return {
        "layers": g.layers or t.layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": g.kv_heads or (heads // group if heads % group == 0 else None),
        "ffn": g.ffn or t.ffn * hidden // t.hidden,
    }


def _student_config(family: str, shape: dict, t, tokenizer):
    """A fresh student config: the teacher's vocabulary and positions, the generation's sizes."""
    kv = shape["kv_heads"] if "kv_heads" in FAMILIES[family].config_keys else None
    return make_config(
        family, layers=shape["layers"], hidden=shape["hidden"], heads=shape["heads"], ffn=shape["ffn"], kv_heads=kv,
        vocab=t.vocab, positions=t.usable_positions, **special_ids(tokenizer),
    )


def _check_choices(r: InheritRecipe) -> None:
    """Contradictory settings, refused before anything is loaded."""
    shaped = any(v is not None for v in r.sizes().values())
    if r.generations is not None and (r.student or shaped):
        raise BequestError("--generations gives every student's shape; drop --student and the shape flags")
    if r.generations == []:
        raise BequestError("--generations is empty; list at least one student shape")
    if r.student and shaped:
        raise BequestError("pass either --student DIR or the student's shape flags, not both")
    if r.student and r.init == "grow":
        raise BequestError("--init grow builds the student from the teacher; drop --student or use --init scratch")
    if r.precompute and r.top_k is None:
        raise BequestError("--precompute stores the teacher's top-K logits; give --top-k (10 is almost lossless)")


def _plan(r: InheritRecipe, t, tokenizer) -> list[tuple[Generation, str, dict]]:
    """(generation, family, sizes) for every student, validated before any training starts."""
    gens = r.generations if r.generations is not None else [Generation(**r.sizes())]
    plan, prev = [], t
    for g in gens:
        family = g.family or r.family or t.family.name
        if t.task not in FAMILIES[family].tasks:
            raise BequestError(f"a {t.task} teacher needs a {t.task} student; {family} has none, pick another --family")
        init = g.init or r.init
        shape = _shape(g, prev)
        config = _student_config(family, shape, prev, tokenizer)  # raises on impossible sizes
        if init == "grow":
            from bequest.grow import GrowSpec, target_shape

            if family != prev.family.name:
                raise BequestError(
                    f"--init grow keeps the family ({prev.family.name}); drop --family {family} or use --init scratch"
                )
            target_shape(prev, GrowSpec.from_recipe(r, shape))  # raises if any size would shrink
        plan.append((g.model_copy(update={"init": init}), family, shape))
        prev = anatomy(config, t.task)
    return plan


def _build(r: InheritRecipe, g: Generation, family: str, shape: dict, teacher, tokenizer):
    t = anatomy(teacher)
    transformers.set_seed(r.seed)
    if g.init == "grow":
        from bequest.grow import GrowSpec, grow

        model = grow(teacher, GrowSpec.from_recipe(r, shape)).model
        return model.train()
    return build_model(_student_config(family, shape, t, tokenizer), t.task)


def _load_student(r: InheritRecipe, t, tokenizer):
    student, own = load_model(r.student)
    s = anatomy(student)
    if s.task != t.task:
        raise BequestError(f"{r.student} is a {s.task} model but the teacher is a {t.task}; KI needs the same LM head")
    if (own is not None and not same_tokenizer(own, tokenizer)) or s.vocab != t.vocab:
        raise BequestError(
            f"{r.student} and {r.teacher} have different vocabularies; KI compares their predictions token by token, "
            "so give the student by shape (--layers/--hidden) to reuse the teacher's tokenizer"
        )
    return student


# ---------------------------------------------------------------- the method


def _sizes(model) -> dict:
    a = anatomy(model)
    return {"family": a.family.name, "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
            "ffn": a.ffn}


def _train_generation(r, g, student, teacher, tokenizer, sets, folder: Path) -> dict:
    train_set, eval_set = sets
    spec = r.model_copy(update={"steps": g.steps or r.steps})
    t_ki = next(v for v in (g.t_ki, r.t_ki, spec.steps // 2) if v is not None)
    task = anatomy(teacher).task
    flops = train_flops_per_token(anatomy(student), r.seq_len)
    meter = TeacherMeter(0, forward_flops_per_token(anatomy(teacher), r.seq_len), flops)
    topk = None
    if r.precompute and r.alpha > 0:
        path = folder / "teacher_topk.safetensors"
        state = processes()
        if state.is_main_process and not path.exists():
            precompute_topk(teacher, train_set, r.top_k, folder / "teacher_topk.tmp.safetensors").rename(path)
        state.wait_for_everyone()
        topk = TopKTable(path)
        meter.teacher_tokens = topk.tokens  # the teacher read the whole training set once, up front
    kd = KD(alpha=r.alpha, schedule=r.alpha_schedule, t_ki=t_ki, tau=r.tau, top_k=r.top_k)
    trainer = functools.partial(KDTrainer, teacher=None if topk else teacher, kd=kd, meter=meter, topk=topk)
    metrics = train(student, tokenizer, task, train_set, eval_set, folder, spec, flops_per_token=flops,
                    trainer_class=trainer)
    return {**metrics, **meter.fields(metrics["tokens"]), "t_ki": t_ki}


def inherit(r: InheritRecipe) -> dict:
    """Pre-train a student with a smaller trained teacher (knowledge inheritance), or a chain of them."""
    state = processes()
    check_output(r.out, r.overwrite)
    _check_choices(r)
    teacher, tokenizer, t = load_lm(r.teacher, r.seq_len, "knowledge inheritance")
    student = _load_student(r, t, tokenizer) if r.student else None
    plan = _plan(r, t, tokenizer)
    if r.precompute and t.task != "causal_lm":
        raise BequestError("precomputed logits need a causal LM (MLM masks change each epoch); drop --precompute")

    train_text, eval_text = text_splits(r)
    train_set, eval_set = lm_splits(train_text, eval_text, tokenizer, t.task, r)

    chain = r.generations is not None
    recipe = r.model_dump(exclude={"overwrite"})
    work = prepare_work(r.out, recipe, r.overwrite)
    # A student given as a folder is where its weights come from (a grown model, say): its parent, so the
    # lineage runs through it; the teacher is named in the recipe.
    parent, summary, metrics = str(r.student or r.teacher), [], {}
    for n, (g, family, shape) in enumerate(plan, start=2):
        folder = work / f"gen{n}" if chain else work
        done = folder / "eval.json"
        if done.exists():  # finished before an interruption: its saved model teaches the next generation
            model, _ = load_model(folder)
            metrics = json.loads(done.read_text())
        else:
            folder.mkdir(parents=True, exist_ok=True)
            model = student if student is not None else _build(r, g, family, shape, teacher, tokenizer)
            metrics = _train_generation(r, g, model, teacher, tokenizer, (train_set, eval_set), folder)
            if state.is_main_process:
                write_model(folder, model, tokenizer, operation="inherit", parent=parent, recipe=recipe)
                done.write_text(json.dumps(metrics, indent=1))
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
                (folder / "teacher_topk.safetensors").unlink(missing_ok=True)
            state.wait_for_everyone()
        summary.append({"generation": n, "folder": str(Path(r.out) / f"gen{n}") if chain else str(r.out),
                        "parent": parent, "init": "folder" if student is not None else g.init, **_sizes(model),
                        **{k: metrics.get(k) for k in REPORTED}})
        teacher, parent = model, summary[-1]["folder"]
    if state.is_main_process:
        with atomic_dir(r.out, r.overwrite, work=work) as folder:
            if chain:
                chain_summary = {"teacher": str(r.teacher), "generations": summary}
                (folder / "summary.json").write_text(json.dumps(chain_summary, indent=1))
            write_report(folder, r.out)
        for s in summary:
            print(f"saved {s['folder']}: eval loss {s['eval_loss']:.4f}, {s['flops']:.3g} training FLOPs "
                  f"({s['flops_with_teacher']:.3g} with the teacher's forward passes)")
    state.wait_for_everyone()
    return {**metrics, "generations": summary} if chain else metrics
