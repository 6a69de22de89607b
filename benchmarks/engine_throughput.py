"""bequest's engine vs a plain transformers.Trainer: training tokens/s, side by side in one run.

Same model (a 4-layer, 128-wide GPT-2), same packed blocks, same optimizer settings. The runs alternate
(plain, bequest, plain, bequest, ...) so drifting machine load hits both alike; the reported ratio is
the median over the adjacent pairs' ratios, which a load change between pairs cannot skew.
Goal: bequest >= 0.95x plain.

    python benchmarks/engine_throughput.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import transformers

    from bequest import data
    from bequest.anatomy import anatomy, build_model, make_config
    from bequest.engine import TrainFields, collator, lm_blocks, train, train_flops_per_token

    shape = dict(layers=1, hidden=32, heads=2) if args.quick else dict(layers=4, hidden=128, heads=4)
    steps, repeats, seq_len, batch = (4, 1, 32, 4) if args.quick else (40, 5, 128, 16)
    vocab = 1000 if args.quick else 8000
    tokenizer = data.train_tokenizer("bpe", vocab)
    blocks = lm_blocks(data.load_corpus(None, "train"), tokenizer, seq_len)
    blocks = blocks.select(range(min(len(blocks), steps * batch * 2)))
    eval_set = blocks.select(range(min(len(blocks), 8)))
    config = make_config("gpt2", vocab=len(tokenizer), positions=seq_len, **shape)
    spec = TrainFields(steps=steps, batch_size=batch, lr=1e-3, warmup=2, eval_every=steps, save_every=10 * steps)

    def fresh():
        transformers.set_seed(0)
        return build_model(config, "causal_lm")

    def plain(work: Path) -> float:
        targs = transformers.TrainingArguments(
            output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
            learning_rate=spec.lr, lr_scheduler_type="cosine", warmup_steps=spec.warmup, weight_decay=spec.weight_decay,
            eval_strategy="steps", eval_steps=steps, save_strategy="no", logging_steps=10, report_to="none",
            disable_tqdm=True, use_cpu=True, seed=0,
        )
        trainer = transformers.Trainer(model=fresh(), args=targs, data_collator=collator("causal_lm", tokenizer),
                                       train_dataset=blocks, eval_dataset=eval_set)
        return trainer.train().metrics["train_runtime"]

    def bequest(work: Path) -> float:
        model = fresh()
        flops = train_flops_per_token(anatomy(model), seq_len)
        metrics = train(model, tokenizer, "causal_lm", blocks, eval_set, work, spec, flops_per_token=flops, progress=False)
        return metrics["train_runtime"]

    tokens = steps * batch * seq_len
    speeds = {"plain": [], "bequest": []}
    for _ in range(repeats):
        for name, run in (("plain", plain), ("bequest", bequest)):
            with tempfile.TemporaryDirectory() as work:
                t0 = time.perf_counter()
                runtime = run(Path(work))
                speeds[name].append(tokens / runtime)
                print(f"{name:8} {tokens / runtime:8.0f} tokens/s ({time.perf_counter() - t0:.1f} s wall)")
    median = {k: statistics.median(v) for k, v in speeds.items()}
    pairs = [b / p for p, b in zip(speeds["plain"], speeds["bequest"])]
    ratio = statistics.median(pairs)
    print(f"bequest / plain = {ratio:.3f} (goal >= 0.95)")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(median), list(median.values()), color=["#888", "#2a7"])
    for i, k in enumerate(median):
        ax.scatter([i] * len(speeds[k]), speeds[k], color="k", s=10, zorder=3)
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"engine throughput: bequest / plain = {ratio:.3f}")
    common.write("engine_throughput", args.out_dir, {
        "quick": args.quick, "model": {"family": "gpt2", **shape, "vocab": len(tokenizer)},
        "steps": steps, "batch_size": batch, "seq_len": seq_len, "repeats": repeats,
        "tokens_per_s": speeds, "median_tokens_per_s": median, "pair_ratios": pairs, "ratio": ratio, "goal": 0.95,
    }, fig)


if __name__ == "__main__":
    main()
