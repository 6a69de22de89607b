"""`bequest grow SRC OUT`: grow a saved model and save it with its growth maps and measured deviation.

It always grows sharded (grow/sharded.py): tensor by tensor from the source's shards to the output's, so a
checkpoint bigger than RAM grows in the memory of a few of its tensors, with the in-memory path's
results. The deviation probe needs both models in memory, so by default it runs only for small ones.
"""

from __future__ import annotations

import json
import time

from pydantic import Field

from bequest import __version__
from bequest.grow import sharded
from bequest.grow.probe import max_abs_logit_change, probe_ids
from bequest.grow.spec import GrowSpec
from bequest.io import atomic_dir, check_disk, check_output, load_model, model_card, parse_size, save_recipe
from bequest.recipe import GrowFields, OutputFields, SizeFields

PROBE_LIMIT = 2 * 10**9  # source bytes up to which the probe runs unless told (it loads both models)


class GrowRecipe(SizeFields, GrowFields, OutputFields):
    src: str = Field(..., description="model folder to grow")
    out: str = Field(..., description="output model folder")
    seed: int = Field(0, description="seed for new random weights and noise")
    shard_size: str = Field("2GB", description="largest output shard, like 2GB, 500MB or 4GiB")
    probe: bool | None = Field(
        None,
        description="measure max |Δ logits| against the source on a probe batch; it loads both models "
        "(default: only when the source's weights are under 2 GB)",
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
    measure = r.probe if r.probe is not None else plan.source_bytes < PROBE_LIMIT
    check_disk(r.out, plan.nbytes)
    report = {
        "width": r.width,
        "depth": r.depth,
        "from": _shape(plan.anat),
        "to": _shape(plan.new_anat),
        "max_abs_logit_change": None,
        "probe": {"skipped": "turned off by --no-probe" if r.probe is False else
                  f"the source's {plan.source_bytes / 1e9:.1f} GB of weights are over the {PROBE_LIMIT / 1e9:g} GB "
                  "the probe loads by default; pass --probe to measure"},
        "weights": {"dtype": sorted({o.dtype for shard in plan.shards for o in shard}), "bytes": plan.nbytes,
                    "shards": len(plan.shards), "streamed": True},
        "seconds": {"plan": time.perf_counter() - start},
        "maps": plan.maps,
    }
    with atomic_dir(r.out, r.overwrite) as folder:
        start = time.perf_counter()
        sharded.write(plan, folder)
        report["seconds"]["write"] = time.perf_counter() - start
        if measure:
            model, _ = load_model(r.src, with_tokenizer=False)
            grown, _ = load_model(folder, with_tokenizer=False)
            probe = probe_ids(model)
            report["max_abs_logit_change"] = max_abs_logit_change(model, grown, probe)
            report["probe"] = {"shape": list(probe.shape), "seed": 0, "ids": "uniform over the vocabulary"}
            del model, grown
        sharded.copy_tokenizer(r.src, folder)
        lineage = {"parent": str(r.src), "operation": "grow", "recipe": r.model_dump(), "version": __version__}
        save_recipe(folder, r.model_dump())
        (folder / "README.md").write_text(model_card(lineage) + _card_line(report, r), encoding="utf-8")
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
