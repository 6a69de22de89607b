"""Lifelong pre-training through the packages corpus: ELLE vs naive, replay, re-warm + replay and growth only, at 3 budgets.

Five domains of the packages corpus (the installed packages' docstrings; pandas with numpy and networkx with
matplotlib, so that every domain holds over 1M training tokens) arrive in order and every method trains
through the stream with `bequest lifelong`. As in the paper, the stream starts from a pre-trained model: a
GPT-2 pre-trained on the first domain for `base_steps` (a one-domain stream, whose tokenizer every run then
shares; its cost is outside the budget), so later perplexity increases on earlier domains are forgetting, not
a model still learning its first words. The start size is 2x64; the final-size baselines get their own 6x64
base pre-trained for the same number of steps (more FLOPs than the small one: never in ELLE's favour).
  naive    fixed size (2x64, the start size), no replay, no prompts
  replay   fixed size, 10% of every batch from a memory of earlier domains
  rewarm   fixed size, the same replay, and the learning rate re-warmed from 10% of the peak and re-decayed to
           it at every domain (Ibrahim et al. 2024; the others restart a warm-up from 0 and a decay to 0)
  grow     2x64, exact growth (one more layer, identity block) before each new domain, nothing else
  elle     2x64, growth + function-recovering warm-up on memory + 10% replay + domain prompts
  naive@final, replay@final, rewarm@final   the fixed-size baselines at the size ELLE ends with (6x64)
Equal compute: a budget is the training FLOPs of `steps` steps of the start size on one domain (engine FLOP
accounting); every method gets it per domain (`budget_flops`), so a bigger or grown model gets fewer steps,
and ELLE's warm-up steps are paid from the same budget. Growth is in depth only: widening also multiplies
the cost of the embedding and LM head (on the stdlib corpus it left ELLE 13 steps on the last domain).
Scaling view: the same stream at 3 budgets; each method's final AP against the budget, and the gap between
ELLE and the best fixed-size baseline, show whether growth starts to pay as compute grows.
Reported: AP (mean perplexity over the domains seen so far) and AP+ (mean perplexity increase on earlier
domains) after every stage, per budget. Goal: ELLE has the lowest final AP and AP+ at the largest budget.

    python benchmarks/lifelong.py [--quick] [--workers 2 --threads 1]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("naive", "replay", "rewarm", "grow", "elle", "naive@final", "replay@final", "rewarm@final")
FIXED = ("naive", "replay", "rewarm")  # the methods that keep one size
# The quick mode only proves the script works: the small default corpus, two domains, two budgets, and one method
# of each kind (fixed at the start size, growing, fixed at the final size), so it costs what it did with one budget.
QUICK = dict(corpus="default", domains="text,data", layers=1, hidden=32, heads=2, vocab=500, seq_len=32,
             batch_size=8, eval_blocks=4, memory_size=8, warmup_steps=1, base_steps=3, budgets=(2, 3),
             methods=("naive", "elle", "rewarm@final"))
# Sized for about an hour with --workers 2 --threads 1 on 2 CPU cores (measured: 0.09 CPU-s per step of 2x64 plus
# ~12 s per run, so ~5,700 CPU-s in all): 8 methods x 3 budgets x 5 domains at 100, 300 and 900 steps of 2x64 per
# domain (0.1M, 0.3M and 0.9M tokens; the largest is most of one pass over the smallest domain's 1.2M training
# tokens), after two bases of 600 steps. A first run also builds the corpus (about a minute) and tokenizes it.
FULL = dict(corpus="packages", domains="transformers,torch,sympy,pandas+numpy,networkx+matplotlib", layers=2,
            hidden=64, heads=4, vocab=2000, seq_len=64, batch_size=16, eval_blocks=32, memory_size=128,
            warmup_steps=10, base_steps=600, budgets=(100, 300, 900), methods=METHODS)
# Evaluated once per stage, on every domain, by the verb itself; nothing to resume inside a temporary folder.
SHARED = dict(replay_fraction=0.1, grow_schedule="layers+1", lr=3e-3, warmup=5, lr_floor=0.1, eval_every=10**6,
              save_every=10**6)


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    c = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    from bequest.data.prepare import domain_texts

    for spec in c["domains"].split(","):  # the corpus is built here once, not by every worker at the same time
        domain_texts(spec, "train", corpus=c["corpus"])
    with tempfile.TemporaryDirectory(prefix="bequest-lifelong-") as work:
        start = {k: c[k] for k in ("layers", "hidden", "heads")}
        final = {**start, "layers": c["layers"] + len(c["domains"].split(",")) - 1}  # grown one layer per domain
        shapes = {"start": start, "final": final}
        bases = dict(zip(shapes, common.pool_map(pretrain_base, [(work, c, s) for s in shapes.values()], args.workers)))
        budgets = [budget_flops(bases["start"], c, steps) for steps in c["budgets"]]
        jobs = [dict(work=work, c=c, method=m, budget=b, steps=s, base=bases[m.partition("@")[2] or "start"])
                for s, b in sorted(zip(c["budgets"], budgets), reverse=True) for m in c["methods"]]
        done = common.pool_map(run_method, jobs, args.workers)  # every run is independent of the others
    runs = {(j["method"], j["steps"]): m for j, m in zip(jobs, done)}
    grown = runs[("elle", c["budgets"][0])]["stages"][-1]["shape"]
    assert (grown["layers"], grown["hidden"]) == (final["layers"], final["hidden"]), grown

    per_budget = [summary(runs, c["methods"], steps, flops) for steps, flops in zip(c["budgets"], budgets)]
    top = per_budget[-1]
    results = {
        "quick": args.quick,
        "config": {**c, **SHARED, "workers": args.workers},
        "corpus_versions": corpus_versions(c),
        "equalised": "every method gets, per domain, the training FLOPs of `budgets[i]` steps of the start size "
                     "(engine FLOP accounting, warm-up included); steps per stage follow from each stage's model size",
        "budgets": per_budget,
        "scaling": {m: [{"budget_flops": b["budget_flops"], "AP": b["table"][m]["AP"], "AP+": b["table"][m]["AP+"]}
                        for b in per_budget] for m in c["methods"]},
        "elle_minus_best_fixed_AP": [b["elle_minus_best_fixed_AP"] for b in per_budget],
        "goal": "ELLE has the lowest final AP and AP+ of all methods at the largest budget",
        "goal_met": top["elle_lowest_AP"] and top["elle_lowest_AP+"],
        "seconds": time.perf_counter() - t0,
    }
    path = common.write("lifelong", args.out_dir, results, figure(per_budget, runs, c))
    print(f"wrote {path} ({results['seconds']:.0f} s)")
    for b in per_budget:
        print(f"budget {b['steps']} steps of the start size per domain ({b['budget_flops']:.3g} FLOPs)")
        print(f"  {'method':13} {'AP':>9} {'AP+':>9} {'FLOPs':>10}  steps per domain")
        for m, row in b["table"].items():
            print(f"  {m:13} {row['AP']:9.2f} {row['AP+']:9.2f} {row['flops']:10.3g}  {row['steps']}")


def pretrain_base(job: tuple) -> str:
    """A model pre-trained on the first domain (with its prompt token, so ELLE can start from it)."""
    from bequest.lifelong import LifelongRecipe, lifelong

    work, c, shape = job
    out = Path(work) / f"base-{shape['layers']}x{shape['hidden']}"
    first = c["domains"].split(",")[0]
    lifelong(LifelongRecipe(out=str(out), method="elle", **{**recipe(c), **shape, "domains": first,
                                                            "steps": c["base_steps"]}))
    return str(next(out.glob("stage0-*")))


def budget_flops(base: str, c: dict, steps: int) -> float:
    """The training FLOPs of `steps` steps of the start size on one domain (what naive spends there)."""
    from bequest.anatomy import anatomy
    from bequest.engine import train_flops_per_token
    from bequest.io import load_model

    model, _ = load_model(base)
    return float(steps * c["batch_size"] * c["seq_len"] * train_flops_per_token(anatomy(model), c["seq_len"]))


def run_method(job: dict) -> dict:
    """One method through the stream at one budget: `bequest lifelong`'s metrics."""
    import gc

    from bequest.lifelong import LifelongRecipe, lifelong

    gc.freeze()  # the Trainer collects garbage at every stage; this spares it torch's and transformers' objects

    c, method = job["c"], job["method"].partition("@")[0]
    out = Path(job["work"]) / f"{job['method'].replace('@', '-')}-{job['steps']}"
    r = LifelongRecipe(out=str(out), method=method, base=job["base"], budget_flops=job["budget"], **recipe(c))
    t = time.perf_counter()
    m = lifelong(r)
    print(f"{job['method']:13} budget {job['steps']:4d}: AP {m['AP']:8.2f}  AP+ {m['AP+']:8.2f}  "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return m


def recipe(c: dict) -> dict:
    """The LifelongRecipe settings of a config."""
    keys = ("corpus", "domains", "layers", "hidden", "heads", "vocab", "seq_len", "batch_size", "eval_blocks",
            "memory_size", "warmup_steps")
    return {**{k: c[k] for k in keys}, **SHARED}


def corpus_versions(c: dict) -> dict | None:
    from bequest.lifelong import LifelongRecipe

    return LifelongRecipe(out="-", **recipe(c)).model_dump().get("corpus_versions")


def summary(runs: dict, methods: tuple, steps: int, flops: float) -> dict:
    """One budget's table, per-stage AP and AP+, and how ELLE compares with every other method."""
    table = {m: {"AP": runs[m, steps]["AP"], "AP+": runs[m, steps]["AP+"], "flops": runs[m, steps]["flops"],
                 "steps": [s["steps"] for s in runs[m, steps]["stages"]],
                 "recover_steps": [s["recover_steps"] for s in runs[m, steps]["stages"]],
                 "final_shape": runs[m, steps]["stages"][-1]["shape"]} for m in methods}
    elle, others = table["elle"], [m for m in methods if m != "elle"]
    best_fixed = min((m for m in methods if m.partition("@")[0] in FIXED), key=lambda m: table[m]["AP"])
    return {
        "steps": steps, "budget_flops": flops, "table": table,
        "per_stage": {m: [{k: s[k] for k in ("domain", "AP", "AP+", "ppl", "flops")} for s in runs[m, steps]["stages"]]
                      for m in methods},
        "elle_beats": {m: {"AP": elle["AP"] < table[m]["AP"], "AP+": elle["AP+"] < table[m]["AP+"]} for m in others},
        "elle_lowest_AP": all(elle["AP"] < table[m]["AP"] for m in others),
        "elle_lowest_AP+": all(elle["AP+"] < table[m]["AP+"] for m in others),
        "best_fixed": best_fixed,
        "elle_minus_best_fixed_AP": elle["AP"] - table[best_fixed]["AP"],
    }


def figure(per_budget: list[dict], runs: dict, c: dict):
    """AP and AP+ after every stage at the largest budget; final AP, and ELLE's gap to the best fixed-size
    baseline, against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = per_budget[-1]
    names = [s["domain"] for s in top["per_stage"]["elle"]]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for i, m in enumerate(c["methods"]):
        style = dict(label=m, color=f"C{i}", ls="--" if "@" in m else "-", marker="o")
        stages = top["per_stage"][m]
        ax[0, 0].plot(range(len(stages)), [s["AP"] for s in stages], **style)
        ax[0, 1].plot(range(1, len(stages)), [s["AP+"] for s in stages[1:]], **style)
        ax[1, 0].plot([b["budget_flops"] for b in per_budget], [b["table"][m]["AP"] for b in per_budget], **style)
    for a in ax[0]:
        a.set_xticks(range(len(names)), [f"after {n}" for n in names], rotation=20)
    ax[0, 0].set(title=f"AP after every stage (budget {top['steps']} steps)", ylabel="mean perplexity, seen domains")
    ax[0, 1].set(title="AP+ after every stage (forgetting)", ylabel="mean perplexity increase, earlier domains")
    ax[1, 0].set(title="final AP against the budget", xlabel="training FLOPs per domain", ylabel="final AP",
                 xscale="log")
    gaps = [b["elle_minus_best_fixed_AP"] for b in per_budget]
    ax[1, 1].plot([b["budget_flops"] for b in per_budget], gaps, "o-", color="C4")
    for b, g in zip(per_budget, gaps):
        ax[1, 1].annotate(b["best_fixed"], (b["budget_flops"], g), textcoords="offset points", xytext=(4, 4))
    ax[1, 1].axhline(0, color="grey", lw=0.8)
    ax[1, 1].set(title="ELLE's final AP minus the best fixed-size method's", xlabel="training FLOPs per domain",
                 ylabel="AP difference (below 0: ELLE ahead)", xscale="log")
    ax[0, 0].legend(fontsize=8)
    fig.suptitle(f"lifelong pre-training through {c['corpus']} corpus domains, equal FLOPs per domain")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
