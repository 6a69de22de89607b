"""`bequest grow SRC OUT`: grow a saved model and save it with its growth maps and measured deviation."""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bequest.anatomy import anatomy
from bequest.grow import DEPTH, WIDTH, grow, max_abs_logit_change, targets
from bequest.io import atomic_dir, check_output, load_config, load_model, write_model

PROBE = (2, 16)  # sequences x tokens of the fixed probe batch


class GrowRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str = Field(..., description="model folder to grow")
    out: str = Field(..., description="output model folder")
    hidden: int | None = Field(None, ge=1, description="target hidden size (default: unchanged)")
    heads: int | None = Field(None, ge=1, description="target attention heads (default: hidden / head size)")
    kv_heads: int | None = Field(None, ge=1, description="target KV heads, Llama-like (default: keep the group size)")
    ffn: int | None = Field(None, ge=1, description="target MLP width (default: unchanged)")
    layers: int | None = Field(None, ge=1, description="target number of blocks (default: unchanged)")
    width: Literal[tuple(WIDTH)] = Field("exact", description="width operator")
    depth: Literal[tuple(DEPTH)] = Field("identity", description="depth operator")
    placement: str = Field(
        "even", description="where identity/interleave blocks go: 'even', 'top', or old layer indices like '0,0,1'"
    )
    noise: float = Field(0.0, ge=0.0, description="std of symmetry-breaking noise added to expanded tensors")
    seed: int = Field(0, description="seed for new random weights and noise")
    overwrite: bool = Field(False, description="replace an existing output folder")


def probe_ids(model, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random token ids that fits the model's vocabulary and positions."""
    anat = anatomy(model)
    length = PROBE[1]
    if anat.positions:
        length = min(length, anat.positions - anat.family.position_offset)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, anat.vocab, (PROBE[0], length), generator=g)


def _shape(a) -> str:
    return f"{a.layers}x{a.hidden} ({a.heads} heads, ffn {a.ffn})"


def grow_command(r: GrowRecipe) -> dict:
    """Grow a model wider and/or deeper, reusing its trained weights."""
    check_output(r.out, r.overwrite)
    # An impossible target is refused from config.json alone, before any weights load.
    anat = anatomy(load_config(r.src))
    target = targets(anat, r.hidden, r.heads, r.kv_heads, r.ffn, r.layers)
    DEPTH[r.depth](anat.layers, target["layers"], r.placement)
    model, tokenizer = load_model(r.src)
    grown = grow(
        model, hidden=r.hidden, heads=r.heads, kv_heads=r.kv_heads, ffn=r.ffn, layers=r.layers,
        width=r.width, depth=r.depth, placement=r.placement, noise=r.noise, seed=r.seed,
    )
    probe = probe_ids(model)
    deviation = max_abs_logit_change(model, grown.model, probe)
    report = {
        "width": r.width,
        "depth": r.depth,
        "from": _shape(anatomy(model)),
        "to": _shape(anatomy(grown.model)),
        "max_abs_logit_change": deviation,
        "probe": {"shape": list(probe.shape), "seed": 0, "ids": "uniform over the vocabulary"},
        "maps": grown.maps,
    }
    with atomic_dir(r.out, r.overwrite) as folder:
        write_model(folder, grown.model, tokenizer, operation="grow", parent=str(r.src), recipe=r.model_dump())
        (folder / "growth.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        with open(folder / "README.md", "a", encoding="utf-8") as card:
            card.write(
                f"\nGrown {report['from']} -> {report['to']} by `{r.width}` width and `{r.depth}` depth; "
                f"max |Δ logits| against the source on a {'x'.join(map(str, probe.shape))} probe: {deviation:.3g} "
                "(index maps in growth.json).\n"
            )
    print(f"saved {r.out}: {report['from']} -> {report['to']}, {r.width}/{r.depth}, max |Δ logits| {deviation:.3g}")
    return {k: v for k, v in report.items() if k != "maps"}
