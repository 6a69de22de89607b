"""Recyclable tuning: steps to reach fresh tuning's best accuracy after a base-model upgrade.

On the embedded corpus a small GPT-2 (M_i) is pre-trained on one domain and tuned on three tasks, in full
and as LoRA modules; M_i is then continually pre-trained on another domain into M_{i+1}. On M_{i+1}
(re-warmed to half the original peak learning rate; the report gives how far that moved the weights and the new
domain's loss), with the same steps, schedule and data order per task and seed (3 seeds: data order, fresh
head): fresh tuning, direct reuse of the old weights (no training: the init run's step-0 evaluation),
initialisation-based recycling (old task delta / old module as the start), distillation-based (old tuned
model as teacher) and combined, the last two at each KL weight alpha in ALPHAS (read at the better one,
chosen on these same runs).
Each method's curve is its mean over the seeds. Score: the first evaluated step at which that curve reaches
fresh's best accuracy, over the steps fresh took to get there; equal scores are ranked by the mean accuracy
over the whole curve. Anchor (Qin et al. 2023): both recycling kinds speed convergence up, combined most.
Goal: recycled <= 0.5x fresh's steps, combined best.

    python benchmarks/recycling.py [--quick] [--workers 2 --threads 1]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ALPHAS = (0.2, 0.5)  # weight of the KL term: swept, since it trades the teacher against the labels
TRAINED = ("fresh", "init", *(f"{m}@{a}" for a in ALPHAS for m in ("distill", "combined")))
CONDITIONS = ("fresh", "reuse", *TRAINED[1:])
COLORS = {"fresh": "#555", "reuse": "#8c564b", "init": "#2ca02c", f"distill@{ALPHAS[0]}": "#9ecae1",
          f"distill@{ALPHAS[1]}": "#1f77b4", f"combined@{ALPHAS[0]}": "#fc9272", f"combined@{ALPHAS[1]}": "#d62728"}

QUICK = dict(vocab=1000, seq_len=32, base=dict(layers=1, hidden=32, heads=2), pretrain_steps=6, continue_steps=4,
             tasks=["kind"], tune_steps=4, steps=4, eval_every=2, max_len=32, train_examples=64, eval_examples=16,
             batch=8, seeds=(0,))
# 2 bases, 6 source tunings and 108 recycling runs of a 2x64 GPT-2: about 15 minutes with --workers 2.
FULL = dict(vocab=4000, seq_len=64, base=dict(layers=2, hidden=64, heads=2), pretrain_steps=400, continue_steps=200,
            tasks=["domain", "kind", "arity"], tune_steps=300, steps=150, eval_every=10, max_len=64,
            train_examples=None, eval_examples=200, batch=16, seeds=(0, 1, 2))
OLD_DOMAIN, NEW_DOMAIN = "text", "data"
LR = {"full": 1e-3, "lora": 5e-3}
KD = dict(beta=0.1, tau=2.0)


def verdict(summary: dict) -> tuple[dict, dict]:
    """(alpha used per KD method, goals). Methods rank by fewer steps to fresh's best, then by the higher
    mean accuracy over the whole curve (init and combined start from the same weights, so when that start
    already reaches fresh's best the step count cannot tell them apart), then by best accuracy. Values are
    means of a few hundred 0/1 scores, so values within 1e-6 are the same value: a tie."""

    def rank(m):
        s = summary[m]
        return tuple(round(v, 6) for v in (-s["mean_fraction_of_fresh_steps"], s["mean_curve_accuracy"],
                                           s["mean_best_accuracy"]))

    # alpha is read at its better swept value per method, chosen on these same runs.
    alpha = {m: max(ALPHAS, key=lambda a: rank(f"{m}@{a}")) for m in ("distill", "combined")}
    recycled = ("init", *(f"{m}@{a}" for m, a in alpha.items()))
    top = max(rank(m) for m in recycled)
    fastest = [m for m in recycled if rank(m) == top]
    return alpha, {
        "recycled_at_most_half_fresh_steps": {m: summary[m]["mean_fraction_of_fresh_steps"] <= 0.5 for m in recycled},
        "fastest_recycled": fastest,  # more than one: tied
        "combined_best": fastest == [f"combined@{alpha['combined']}"],
        "combined_at_least_tied_best": f"combined@{alpha['combined']}" in fastest,
    }


def weight_change(a: Path, b: Path) -> float:
    """||theta_b - theta_a|| / ||theta_a|| over every shared tensor: how far the upgrade moved the weights."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = sum(float((tb[k].float() - ta[k].float()).pow(2).sum()) for k in ta if k in tb)
    return (diff / sum(float(t.float().pow(2).sum()) for t in ta.values())) ** 0.5 if ta else float("nan")


def reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy reaches `target` (None: never)."""
    return next((step for step, acc in points if acc >= target - 1e-9), None)


def mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    """Pointwise mean of curves evaluated at the same steps."""
    return [(step, sum(c[i][1] for c in curves) / len(curves)) for i, (step, _) in enumerate(curves[0])]


def recycle_run(job: dict) -> dict:
    """One recycling run (any method, fresh included) of one setting and seed: its accuracy curve."""
    from bequest.recycle import RecycleRecipe, recycle

    method, _, alpha = job["run"].partition("@")
    name, weights = job["setting"].split("/")
    out = Path(job["work"]) / f"{job['setting'].replace('/', '-')}-{job['run']}-{job['seed']}"
    m = recycle(RecycleRecipe(out=str(out), old_base=job["old"], new_base=job["new"], task_weights=job["source"],
                              data=name, method=method, steps=job["steps"], lr=LR[weights],
                              alpha=float(alpha or 0.0), **KD, **job["task"]), progress=False)
    return {**job, "curve": [(int(s), float(a)) for s, a in m["curve"]]}


def figure(plt, c: dict, curves: dict, results: dict):
    """Accuracy against steps per setting, every method's mean curve."""
    tasks = c["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False, sharex=True)
    for j, name in enumerate(tasks):
        for i, weights in enumerate(("full", "lora")):
            ax, runs = axes[i][j], curves[f"{name}/{weights}"]
            for method in TRAINED:
                ax.plot(*zip(*runs[method]), label=method, color=COLORS[method], marker=".", lw=1)
            ax.axhline(runs["reuse"][0][1], color=COLORS["reuse"], ls="--", lw=1, label="reuse (no training)")
            ax.axhline(results[f"{name}/{weights}"]["fresh_best_accuracy"], color="k", ls=":", lw=0.8)
            ax.set_title(f"{name}, {'full fine-tune' if weights == 'full' else 'LoRA'}", fontsize=10)
            ax.set_ylabel("validation accuracy" if j == 0 else None)
            ax.set_xlabel("steps on M_{i+1}" if i == 1 else None)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"recycling gpt2 {c['base']['layers']}x{c['base']['hidden']} tunings across an upgrade "
                 f"({OLD_DOMAIN} -> +{NEW_DOMAIN}); mean of {len(c['seeds'])} seeds; dotted: fresh's best", fontsize=10)
    return fig


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="bequest-recycling-") as work:
        measure(args, Path(work), QUICK if args.quick else FULL, plt)


def measure(args, work: Path, c: dict, plt) -> None:
    from bequest.finetune import FinetuneRecipe, finetune
    from bequest.pretrain import PretrainRecipe, pretrain
    from bequest.recycle import ContinueRecipe, continue_pretrain

    t0 = time.perf_counter()
    lm = dict(seq_len=c["seq_len"], batch_size=c["batch"], eval_blocks=16, eval_every=max(c["pretrain_steps"] // 4, 1),
              save_every=10**6, lr=2e-3, warmup=max(1, c["pretrain_steps"] // 20), seed=0)
    old, new = work / "old", work / "new"
    pretrain(PretrainRecipe(out=str(old), family="gpt2", vocab=c["vocab"], steps=c["pretrain_steps"],
                            domain=OLD_DOMAIN, **c["base"], **lm))
    # The upgrade: the usual re-warm-up (10% of its steps) to half the original peak learning rate.
    continue_pretrain(ContinueRecipe(model=str(old), out=str(new), steps=c["continue_steps"], domain=NEW_DOMAIN,
                                     **{**lm, "warmup": max(1, c["continue_steps"] // 10), "lr": lm["lr"] / 2}))
    losses = [row["eval_loss"] for row in map(json.loads, (new / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in row]
    upgrade = {"new_domain_eval_loss": {"old_base": losses[0], "new_base": losses[-1]},
               "relative_weight_change": weight_change(old, new)}
    task = dict(max_len=c["max_len"], train_examples=c["train_examples"], eval_examples=c["eval_examples"],
                batch_size=c["batch"], eval_every=c["eval_every"], save_every=10**6, warmup=max(1, c["steps"] // 10),
                seed=0)

    sources = {}
    for name in c["tasks"]:
        for weights in ("full", "lora"):
            source = work / f"{name}-{weights}"
            tuned = finetune(FinetuneRecipe(model=str(old), out=str(source), data=name, steps=c["tune_steps"],
                                            lr=LR[weights], peft="lora" if weights == "lora" else None,
                                            **{**task, "warmup": max(1, c["tune_steps"] // 10)}), progress=False)
            sources[f"{name}/{weights}"] = (str(source), tuned["eval_accuracy"])
    jobs = [dict(setting=setting, source=source, run=run, seed=seed, steps=c["steps"], old=str(old), new=str(new),
                 work=str(work), task={**task, "seed": seed})
            for setting, (source, _) in sources.items() for seed in c["seeds"] for run in TRAINED]
    done = common.pool_map(recycle_run, jobs, args.workers)  # every run is independent of the others

    results, curves = {}, {}
    for setting, (_, old_accuracy) in sources.items():
        # Each method's curve is its mean over the seeds (data order, fresh head): one eval is noisy.
        runs = {run: mean_curve([d["curve"] for d in done if d["setting"] == setting and d["run"] == run])
                for run in TRAINED}
        runs["reuse"] = [(0, runs["init"][0][1])]
        curves[setting] = runs
        target = max(a for _, a in runs["fresh"])
        fresh_steps = reach(runs["fresh"], target)
        row = {"old_tuned_accuracy": old_accuracy, "fresh_best_accuracy": target, "fresh_steps_to_best": fresh_steps}
        for method in CONDITIONS:
            hit = reach(runs[method], target)
            row[method] = {"start_accuracy": runs[method][0][1], "best_accuracy": max(a for _, a in runs[method]),
                           "final_accuracy": runs[method][-1][1],
                           "curve_mean_accuracy": sum(a for _, a in runs[method]) / len(runs[method]),
                           "steps_to_fresh_best": hit,
                           "fraction_of_fresh_steps": None if hit is None or not fresh_steps else hit / fresh_steps}
        results[setting] = row
        print(f"{setting}: fresh best {target:.3f} at step {fresh_steps}; "
              + ", ".join(f"{k} {row[k]['steps_to_fresh_best']}" for k in CONDITIONS[1:]))

    summary = {}
    for method in CONDITIONS:
        fractions = [r[method]["fraction_of_fresh_steps"] for r in results.values()]
        reached = [f for f in fractions if f is not None]
        summary[method] = {
            "reached_fresh_best": f"{len(reached)}/{len(fractions)}",
            # A run that never reached the target counts as 1.0 (no saving) in the mean: never flattering.
            "mean_fraction_of_fresh_steps": sum(f if f is not None else 1.0 for f in fractions) / len(fractions),
            "mean_best_accuracy": sum(r[method]["best_accuracy"] for r in results.values()) / len(results),
            "mean_final_accuracy": sum(r[method]["final_accuracy"] for r in results.values()) / len(results),
            "mean_curve_accuracy": sum(r[method]["curve_mean_accuracy"] for r in results.values()) / len(results),
        }
    alpha, goals = verdict(summary)

    fig = figure(plt, c, curves, results)
    common.write("recycling", args.out_dir, {
        "quick": args.quick,
        "setup": {"family": "gpt2", **c, "old_domain": OLD_DOMAIN, "new_domain": NEW_DOMAIN, "lr": LR, "kd": KD,
                  "reuse": "the init run's step-0 evaluation (old weights on the new base, no training)"},
        "settings": results,
        "summary": summary,
        "curves": {k: {m: v for m, v in runs.items()} for k, runs in curves.items()},
        "anchor": "Qin et al. 2023: init and distill both converge faster than fresh tuning, combined fastest",
        "upgrade": upgrade,
        "alpha_used": alpha,
        "goals": goals,
        "wall_s": time.perf_counter() - t0,
    }, fig)
    for method, s in summary.items():
        print(f"{method:12} reached {s['reached_fresh_best']}, "
              f"mean steps {s['mean_fraction_of_fresh_steps']:.2f}x fresh, best acc {s['mean_best_accuracy']:.3f}")


if __name__ == "__main__":
    main()
