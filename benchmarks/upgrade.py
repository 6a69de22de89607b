"""Upgrading a zoo of task weights onto a successor: continued, grown and independently trained.

On the embedded corpus a small GPT-2 ancestor (OLD) is pre-trained on one domain and tuned on three tasks
into a zoo of LoRA, IA3, prompt-tuning, bottleneck and full fine-tunes. Four successors: continued (OLD
trained further on another domain), grown (`bequest grow` to twice the width and depth, then trained on
that domain), independent (twice the width and depth, pre-trained from scratch on the same corpus and
tokenizer) and reseeded (OLD's shape, pre-trained from scratch with another seed). On each, `bequest
upgrade` moves the whole zoo: its automatic path (reuse / port / transfer, then tuning with OLD+SOURCE as
the teacher) beside fresh tuning on NEW for the same steps (the baseline), and on the unrelated edges
distillation alone (a fresh module taught by OLD+SOURCE) and forced reuse where shapes allow. Each
source's curve is its mean over the seeds (data order, fresh init).

Goals (issue #20): continued and grown edges: the upgraded sources reach fresh's best accuracy in <= 0.3x
fresh's steps for >= 80% of the sources and end at or above fresh's final accuracy on average;
independent edge: step-0 accuracy of transferred sources >= 10 points above a fresh module's step 0,
and fresh's best reached in <= 0.5x its steps for >= 60% of sources; the whole zoo's upgrade costs less
wall time than retraining it fresh to the same accuracy.

    python benchmarks/upgrade.py [--quick] [--workers 2 --threads 1]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# The zoo: up to 9 sources over 3 tasks, every kind `bequest upgrade` carries.
ZOO = [("domain", "lora"), ("domain", "ia3"), ("domain", "full"), ("kind", "lora"), ("kind", "prompt"),
       ("kind", "bottleneck"), ("arity", "lora"), ("arity", "bottleneck"), ("arity", "full")]
QUICK = dict(vocab=1000, seq_len=32, old=dict(layers=1, hidden=32, heads=2), big=dict(layers=2, hidden=64, heads=4),
             pretrain_steps=2, continue_steps=2, tune_steps=2, steps=2, eval_every=1, max_len=24, train_examples=16,
             eval_examples=8, batch=4, seeds=(0,), virtual_tokens=4, zoo=[ZOO[3], ZOO[2], ZOO[7]])
# 5 models, 8 tunings and 14 zoo upgrades (about 100 short tuning runs) of a 2x48 / 4x96 GPT-2: about 40
# minutes with --workers 2 --threads 1 on a busy 2-core machine.
FULL = dict(vocab=4000, seq_len=64, old=dict(layers=2, hidden=48, heads=2), big=dict(layers=4, hidden=96, heads=4),
            pretrain_steps=300, continue_steps=100, tune_steps=100, steps=30, eval_every=5, max_len=32,
            train_examples=2000, eval_examples=64, batch=16, seeds=(0, 1), virtual_tokens=8, zoo=ZOO[:6] + ZOO[7:])
LR = {"full": 1e-3, "lora": 5e-3, "ia3": 2e-2, "prompt": 2e-2, "bottleneck": 5e-3}
OLD_DOMAIN, NEW_DOMAIN = "text", "data"
# Per edge, the methods beside the automatic path (whose run also tunes the fresh baseline). Reuse where
# shapes allow is PortLLM's training-free patch: step 0 only (on the continued edge, auto's step 0).
EDGES = {"continued": (), "grown": (), "independent": ("distill",), "reseeded": ("distill", "reuse")}
UNTRAINED = {"reuse"}
COLORS = {"auto": "#d62728", "fresh": "#555", "distill": "#1f77b4", "reuse": "#8c564b"}


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="bequest-upgrade-") as work:
        results = measure(args, Path(work), QUICK if args.quick else FULL)
    common.write("upgrade", args.out_dir, {"quick": args.quick, **results}, figure(plt, results))


def measure(args, work: Path, c: dict) -> dict:
    t0 = time.perf_counter()
    models = family(work, c)
    zoo = tune_zoo(work, c, models["old"])
    print(f"family and zoo ready in {time.perf_counter() - t0:.0f} s")
    jobs = [dict(edge=edge, method=method, seed=seed, old=str(models["old"]), new=str(models[edge]),
                 sources=[s["path"] for s in zoo], work=str(work), c=c)
            for edge, extra in EDGES.items() for method in ("auto", *extra) for seed in c["seeds"]]
    done = common.pool_map(upgrade_run, jobs, args.workers)  # every run is independent of the others
    return {"config": {k: v for k, v in c.items()}, "zoo": zoo, **score(done, zoo, c),
            "seconds": time.perf_counter() - t0}


def family(work: Path, c: dict) -> dict:
    """OLD and its four successors; every one reads OLD's tokenizer (pre-training trains the same one)."""
    from bequest.grow.command import GrowRecipe, grow_command
    from bequest.pretrain import PretrainRecipe, pretrain
    from bequest.recycle import ContinueRecipe, continue_pretrain

    lm = dict(seq_len=c["seq_len"], batch_size=c["batch"], eval_blocks=16, eval_every=max(c["pretrain_steps"] // 4, 1),
              save_every=10**6, lr=2e-3, warmup=max(1, c["pretrain_steps"] // 20))
    m = {k: work / k for k in ("old", "continued", "grown", "independent", "reseeded")}
    pretrain(PretrainRecipe(out=str(m["old"]), family="gpt2", vocab=c["vocab"], steps=c["pretrain_steps"],
                            domain=OLD_DOMAIN, **c["old"], **lm))
    pretrain(PretrainRecipe(out=str(m["independent"]), family="gpt2", vocab=c["vocab"], steps=c["pretrain_steps"],
                            domain=OLD_DOMAIN, seed=1, **c["big"], **lm))
    pretrain(PretrainRecipe(out=str(m["reseeded"]), family="gpt2", vocab=c["vocab"], steps=c["pretrain_steps"],
                            domain=OLD_DOMAIN, seed=2, **c["old"], **lm))
    further = {**lm, "steps": c["continue_steps"], "warmup": max(1, c["continue_steps"] // 10), "lr": lm["lr"] / 2}
    continue_pretrain(ContinueRecipe(model=str(m["old"]), out=str(m["continued"]), domain=NEW_DOMAIN, **further))
    grow_command(GrowRecipe(src=str(m["old"]), out=str(work / "grown-at-birth"), noise=1e-3, **c["big"]))
    continue_pretrain(ContinueRecipe(model=str(work / "grown-at-birth"), out=str(m["grown"]), domain=NEW_DOMAIN,
                                     **further))
    return m


def tune_zoo(work: Path, c: dict, old: Path) -> list[dict]:
    from bequest.finetune import FinetuneRecipe, finetune

    zoo = []
    for task, kind in c["zoo"]:
        path = work / "zoo" / f"{task}-{kind}"
        m = finetune(FinetuneRecipe(model=str(old), out=str(path), data=task, steps=c["tune_steps"], lr=LR[kind],
                                    peft=None if kind == "full" else kind, virtual_tokens=c["virtual_tokens"],
                                    **_task(c, c["tune_steps"], 0)), progress=False)
        zoo.append({"path": str(path), "task": task, "kind": kind, "accuracy_on_old": m["eval_accuracy"]})
    return zoo


def _task(c: dict, steps: int, seed: int) -> dict:
    return dict(max_len=c["max_len"], train_examples=c["train_examples"], eval_examples=c["eval_examples"],
                batch_size=c["batch"], eval_every=c["eval_every"], save_every=10**6, warmup=max(1, steps // 10),
                seed=seed)


def upgrade_run(job: dict) -> dict:
    """One `bequest upgrade` of the whole zoo onto one successor, by one method, at one seed."""
    from bequest.upgrade import UpgradeRecipe, upgrade

    c = job["c"]
    out = Path(job["work"]) / f"up-{job['edge']}-{job['method']}-{job['seed']}"
    steps = 0 if job["method"] in UNTRAINED else c["steps"]
    r = UpgradeRecipe(from_=job["old"], to=job["new"], sources=job["sources"], out=str(out), method=job["method"],
                      steps=steps, lr=2e-3, compare_fresh=job["method"] == "auto", **_task(c, c["steps"], job["seed"]))
    rows = upgrade(r, progress=False)
    return {**{k: job[k] for k in ("edge", "method", "seed")}, "rows": rows}


# ---------------------------------------------------------------- scoring


def reach(curve: list, target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target - 1e-9), None)


def mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    return [(step, sum(c[i][1] for c in curves) / len(curves)) for i, (step, _) in enumerate(curves[0])]


def score(done: list[dict], zoo: list[dict], c: dict) -> dict:
    """Per edge and method, per source (mean over seeds): step 0, final, steps to fresh's best; the goals."""
    edges, curves = {}, {}
    for edge, extra in EDGES.items():
        runs = {m: [d for d in done if d["edge"] == edge and d["method"] == m] for m in ("auto", *extra)}
        per_source, edge_curves = [], {}
        for k, source in enumerate(zoo):
            mine = {m: mean_curve([d["rows"][k].get("curve") or [(0, d["rows"][k]["acc_step0"])] for d in ds])
                    for m, ds in runs.items()}
            mine["fresh"] = mean_curve([d["rows"][k]["fresh"]["curve"] for d in runs["auto"]])
            edge_curves[source["path"]] = mine
            target = max(a for _, a in mine["fresh"])
            fresh_steps = reach(mine["fresh"], target)
            row = {"source": Path(source["path"]).name, "path": runs["auto"][0]["rows"][k]["path"],
                   "fresh_best": target, "fresh_steps_to_best": fresh_steps,
                   "seconds": {m: sum(d["rows"][k]["seconds"] for d in ds) / len(ds) for m, ds in runs.items()},
                   "fresh_seconds": sum(d["rows"][k]["fresh"]["tune_seconds"] for d in runs["auto"]) / len(runs["auto"])}
            for m, curve in mine.items():
                hit = reach(curve, target)
                row[m] = {"step0": curve[0][1], "final": curve[-1][1], "best": max(a for _, a in curve),
                          "steps_to_fresh_best": hit,
                          # fresh's best at step 0 (it never learned): any start that good costs no steps
                          "fraction_of_fresh_steps": None if hit is None else hit / fresh_steps if fresh_steps else 0.0}
            per_source.append(row)
        edges[edge] = {"sources": per_source, "summary": summarize(per_source, ("auto", *extra, "fresh"), c)}
        curves[edge] = {m: mean_curve([cv[m] for cv in edge_curves.values()]) for m in ("auto", *extra, "fresh")}
    return {"edges": edges, "mean_curves": curves, "goals": goals(edges)}


def summarize(rows: list[dict], methods: tuple, c: dict) -> dict:
    out = {}
    for m in methods:
        fractions = [r[m]["fraction_of_fresh_steps"] for r in rows]
        out[m] = {"mean_step0": _mean(r[m]["step0"] for r in rows), "mean_final": _mean(r[m]["final"] for r in rows),
                  "reached_fresh_best": sum(f is not None for f in fractions),
                  "share_within_0.3x": _mean(f is not None and f <= 0.3 for f in fractions),
                  "share_within_0.5x": _mean(f is not None and f <= 0.5 for f in fractions)}
    # Wall time to fresh's best: the upgrade's (move + tuning up to where it reached it) against fresh's own.
    up = sum(r["seconds"]["auto"] * (r["auto"]["steps_to_fresh_best"] if r["auto"]["steps_to_fresh_best"] is not None
                                     else c["steps"]) / c["steps"] for r in rows)
    fresh = sum(r["fresh_seconds"] * (r["fresh_steps_to_best"] or 0) / c["steps"] for r in rows)
    out["zoo_seconds_to_fresh_best"] = {"upgrade": up, "fresh": fresh, "ratio": up / fresh if fresh else None}
    return out


def goals(edges: dict) -> dict:
    g = {}
    for edge in ("continued", "grown"):
        s = edges[edge]["summary"]
        g[f"{edge}: >=80% of sources reach fresh's best within 0.3x its steps"] = s["auto"]["share_within_0.3x"] >= 0.8
        g[f"{edge}: final at or above fresh's on average"] = s["auto"]["mean_final"] >= s["fresh"]["mean_final"]
    s = edges["independent"]["summary"]
    g["independent: step 0 >= fresh's step 0 + 10 points"] = s["auto"]["mean_step0"] >= s["fresh"]["mean_step0"] + 0.10
    g["independent: >=60% of sources reach fresh's best within 0.5x its steps"] = s["auto"]["share_within_0.5x"] >= 0.6
    ratios = [edges[e]["summary"]["zoo_seconds_to_fresh_best"]["ratio"] for e in edges]
    g["every edge: zoo upgrade takes less wall time than fresh to fresh's best"] = all(r is not None and r < 1 for r in ratios)
    return g


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def figure(plt, results: dict):
    edges = results["mean_curves"]
    fig, axes = plt.subplots(1, len(edges), figsize=(4.2 * len(edges), 3.4), squeeze=False)
    for ax, (edge, curves) in zip(axes[0], edges.items()):
        for m, curve in curves.items():
            label = {"auto": results["edges"][edge]["sources"][0]["path"] + " + tuning"}.get(m, m)
            ax.plot(*zip(*curve), marker=".", lw=1.2, color=COLORS[m], label=label)
        ax.set_title(edge, fontsize=10)
        ax.set_xlabel("tuning steps on NEW")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (mean over the zoo)")
    fig.suptitle(f"bequest upgrade: a {len(results['zoo'])}-source zoo onto four successors; mean over sources and "
                 f"{len(results['config']['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
