"""Grown vs from-scratch: FLOPs to reach the scratch run's final validation loss, for each operator.

A small GPT-2 (2x64) is pre-trained on the embedded corpus, then grown to 4x128 by each operator and
trained side by side with the same 4x128 model from scratch: same data order, same budget, same
schedule. Saving = 1 - (large-model FLOPs the grown run needs to reach scratch's final validation loss)
/ (scratch's FLOPs). The small model's own pre-training FLOPs are reported separately, and a second
saving counts them too. Published savings: bert2BERT 45.2%, LiGO 44.7%, StackingBERT ~34%; goal >= 50%.

Progressive stacking (StackingBERT, Gong et al. 2019; `bequest pretrain --grow-at`) is the last row. It
grows depth only (--grow-at refuses width), so it cannot start from the 2x64 model: it starts from scratch
at the large width and a quarter of the depth, 1x128, and is stacked (the trained blocks copied on top,
AdamW moments along, one learning-rate schedule) to 2x128 and then 4x128, with the steps split
12.5% / 17.5% / 70% between the three depths (the authors' script trains 3 and 6 blocks for 50k and 70k
steps; 400k steps in all is our reading of their BERT-base run).
Its budget is the one-shot rows' whole cost: the small model's pre-training plus scratch's FLOPs; its step
count is whatever that budget buys at those sizes, and its growth steps are rounded to the evaluation grid.
Every FLOP it spends, at every depth, is on its curve, so its saving counts everything; it compares with
the one-shot rows' saving counting the small model, not with their large-model-only saving.

    python benchmarks/growth_convergence.py [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (name, width operator, depth operator, noise, warm-up steps after growth)
RUNS = [
    ("exact+identity", "exact", "identity", 0.0, None),
    ("exact+identity, no re-warmup", "exact", "identity", 0.0, 0),
    ("fpi+identity", "fpi", "identity", 1e-3, None),
    ("fpi+stack", "fpi", "stack", 1e-3, None),
    ("aki+stack", "aki", "stack", 1e-3, None),
    ("exact+interleave", "exact", "interleave", 0.0, None),
]
STACKING = "progressive stacking"


def curve(work: Path) -> list[tuple[float, float]]:
    """(large-model training FLOPs, validation loss) at every evaluation."""
    rows = [json.loads(r) for r in (work / "metrics.jsonl").read_text().splitlines()]
    points = {r["step"]: (r["flops"], r["eval_loss"]) for r in rows if "eval_loss" in r}
    return [points[s] for s in sorted(points)]


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First FLOPs at which the curve reaches `target`, interpolated linearly between evaluations."""
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return f1 if l0 == l1 or l0 <= target else f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return points[0][0] if points and points[0][1] <= target else None


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import transformers

    from bequest import data
    from bequest.anatomy import anatomy, build_model, make_config
    from bequest.engine import TrainFields, growth_events, lm_blocks, train, train_flops_per_token, train_growing
    from bequest.grow import GrowSpec, grow

    if args.quick:
        small, large = dict(layers=1, hidden=32, heads=2, ffn=128), dict(layers=2, hidden=64, heads=4, ffn=256)
        vocab, seq, batch, small_steps, steps, every, runs = 500, 32, 4, 6, 6, 3, RUNS[:2]
        shares = (0.3, 0.7)  # of the stacking run's steps at each depth: 1 and 2 blocks
    else:
        small, large = dict(layers=2, hidden=64, heads=4, ffn=256), dict(layers=4, hidden=128, heads=8, ffn=512)
        vocab, seq, batch, small_steps, steps, every, runs = 4096, 64, 16, 600, 600, 25, RUNS
        shares = (0.125, 0.175, 0.7)  # 1, 2 and 4 blocks
    lr, warmup = 1e-3, 30
    tokenizer = data.train_tokenizer("bpe", vocab)
    train_set = lm_blocks(data.load_corpus(None, "train"), tokenizer, seq)
    eval_set = lm_blocks(data.load_corpus(None, "validation"), tokenizer, seq)
    eval_set = eval_set.select(range(min(len(eval_set), 8 if args.quick else 64)))

    def config(shape):
        return make_config("gpt2", vocab=len(tokenizer), positions=seq, **shape)

    def fit(model, name: str, steps: int, warm: int, root: Path):
        spec = TrainFields(steps=steps, batch_size=batch, lr=lr, warmup=warm, eval_every=every, save_every=10 * steps)
        flops = train_flops_per_token(anatomy(model), seq)
        train(model, tokenizer, "causal_lm", train_set, eval_set, root / name, spec, flops_per_token=flops,
              progress=False)
        return curve(root / name)

    def stacking_plan(budget: float) -> tuple[list[int], int, list[int]]:
        """(depths, steps, growth steps) of the stacking run: `shares` of its steps at each depth, growths on
        the evaluation grid, and as many steps as keep its FLOPs within `budget`."""
        depths = [large["layers"] >> k for k in reversed(range(len(shares)))]
        per_step = [batch * seq * train_flops_per_token(anatomy(config({**large, "layers": d}), "causal_lm"), seq)
                    for d in depths]
        guess = budget / sum(s * f for s, f in zip(shares, per_step))
        at, cum = [], 0.0
        for s in shares[:-1]:
            cum += s
            at.append(max(every, every * round(cum * guess / every)))
        spent = sum((b - a) * f for a, b, f in zip([0, *at], at, per_step))
        return depths, at[-1] + int((budget - spent) // per_step[-1]), at

    results, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        transformers.set_seed(0)
        small_model = build_model(config(small), "causal_lm")
        small_curve = fit(small_model, "small", small_steps, warmup, root)
        print(f"small {small}: loss {small_curve[-1][1]:.3f}, {small_curve[-1][0]:.3g} FLOPs")

        transformers.set_seed(1)
        curves["scratch"] = fit(build_model(config(large), "causal_lm"), "scratch", steps, warmup, root)
        target, budget = curves["scratch"][-1][1], curves["scratch"][-1][0]
        print(f"scratch {large}: final loss {target:.3f}, {budget:.3g} FLOPs")

        for name, width, depth, noise, warm in runs:
            grown = grow(small_model, GrowSpec(width=width, depth=depth, noise=noise, seed=0, **large))
            curves[name] = fit(grown.model, name, steps, warmup if warm is None else warm, root)
            need = flops_to_reach(curves[name], target)
            saved = None if need is None else 1 - need / budget
            with_small = None if need is None else 1 - (need + small_curve[-1][0]) / budget
            results[name] = {"width": width, "depth": depth, "noise": noise, "warmup": warm if warm is not None else warmup,
                             "start_loss": curves[name][0][1], "final_loss": curves[name][-1][1],
                             "flops_to_scratch_final": need, "saved": saved, "saved_counting_small": with_small}
            shown = "not reached" if saved is None else f"{saved:.1%} saved ({with_small:.1%} counting the small model)"
            print(f"{name:32} start {curves[name][0][1]:.3f} final {curves[name][-1][1]:.3f}: {shown}")

        # Progressive stacking: from scratch at the large width, on the one-shot rows' whole budget.
        budget_all = small_curve[-1][0] + budget
        depths, total, at = stacking_plan(budget_all)
        transformers.set_seed(1)
        model = build_model(config({**large, "layers": depths[0]}), "causal_lm")
        spec = TrainFields(steps=total, batch_size=batch, lr=lr, warmup=warmup, eval_every=every,
                           save_every=10 * total)
        plan = [(step, lambda m, d=d: grow(m, GrowSpec(layers=d, depth="stack", seed=0))) for step, d in
                zip(at, depths[1:])]
        train_growing(model, tokenizer, "causal_lm", train_set, eval_set, root / "stacking", spec, plan,
                      seq_len=seq, progress=False)
        curves[STACKING] = curve(root / "stacking")
        events = [{"step": e["step"], "layers": [e["growth"]["from"]["layers"], e["growth"]["to"]["layers"]],
                   "loss_before": e["growth"]["loss_before"], "loss_after": e["growth"]["loss_after"]}
                  for e in growth_events(root / "stacking")]
        need = flops_to_reach(curves[STACKING], target)
        saved = None if need is None else 1 - need / budget
        results[STACKING] = {"width": None, "depth": "stack", "noise": 0.0, "warmup": warmup, "depths": depths,
                             "steps": total, "growth": events, "flops": curves[STACKING][-1][0],
                             "flops_budget": budget_all, "start_loss": curves[STACKING][0][1],
                             "final_loss": curves[STACKING][-1][1], "flops_to_scratch_final": need, "saved": saved,
                             "saved_counting_small": saved}  # every FLOP of its own, from scratch
        shown = "not reached" if saved is None else f"{saved:.1%} saved, counting all its FLOPs"
        grew = ", ".join(f"{e['layers'][0]}->{e['layers'][1]} at {e['step']} (loss {e['loss_before']:.3f}->"
                         f"{e['loss_after']:.3f})" for e in events)
        print(f"{STACKING:32} {total} steps, {grew}; final {curves[STACKING][-1][1]:.3f}: {shown}")

    best = max((r["saved"] for name, r in results.items() if name != STACKING and r["saved"] is not None),
               default=None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        label = f"{name} (from scratch: all its FLOPs)" if name == STACKING else name
        ax.plot([f for f, _ in pts], [loss for _, loss in pts], label=label, lw=2.5 if name == "scratch" else 1.5,
                ls="--" if name == STACKING else "-")
    ax.axhline(target, color="k", ls=":", lw=1, label="scratch final loss")
    ax.set_xlabel("large-model training FLOPs (stacking: all of its FLOPs)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], curves["scratch"][0][1] + 0.2))
    ax.set_title(f"GPT-2 {small['layers']}x{small['hidden']} -> {large['layers']}x{large['hidden']}: best saving "
                 + ("none" if best is None else f"{best:.1%}") + "; stacking "
                 + ("none" if results[STACKING]["saved"] is None else f"{results[STACKING]['saved']:.1%}"))
    ax.legend(fontsize=8)
    common.write("growth_convergence", args.out_dir, {
        "quick": args.quick, "small": small, "large": large, "vocab": len(tokenizer), "seq_len": seq,
        "batch_size": batch, "steps": steps, "lr": lr, "warmup": warmup, "eval_every": every,
        "small_pretraining": {"steps": small_steps, "flops": small_curve[-1][0], "final_loss": small_curve[-1][1]},
        "scratch": {"final_loss": target, "flops": budget}, "operators": results, "best_saving": best,
        "published": {"bert2BERT": 0.452, "LiGO": 0.447, "StackingBERT": 0.34}, "goal": 0.5,
        "curves": curves,
    }, fig)


if __name__ == "__main__":
    main()
