"""`bequest demo` itself: the stages in order, each a few calls of the verbs' run functions."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from bequest.continual import LearnRecipe, learn
from bequest.demo.progress import Display, watched
from bequest.errors import BequestError
from bequest.finetune import FinetuneRecipe, finetune
from bequest.grow.command import GrowRecipe, grow_command
from bequest.inherit import InheritRecipe, inherit
from bequest.io import hold, let_go, make_dir
from bequest.lineage import scan
from bequest.lineage.draw import draw
from bequest.pretrain import PretrainRecipe, pretrain
from bequest.recipe import OutputFields
from bequest.recycle import ContinueRecipe, continue_pretrain
from bequest.report import write_report
from bequest.report.demo import G1, G1_NEXT, G2, G2_BORN, LEARN, LINEAGE, RECORD, SCRATCH, STAGES, UPGRADED, ZOO
from bequest.report.demo import facts, line
from bequest.upgrade import UpgradeRecipe, upgrade

STOP = "BEQUEST_DEMO_STOP_AFTER"  # a stage number: stop there as a Ctrl-C would (the resume test uses it)


class DemoRecipe(OutputFields):
    out: str = Field("bequest-demo", description="output folder (default: bequest-demo): every stage's models, "
                     "report.md and report.html; a rerun resumes there")
    quick: bool = Field(False, description="tiny models and few steps (about a minute): a first look, and the tests")


@dataclass(frozen=True)
class Size:
    """How big and how long every run is."""

    lm: dict  # language-model training settings shared by G1, G1', G2 and scratch
    vocab: int
    g1: dict
    g2: dict
    task: dict  # task data and tuning settings shared by the zoo, its upgrades and the stream
    pretrain: int  # optimizer steps of each run
    tune: int
    cont: int
    scratch: int  # longer than G1's pre-training, so that scratch ends below G1 and G2 has a loss to reach
    inherit: int  # G2's own training: shorter than scratch's, as growth + KI should need
    upgrade: int
    learn: int
    tasks: tuple = ("kind", "visibility", "domain")
    domains: tuple = ("text", "data")  # G1's pre-training domain, then G1''s
    zoo: tuple = (("kind", "lora"), ("visibility", "ia3"), ("arity", None))  # (task, PEFT kind or full)


QUICK = Size(lm=dict(seq_len=32, batch_size=8, eval_blocks=4, lr=3e-3, warmup=4, save_every=1000), vocab=500,
             g1=dict(layers=2, hidden=32, heads=2, ffn=128), g2=dict(layers=4, hidden=64, heads=4, ffn=256),
             task=dict(max_len=32, train_examples=128, eval_examples=48, batch_size=8, warmup=2, save_every=1000),
             pretrain=40, tune=10, cont=10, scratch=60, inherit=40, upgrade=4, learn=6, tasks=("kind", "visibility"))
FULL = Size(lm=dict(seq_len=64, batch_size=16, eval_blocks=16, lr=2e-3, warmup=10, save_every=100), vocab=2000,
            g1=dict(layers=2, hidden=64, heads=4, ffn=256), g2=dict(layers=4, hidden=96, heads=6, ffn=384),
            task=dict(max_len=64, train_examples=1000, eval_examples=200, batch_size=16, warmup=5, save_every=100),
            pretrain=200, tune=60, cont=100, scratch=300, inherit=200, upgrade=40, learn=40)


def demo(r: DemoRecipe) -> dict:
    """The story of a model family on the embedded data, every trained weight passed on, savings measured."""
    size = QUICK if r.quick else FULL
    out, record = _open(r)
    stream, stop = sys.stdout, int(os.environ.get(STOP, "0"))
    try:
        with watched(out / "demo.log") as steps:
            for k, stage in enumerate(STAGES, 1):
                head = f"[{k}/{len(STAGES)}] {stage}"
                if stage in record["stages"]:
                    done = record["stages"][stage]
                    stream.write(f"{head}: {done['line']} (done earlier, skipped)\n")
                    continue
                # Every Trainer ends with a full garbage collection (accelerate's free_memory), which walks
                # everything alive: the corpus, tokenizers, modules. What is alive between stages stays, so
                # it is frozen out of those walks (about a fifth of a quick demo's time).
                gc.collect()
                gc.freeze()
                steps.display = Display(stream, head, planned(stage, size))
                STAGE_RUNS[stage](Run(out, size, steps.display))
                found = facts(stage, out)
                said = line(stage, found)
                record["stages"][stage] = {"seconds": steps.display.finish(said), "line": said, "facts": found}
                _save(out / RECORD, record)
                if k == stop:
                    stream.write(f"stopped after stage {k} ({STOP}={stop}); run the same command again to resume\n")
                    raise KeyboardInterrupt
            page = write_report(out, r.out)
    finally:
        gc.unfreeze()
        let_go(out)
    stream.write(f"report: {page} (and {page.with_suffix('.md')})\n")
    return record


def _open(r: DemoRecipe) -> tuple[Path, dict]:
    """OUT and its record: new, or resumed when it holds a demo of the same settings."""
    out = Path(r.out)
    settings = {"quick": r.quick}
    if out.exists() and r.overwrite:
        shutil.rmtree(out)
    if (out / RECORD).is_file():
        record = json.loads((out / RECORD).read_text())
        if record.get("settings") != settings:
            raise BequestError(f"{out} holds a {'quick' if record.get('settings', {}).get('quick') else 'full'} "
                               "demo; pass --overwrite to start over, or choose another OUT")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BequestError(f"{out} exists and holds no demo; pass --overwrite to replace it or choose another OUT")
    else:
        record = {"settings": settings, "stages": {}}
    make_dir(out)
    hold(out)  # a second demo into the same OUT is refused while this one works
    _save(out / RECORD, record)
    return out, record


def _save(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------- the stages


@dataclass
class Run:
    out: Path
    size: Size
    display: Display

    def at(self, name: str) -> str:
        return str(self.out / name)

    def once(self, name: str, steps: int, call) -> None:
        """`call()` unless its output folder is there: outputs are written whole, so one that exists is done."""
        if (self.out / name).exists():
            self.display.advance(steps)
        else:
            call()

    def zoo(self) -> list[str]:
        return [self.at(f"{ZOO}/{_name(task, kind)}") for task, kind in self.size.zoo]

    def upgrade(self, new: str, folder: str) -> None:
        s = self.size
        upgrade(UpgradeRecipe(from_=self.at(G1), to=self.at(new), sources=self.zoo(), out=self.at(folder),
                              steps=s.upgrade, eval_every=max(1, s.upgrade // 4), compare_fresh=True, lr=3e-3,
                              **s.task), progress=False)


def _name(task: str, kind: str | None) -> str:
    return f"{task}-{kind or 'full'}"


def planned(stage: str, s: Size) -> int:
    """Optimizer steps a stage takes (the display's total)."""
    moved = 2 * len(s.zoo) * s.upgrade  # every source and its fresh baseline
    return {"pretrain": s.pretrain, "zoo": len(s.zoo) * s.tune, "continue": s.cont + moved,
            "grow": s.inherit + s.scratch, "upgrade": moved, "learn": len(LEARN) * len(s.tasks) * s.learn,
            "lineage": 0}[stage]


def _pretrain(run: Run) -> None:
    s = run.size
    run.once(G1, s.pretrain, lambda: pretrain(PretrainRecipe(
        out=run.at(G1), family="gpt2", vocab=s.vocab, domain=s.domains[0], steps=s.pretrain,
        eval_every=max(1, s.pretrain // 10), **s.g1, **s.lm)))


def _zoo(run: Run) -> None:
    s = run.size
    for (task, kind), folder in zip(s.zoo, run.zoo()):
        # A PEFT module has few weights to move: it wants a larger step than the whole model does.
        run.once(folder, s.tune, lambda: finetune(FinetuneRecipe(
            model=run.at(G1), out=folder, data=task, peft=kind, steps=s.tune, eval_every=s.tune,
            lr=1e-2 if kind else 1e-3, **s.task), progress=False))


def _continue(run: Run) -> None:
    s = run.size
    run.once(G1_NEXT, s.cont, lambda: continue_pretrain(ContinueRecipe(
        model=run.at(G1), out=run.at(G1_NEXT), domain=s.domains[1], steps=s.cont, eval_every=max(1, s.cont // 5),
        **s.lm)))
    run.upgrade(G1_NEXT, UPGRADED["continue"])


def _grow(run: Run) -> None:
    s = run.size
    # Exact width and identity depth keep G1's function: G2 starts where G1 ended.
    run.once(G2_BORN, 0, lambda: grow_command(GrowRecipe(src=run.at(G1), out=run.at(G2_BORN), **s.g2)))
    run.once(G2, s.inherit, lambda: inherit(InheritRecipe(
        out=run.at(G2), teacher=run.at(G1), student=run.at(G2_BORN), domain=s.domains[0], steps=s.inherit,
        eval_every=max(1, s.inherit // 10), **s.lm)))
    run.once(SCRATCH, s.scratch, lambda: pretrain(PretrainRecipe(
        out=run.at(SCRATCH), family="gpt2", vocab=s.vocab, domain=s.domains[0], steps=s.scratch,
        eval_every=max(1, s.scratch // 10), **s.g2, **s.lm)))


def _upgrade(run: Run) -> None:
    run.upgrade(G2, UPGRADED["upgrade"])


def _learn(run: Run) -> None:
    s = run.size
    for method, folder in LEARN.items():
        # MIGU over every weight (`scope all`) and 90% of rows masked: where it forgets least in full
        # fine-tuning (benchmarks/continual.py).
        run.once(folder, len(s.tasks) * s.learn, lambda: learn(LearnRecipe(
            model=run.at(G2), out=run.at(folder), tasks=",".join(s.tasks), method=method, threshold=0.9,
            scope="all", steps_per_task=s.learn, eval_every=s.learn, **s.task), progress=False))


def _lineage(run: Run) -> None:
    draw(scan([run.out]), run.out / LINEAGE)


STAGE_RUNS = {"pretrain": _pretrain, "zoo": _zoo, "continue": _continue, "grow": _grow, "upgrade": _upgrade,
              "learn": _learn, "lineage": _lineage}
