"""`bequest grow SRC OUT`: grow a saved model and save it with its growth maps and measured deviation.

It always grows sharded (grow/sharded.py): tensor by tensor from the source's shards to the output's, so a
checkpoint bigger than RAM grows in the memory of a few of its tensors, with the in-memory path's
results. The deviation probe runs both models module by module from their shards (grow/probe.py), so it
stays within the same memory and is on at every size.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

from pydantic import Field

from bequest import __version__
from bequest.grow import sharded
from bequest.grow.probe import probe_ids, probing
from bequest.grow.spec import GrowSpec
from bequest.io import atomic_dir, check_disk, check_output, model_card, parse_size, save_recipe
from bequest.recipe import GrowFields, ModelFolder, OutputFields, SizeFields


class GrowRecipe(SizeFields, GrowFields, OutputFields):
    src: ModelFolder = Field(..., description="model folder or cached hub id to grow")
    out: str = Field(..., description="output model folder")
    seed: int = Field(0, description="seed for new random weights and noise")
    shard_size: str = Field("2GB", description="largest output shard, like 2GB, 500MB or 4GiB")
    probe: bool = Field(
        True, description="measure max |Δ logits| against the source on a probe batch (module by module, in the "
        "memory of the largest module)",
    )

    def spec(self) -> GrowSpec:
        return GrowSpec.from_recipe(self, self.sizes())


def _shape(a) -> str:
    return f"{a.layers}x{a.hidden} ({a.heads} heads, ffn {a.ffn})"


def grow_command(r: GrowRecipe) -> dict:
    """Grow a model wider and/or deeper, reusing its trained weights."""
    check_output(r.out, r.overwrite)
    shard_size = parse_size(r.shard_size)
    start = time.perf_counter()
    # Planned from config.json and the tensor headers: an impossible target is refused before any
    # weights load, and so is a disk too small for the result.
    plan = sharded.plan(r.src, r.spec(), shard_size=shard_size)
    check_disk(r.out, plan.nbytes)
    report = {
        "width": r.width,
        "depth": r.depth,
        "from": _shape(plan.anat),
        "to": _shape(plan.new_anat),
        "max_abs_logit_change": None,
        "probe": {"skipped": "turned off by --no-probe"},
        "weights": {"dtype": sorted({o.dtype for shard in plan.shards for o in shard}), "bytes": plan.nbytes,
                    "shards": len(plan.shards), "streamed": True},
        "seconds": {"plan": time.perf_counter() - start},
        "maps": plan.maps,
    }
    ids = probe_ids(plan.anat.config)
    with atomic_dir(r.out, r.overwrite) as folder, probing(plan.src, ids) if r.probe else nullcontext() as probe:
        start = time.perf_counter()
        # Meanwhile the probe runs the source in a thread, right behind the writer, and compares each
        # copied tensor in another.
        sharded.write(plan, folder, on_read=probe.read if r.probe else None)
        report["seconds"]["write"] = time.perf_counter() - start
        if r.probe:
            start = time.perf_counter()
            report["max_abs_logit_change"] = probe.against(folder)
            report["probe"] = {"shape": list(ids.shape), "seed": 0, "ids": "uniform over the vocabulary"}
            report["seconds"]["probe_after_write"] = time.perf_counter() - start
        sharded.copy_tokenizer(r.src, folder)
        lineage = {"parent": str(r.src), "operation": "grow", "recipe": r.model_dump(), "version": __version__}
        save_recipe(folder, r.model_dump())
        (folder / "README.md").write_text(model_card(lineage, task=plan.anat.task) + _card_line(report, r), encoding="utf-8")
        (folder / "growth.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    deviation = report["max_abs_logit_change"]
    measured = "not measured" if deviation is None else f"{deviation:.3g}"
    print(f"saved {r.out}: {report['from']} -> {report['to']}, {r.width}/{r.depth}, max |Δ logits| {measured}")
    return {k: v for k, v in report.items() if k != "maps"}


def _card_line(report: dict, r: GrowRecipe) -> str:
    deviation = report["max_abs_logit_change"]
    if deviation is None:
        measured = f"max |Δ logits| against the source not measured ({report['probe']['skipped']})"
    else:
        shape = "x".join(map(str, report["probe"]["shape"]))
        measured = f"max |Δ logits| against the source on a {shape} probe: {deviation:.3g}"
    return (
        f"\nGrown {report['from']} -> {report['to']} by `{r.width}` width and `{r.depth}` depth; "
        f"{measured} (index maps in growth.json).\n"
    )
