"""Portability of PEFT modules: ported vs trained from scratch vs sampled, at equal fine-tuning steps.

On the embedded corpus a GPT-2 ancestor (2x64) is pre-trained, then continued on two domains: host A
(`language`) and host B (`network`), two independently continued pre-trainings of one ancestor. A is
also grown to 3x96 (exact width, an identity block) and the grown host continued on `network` too:
host G. Pairs: A -> B (same shape) and A -> G (different shape, ported along G's growth maps). One
module per PEFT type (LoRA, IA3, prefix, prompt, bottleneck) is trained on A for the `domain` task,
then every (pair, type, init, seed) fine-tunes a module on the target host for the same steps, with
`bequest study port`. Goal (Sabry & Belz, EACL 2024): ported beats scratch and sampled on every type.

    python benchmarks/portability.py [--quick]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

QUICK = dict(vocab=1000, seq_len=32, lm_batch=4, ancestor_steps=4, continue_steps=2, hidden=32, heads=2, grown=48,
             types=["lora", "prefix"], inits=["ported", "scratch", "sampled"], seeds=[0], source_steps=3, steps=3,
             eval_every=3, batch=4, max_len=24, train_examples=64, eval_examples=16)
# Sized for ~20 minutes on 2 CPU cores: 90 runs of 80 steps on 2x64 and 3x96 hosts.
# Sized for ~15 minutes on 2 busy CPU cores: 90 runs of 60 steps on 2x64 and 3x96 hosts.
FULL = dict(vocab=4000, seq_len=128, lm_batch=16, ancestor_steps=600, continue_steps=150, hidden=64, heads=4, grown=96,
            types=["lora", "ia3", "prefix", "prompt", "bottleneck"], inits=["ported", "scratch", "sampled"],
            seeds=[0, 1, 2], source_steps=300, steps=60, eval_every=15, batch=16, max_len=64, train_examples=None,
            eval_examples=300)
LRS = {"lora": 3e-3, "ia3": 1e-2, "prefix": 1e-2, "prompt": 1e-2, "bottleneck": 1e-2}  # the best of 3e-3, 1e-2, 3e-2 on A


def continued(src: Path, out: Path, domain: str, c: dict, seed: int) -> Path:
    """`src` pre-trained further on one domain of the corpus (a model's next version)."""
    from bequest import data
    from bequest.engine import TrainFields, lm_blocks, train
    from bequest.io import load_model, save_model

    model, tokenizer = load_model(src)
    blocks = lm_blocks(data.load_corpus(domain, "train"), tokenizer, c["seq_len"])
    evals = lm_blocks(data.load_corpus(domain, "validation"), tokenizer, c["seq_len"])
    spec = TrainFields(steps=c["continue_steps"], batch_size=c["lm_batch"], lr=1e-3, warmup=10, eval_every=10**6,
                       save_every=10**6, seed=seed)
    work = out.parent / f".{out.name}.work"
    train(model, tokenizer, "causal_lm", blocks, evals.select(range(min(8, len(evals)))), work, spec, progress=False)
    shutil.rmtree(work, ignore_errors=True)
    return save_model(out, model, tokenizer, operation="continue", parent=str(src), recipe={"domain": domain})


def hosts(work: Path, c: dict) -> dict[str, Path]:
    from bequest.grow.command import GrowRecipe, grow_command
    from bequest.pretrain import PretrainRecipe, pretrain

    ancestor = work / "ancestor"
    pretrain(PretrainRecipe(out=str(ancestor), family="gpt2", layers=2, hidden=c["hidden"], heads=c["heads"],
                            vocab=c["vocab"], seq_len=c["seq_len"], steps=c["ancestor_steps"], batch_size=c["lm_batch"],
                            lr=2e-3, warmup=max(1, c["ancestor_steps"] // 15), eval_every=10**6, save_every=10**6,
                            eval_blocks=8))
    a = continued(ancestor, work / "a-language", "language", c, seed=1)
    b = continued(ancestor, work / "b-network", "network", c, seed=2)
    grown = work / "a-grown"
    grow_command(GrowRecipe(src=str(a), out=str(grown), hidden=c["grown"], layers=3))
    g = continued(grown, work / "g-network", "network", c, seed=3)
    return {"a": a, "b": b, "g": g}


def main() -> None:
    args = common.parse(__doc__.splitlines()[0])
    import matplotlib

    matplotlib.use("Agg")
    import torch

    import datasets

    datasets.disable_progress_bars()
    # One thread whatever --threads says: these matrices are tiny, and on a busy machine a second
    # thread mostly spins (measured here: 2 threads ran a fine-tuning run 10x slower than 1).
    torch.set_num_threads(1)
    c = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bequest-portability-") as tmp:
        measure(args, Path(tmp), c)


def measure(args, work: Path, c: dict) -> None:
    from bequest.port.report import plot, table
    from bequest.port.study import Pair, StudyRecipe, study

    t0 = time.perf_counter()
    h = hosts(work, c)
    hosts_seconds = time.perf_counter() - t0
    recipe = StudyRecipe(
        out=str(work / "study"), data="domain", types=c["types"], inits=c["inits"], seeds=c["seeds"],
        pairs=[Pair(name="A->B (same shape)", source=str(h["a"]), target=str(h["b"])),
               Pair(name="A->G (grown)", source=str(h["a"]), target=str(h["g"]))],
        source_steps=c["source_steps"], steps=c["steps"], eval_every=c["eval_every"], batch_size=c["batch"],
        warmup=max(1, c["steps"] // 10), max_len=c["max_len"], train_examples=c["train_examples"],
        eval_examples=c["eval_examples"], lrs=LRS, lr=3e-3, seed=0,
    )
    result = study(recipe)
    rows = [r for r in (work / "study" / "results.jsonl").read_text().splitlines() if r]
    import json

    rows = [json.loads(r) for r in rows]
    sources = {p.parent.name + "/" + p.name: json.loads((p / "source.json").read_text())["accuracy"]
               for p in sorted((work / "study" / "sources").glob("*/*")) if (p / "source.json").exists()}
    print(table(result["summary"]))
    results = {
        "quick": bool(args.quick),
        "config": {**c, "lrs": LRS, "task": "domain", "family": "gpt2", "torch_threads": 1},
        "seconds": {"hosts": hosts_seconds, "total": time.perf_counter() - t0},
        "source_accuracy": sources,
        "summary": result["summary"],
        "ported_beats_baselines": result["verdicts"],
        "rows": rows,
    }
    common.write("portability", args.out_dir, results, plot(rows))


if __name__ == "__main__":
    main()
