"""`bequest upgrade --from OLD --to NEW SOURCE... OUT`: every adapter and fine-tune of OLD onto NEW.

Per source: the path (reuse, port, transfer; or as --method says), accuracy on OLD, on NEW right after
the move (step 0) and after tuning with OLD+SOURCE as the teacher; with --compare-fresh, a fresh
module tuned on NEW for the same steps beside it. A source that fails is reported and the others go
on; finished sources are skipped on a rerun.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bequest.anatomy import anatomy, name_labels
from bequest.data import same_tokenizer
from bequest.data.prepare import check_room, task_sets
from bequest.engine import accuracy, curve, prepare_work, train, train_flops_per_token
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_model, hold, load_config, load_tokenizer, make_dir, save_recipe
from bequest.lineage import relation
from bequest.recipe import read_yaml
from bequest.report import write_report
from bequest.peft import save_tuned
from bequest.task_weights import kd_trainer
from bequest.upgrade.paths import Move, start
from bequest.upgrade.recipe import AUTO, UpgradeRecipe
from bequest.upgrade.sources import given_data, on_old, read_source, task_data
from bequest.upgrade.summary import write_summary

REPORT = "upgrade.json"  # in each source's output folder: written last, so its presence means done


def upgrade(r: UpgradeRecipe, *, progress: bool = True) -> list[dict]:
    """Move every adapter and fine-tune of OLD onto its successor NEW (continued, grown or unrelated)."""
    for model in (r.from_, r.to):
        check_model(model)
    link = relation(r.from_, r.to)
    tokenizers = (load_tokenizer(r.from_, required="upgrading"), load_tokenizer(r.to, required="upgrading"))
    data = given_data(r)
    out = _open(r)
    rows = []
    for k, (source, given) in enumerate(zip(r.sources, data)):
        dest = out / _name(source, r.sources[:k])
        if (dest / REPORT).exists():
            rows.append({**json.loads((dest / REPORT).read_text()), "status": "done earlier"})
            print(f"{source}: already upgraded in {dest}, skipped")
            continue
        begin = time.perf_counter()
        try:
            row = _one(r, source, given, dest, link, tokenizers, progress)
        except BequestError as e:
            row = {"source": str(source), "status": "failed", "reason": str(e), "seconds": time.perf_counter() - begin}
            print(f"{source}: failed ({e})")
        rows.append(row)
    write_summary(out, rows, {"from": str(r.from_), "to": str(r.to), "relation": link.kind})
    write_report(out, r.out)
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        raise BequestError(f"{len(failed)} of {len(rows)} sources failed (first: {failed[0]['source']}: "
                           f"{failed[0]['reason']}); the others landed, see {out / 'summary.md'}")
    return rows


def _open(r: UpgradeRecipe) -> Path:
    """OUT, created or resumed: a rerun of the same upgrade (more sources welcome) goes on where it stopped."""
    out = Path(r.out)
    mine = r.model_dump(exclude={"overwrite", "sources"})
    saved = out / "recipe.yaml"
    if out.exists() and r.overwrite:
        shutil.rmtree(out)
    elif out.exists() and not saved.exists() and any(out.iterdir()):
        raise BequestError(f"{out} exists and holds no upgrade; pass --overwrite to replace it or choose another OUT")
    elif saved.exists():
        other = {k: v for k, v in read_yaml(saved).items() if k != "sources"}
        if other != mine:
            diff = sorted(k for k in set(other) | set(mine) if other.get(k) != mine.get(k))
            raise BequestError(f"{out} holds an upgrade with other settings ({', '.join(diff)}); pass --overwrite to "
                               "start over or choose another OUT")
    make_dir(out)
    hold(out)  # a second run into the same OUT is refused while this one works
    save_recipe(out, {**mine, "sources": list(r.sources)})
    return out


def _name(source: str, before: list[str]) -> str:
    """The source's folder name in OUT (numbered when two sources share a name)."""
    name = Path(source).resolve().name
    taken = sum(Path(s).resolve().name == name for s in before)
    return f"{name}-{taken + 1}" if taken else name


def _one(r: UpgradeRecipe, path: str, given: str | None, dest: Path, link, tokenizers, progress: bool) -> dict:
    begin = time.perf_counter()
    source = read_source(path)
    task = task_data(r, source, given)
    labels = source.labels(r.from_)
    if r.steps and task is None:
        raise BequestError(f"no task data for {path}: its folder has no recipe.yaml naming it; pass --data "
                           "(or --steps 0 to move it without tuning)")
    classify = source.task(r.to) == "seq_cls"
    if task is not None and not classify:
        raise BequestError(f"{path} is a {source.task(r.to)} module; task data measures classifiers only, so pass "
                           "--steps 0 and no --data for it")
    method = AUTO[link.kind] if r.method == "auto" else r.method
    old_tok, new_tok = tokenizers
    sets = None
    if task is not None:
        virtual = (source.module.config.get("num_virtual_tokens") or 0) if source.module else 0
        check_room(anatomy(load_config(r.to)), r.max_len + virtual, "--max-len (with virtual tokens)", r.to)
        sets = {"new": task_sets(task, new_tok), "old": task_sets(task, old_tok)}
        if sets["new"][2] != labels and labels is not None:
            raise BequestError(f"{path} predicts {labels} labels but its task data has {sets['new'][2]}")
        labels = sets["new"][2]
    teacher = on_old(source, r.from_, r.seed)
    move = Move(source, Path(r.from_), Path(r.to), link, labels, r.seed, task, tokenizers)
    student, how = start(method, move)
    if sets is not None:
        name_labels(student.config, sets["new"][0].features["label"].names)
    row = {"source": str(path), "kind": source.kind, "relation": link.kind, "path": method, "steps": r.steps,
           "status": "upgraded", "details": how}
    if sets is not None:
        row["acc_old"] = accuracy(teacher, old_tok, sets["old"][1])
        row["acc_step0"] = accuracy(student, new_tok, sets["new"][1])
    # Every path but fresh learns from OLD+SOURCE; across tokenizers the teacher reads the text anew.
    taught = method != "fresh" and r.alpha > 0
    work = None
    if r.steps:
        teacher_for = _teacher(teacher, tokenizers, r.max_len) if taught else None
        work = prepare_work(dest, {**r.model_dump(exclude={"overwrite", "sources"}), "source": str(path)}, False)
        row.update(_tune(r, student, new_tok, sets["new"], work, teacher_for, progress))
    if r.compare_fresh and r.steps:
        row["fresh"] = _fresh(r, move, new_tok, sets["new"], dest, progress)
    row["seconds"] = time.perf_counter() - begin
    with atomic_dir(dest, False, work=work) as folder:
        save_tuned(folder, student, new_tok, parent=str(r.to), operation="upgrade",
                   recipe={**r.model_dump(exclude={"overwrite", "sources"}), "source": str(path)},
                   lineage={"source": str(path), "path": method})
        (folder / REPORT).write_text(json.dumps(row, indent=1, default=str))
    shown = (f", accuracy {row['acc_old']:.3f} on OLD, {row['acc_step0']:.3f} at step 0"
             + (f", {row['acc_final']:.3f} after {r.steps} steps" if "acc_final" in row else "")) if sets else ""
    print(f"{path}: {method} ({link.kind}){shown} -> {dest}")
    return row


def _tune(r, student, tokenizer, sets, work: Path, teacher, progress: bool) -> dict:
    train_set, eval_set, _ = sets
    begin = time.perf_counter()
    flops = train_flops_per_token(anatomy(load_config(r.to), "seq_cls"), r.max_len)
    trainer = {} if teacher is None else {"trainer_class": kd_trainer(teacher, r)}
    metrics = train(student, tokenizer, "seq_cls", train_set, eval_set, work, r, flops_per_token=flops,
                    progress=progress, **trainer)
    return {"acc_final": metrics["eval_accuracy"], "curve": curve(work), "tune_seconds": time.perf_counter() - begin}


def _fresh(r, move: Move, tokenizer, sets, dest: Path, progress: bool) -> dict:
    """The baseline: a fresh module of the source's kind on NEW, tuned plainly for the same steps."""
    student, _ = start("fresh", move)
    step0 = accuracy(student, tokenizer, sets[1])
    work = prepare_work(dest.with_name(dest.name + ".fresh"), {"fresh": str(move.source.path), "steps": r.steps}, True)
    try:
        result = _tune(r, student, tokenizer, sets, work, None, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"acc_step0": step0, **result}


def _teacher(model, tokenizers, max_len: int):
    """OLD+SOURCE as a teacher for NEW's batches: as it is when both read the same tokens, else a
    wrapper that decodes NEW's tokens to text and reads it with OLD's tokenizer."""
    old_tok, new_tok = tokenizers
    if same_tokenizer(old_tok, new_tok):
        return model
    from bequest.upgrade.teacher import Retokenized

    return Retokenized(model, new_tok, old_tok, max_len)
