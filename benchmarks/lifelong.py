"""Lifelong pre-training through the embedded corpus's domains: ELLE vs naive vs replay only vs growth only.

The five embedded domains (text, data, system, network, language) arrive in order and every method
trains through the stream with `bequest lifelong`. As in the paper, the stream starts from a pre-trained
model: a GPT-2 pre-trained on the first domain for `base_steps` (a one-domain stream; its cost is outside
the budget), so later perplexity increases on earlier domains are forgetting, not a model still learning
its first words. The start size is 2x64; the final-size baselines get their own 6x64 base pre-trained
for the same number of steps (more FLOPs than the small one: never in ELLE's favour).
  naive    fixed size (2x64, the start size), no replay, no prompts
  replay   fixed size (2x64), 10% of every batch from a memory of earlier domains
  grow     2x64, exact growth (one more layer, identity block) before each new domain, nothing else
  elle     2x64, growth + function-recovering warm-up on memory + 10% replay + domain prompts
  naive@final, replay@final   the fixed-size baselines at the size ELLE ends with (6x64)
Equal compute: naive runs first with a fixed number of steps per domain; the training FLOPs it spends on
one domain (engine FLOP accounting) become every other method's per-domain budget (`budget_flops`), so
a bigger or grown model gets fewer steps, and ELLE's warm-up steps are paid from the same budget.
Growth is in depth only: widening too (hidden+16 per stage, to 6x128) also multiplies the cost of the
embedding and LM head, and at this budget left ELLE 13 steps on the last domain (final AP 164 against
125 with depth only, measured with this script).
Reported: AP (mean perplexity over the domains seen so far) and AP+ (mean perplexity increase on earlier
domains) after every stage, and the FLOPs each method spent. Goal: ELLE has the lowest final AP and AP+.

    python benchmarks/lifelong.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("naive", "replay", "grow", "elle", "naive@final", "replay@final")
QUICK = dict(domains="text,data", layers=1, hidden=32, heads=2, vocab=500, seq_len=32, batch_size=8, eval_blocks=4,
             memory_size=8, warmup_steps=1, steps=3, eval_every=3, base_steps=3)
# Sized for ~15 minutes on 2 CPU cores: 6 runs x 5 domains, each run the FLOPs of 150 steps of 2x64 per domain.
FULL = dict(domains="text,data,system,network,language", layers=2, hidden=64, heads=4, vocab=2000, seq_len=64,
            batch_size=16, eval_blocks=32, memory_size=128, warmup_steps=10, steps=150, eval_every=75, base_steps=600)
SHARED = dict(replay_fraction=0.1, grow_schedule="layers+1", lr=3e-3, warmup=5, save_every=10**6)


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bequest.lifelong import LifelongRecipe, lifelong

    c = QUICK if args.quick else FULL
    lc = {k: v for k, v in c.items() if k != "base_steps"}  # the LifelongRecipe fields
    runs, bases = {}, {}
    with tempfile.TemporaryDirectory(prefix="bequest-lifelong-") as work:

        def base(shape: dict) -> str:
            """A model pre-trained on the first domain (with its prompt token, so ELLE can start from it)."""
            key = f"{shape['layers']}x{shape['hidden']}"
            if key not in bases:
                out = Path(work) / f"base-{key}"
                first = c["domains"].split(",")[0]
                lifelong(LifelongRecipe(out=str(out), method="elle",
                                        **{**lc, **shape, "domains": first, "steps": c["base_steps"]}, **SHARED))
                bases[key] = str(next(out.glob("stage0-*")))
            return bases[key]

        start = {k: c[k] for k in ("layers", "hidden", "heads")}
        budget = None
        for name in METHODS:  # naive first: its FLOPs per domain are everyone's budget
            method, _, size = name.partition("@")
            shape = start
            if size:
                shape = {k: runs["elle"]["stages"][-1]["shape"][k] for k in ("layers", "hidden", "ffn")}
                shape["heads"] = shape["hidden"] // (c["hidden"] // c["heads"])
            r = LifelongRecipe(out=str(Path(work) / name.replace("@", "-")), method=method, budget_flops=budget,
                               base=base(shape), **{**lc, **shape}, **SHARED)
            runs[name] = lifelong(r)
            budget = budget or runs["naive"]["stages"][0]["flops"]

    rows = [{"method": m, "AP": runs[m]["AP"], "AP+": runs[m]["AP+"], "flops": runs[m]["flops"],
             "steps": [s["steps"] for s in runs[m]["stages"]],
             "recover_steps": [s["recover_steps"] for s in runs[m]["stages"]],
             "final_shape": runs[m]["stages"][-1]["shape"]} for m in METHODS]
    others = [r for r in rows if r["method"] != "elle"]
    elle = next(r for r in rows if r["method"] == "elle")
    results = {
        "quick": args.quick,
        "config": {**c, **SHARED, "budget_flops_per_domain": budget},
        "equalised": "every method gets the training FLOPs naive spends per domain (engine FLOP accounting, "
                     "warm-up included); steps per stage follow from each stage's model size",
        "table": rows,
        "per_stage": {m: [{k: s[k] for k in ("domain", "AP", "AP+", "ppl", "flops")} for s in runs[m]["stages"]]
                      for m in METHODS},
        "goal": "ELLE has the lowest final AP and AP+",
        "goal_met": all(elle["AP"] < r["AP"] for r in others) and all(elle["AP+"] < r["AP+"] for r in others),
        "elle_beats": {r["method"]: {"AP": elle["AP"] < r["AP"], "AP+": elle["AP+"] < r["AP+"]} for r in others},
    }

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = runs["naive"]["domains"]
    for m in METHODS:
        stages = runs[m]["stages"]
        ax[0].plot(range(len(stages)), [s["AP"] for s in stages], "o-", label=m)
        ax[1].plot(range(1, len(stages)), [s["AP+"] for s in stages[1:]], "o-", label=m)
    ax[0].set(title="AP: mean perplexity over seen domains", ylabel="perplexity")
    ax[1].set(title="AP+: mean perplexity increase on earlier domains", ylabel="perplexity increase")
    for a in ax:
        a.set_xticks(range(len(names)), [f"after {n}" for n in names], rotation=20)
        a.legend()
    fig.suptitle(f"lifelong pre-training, equal FLOPs per domain ({budget:.3g})")
    fig.tight_layout()
    path = common.write("lifelong", args.out_dir, results, fig)
    print(f"wrote {path}")
    print(f"{'method':13} {'AP':>9} {'AP+':>9} {'FLOPs':>10}  steps per domain")
    for r in rows:
        print(f"{r['method']:13} {r['AP']:9.2f} {r['AP+']:9.2f} {r['flops']:10.3g}  {r['steps']}")


if __name__ == "__main__":
    main()
