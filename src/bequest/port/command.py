"""`bequest port --adapter DIR --to HOST OUT`: carry a PEFT module trained on one host onto another.

Three cases, decided from shapes alone: the module fits HOST as it is (it loads unchanged; every
tensor must find its place); HOST was grown by `bequest grow` from a host the module fits (the module
grows along HOST's growth maps, found in HOST's lineage); or neither (an error naming the mismatch).
The paper's two baselines replace the ported tensors: `scratch` (a fresh module of the same config)
and `sampled` (each tensor redrawn i.i.d. from N(its mean, its std)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_config, load_model, read_lineage, save_recipe
from bequest.peft import Module, expected, misfits, module_of, read_module, with_module, write_module
from bequest.port.follow import follow, source_config
from bequest.recipe import OutputFields

INITS = ("ported", "scratch", "sampled")
Init = Literal[INITS]
MAX_HOPS = 16  # lineage steps searched for the growth a host descends from


class PortRecipe(OutputFields):
    adapter: str = Field(..., description="PEFT module folder: peft's (LoRA, IA3, prefix, prompt) or a bequest bottleneck adapter")
    to: str = Field(..., description="host model folder to port the module onto")
    out: str = Field(..., description="output module folder")
    init: Init = Field(
        "ported",
        description="ported: the module carried over; scratch: a fresh module of the same config on the host; "
        "sampled: every ported tensor redrawn i.i.d. from N(its mean, its std) (the last two are the paper's baselines)",
    )
    seed: int = Field(0, description="seed for new blocks' fresh module, the scratch module and the sampled tensors")


def shape_of(config) -> str:
    a = anatomy(config)
    return f"{a.layers}x{a.hidden} ({a.heads} heads, {a.kv_heads} KV heads, ffn {a.ffn})"


def _size(config) -> tuple:
    a = anatomy(config)
    return a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.ffn


def _resolve(parent: str, child: Path) -> Path | None:
    """A lineage parent as recorded (absolute, or relative to where the command ran or to the child)."""
    for p in (Path(parent), child.parent / parent):
        if (p / "config.json").exists():
            return p
    return None


def growth_record(host: Path) -> tuple[Path, dict] | None:
    """(the grown folder, its growth.json) that `host` is, or descends from by training that kept
    its shape (a grown model trained further still has its units where growth put them)."""
    folder, size = host, _size(load_config(host))
    for _ in range(MAX_HOPS):
        if (folder / "growth.json").exists():
            try:
                return folder, json.loads((folder / "growth.json").read_text())
            except ValueError as e:
                raise BequestError(f"{folder / 'growth.json'}: unreadable ({e}); grow the host again") from None
        parent = (read_lineage(folder) or {}).get("parent")
        folder = _resolve(parent, folder) if parent else None
        if folder is None or _size(load_config(folder)) != size:
            return None
    return None


def _trained_on(module: Module) -> str:
    base = module.config.get("base_model_name_or_path")
    if base and (Path(base) / "config.json").exists():
        return f"; it was trained on {base} ({shape_of(load_config(base))})"
    return ""


def sampled(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each tensor redrawn i.i.d. from N(mean, std) of itself (the paper's second baseline)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in sorted(tensors.items()):
        x = t.double()
        std = x.std().item() if x.numel() > 1 else 0.0
        out[key] = (torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + x.mean().item()).to(t.dtype)
    return out


def scratch(module: Module, host: Path, config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A fresh module of the same config on the host (the paper's first baseline), seeded."""
    labels = module.num_labels(anatomy(load_config(host)).family)
    model, _ = load_model(host, module.task, num_labels=labels, seed=seed, with_tokenizer=False)
    torch.manual_seed(seed)
    return module_of(with_module(model, config)).tensors


def port_module(module: Module, host: str | Path, *, init: Init = "ported", seed: int = 0) -> tuple[Module, dict]:
    """(the module for `host`, a report: how it was carried and how many tensors matched / grew)."""
    host = Path(host)
    config = load_config(host)
    fam = anatomy(config, module.task).family
    labels = module.num_labels(fam)
    refilled, want = expected(module.config, config, module.task, labels)
    report = {"type": module.kind, "init": init, "host": str(host), "host_shape": shape_of(config)}
    problems = misfits(module.tensors, want)
    if not problems:
        tensors, counts = dict(module.tensors), {"matched": len(want), "grown": 0, "fresh": 0}
        report["mode"] = "same-shape"
    else:
        record = growth_record(host)
        if record is None:
            raise BequestError(
                f"the {module.kind} module does not fit {host} ({shape_of(config)}): {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}{_trained_on(module)}, "
                "and the host was not grown by `bequest grow` (no growth.json in its lineage), so there are no maps "
                "to port it along; port it to a host of the module's own shape"
            )
        grown_dir, growth = record
        old = source_config(config, growth["maps"])
        _, old_want = expected(module.config, old, module.task, labels)
        old_problems = misfits(module.tensors, old_want)
        if old_problems:
            raise BequestError(
                f"the {module.kind} module fits neither {host} ({shape_of(config)}) nor the {shape_of(old)} host it "
                f"was grown from: {old_problems[0]}{_trained_on(module)}; port it to a host of the module's own shape"
            )
        tensors, counts = follow(module, want, config, module.task, growth["maps"], seed)
        left = misfits(tensors, want)
        if left:  # the maps produced something the host does not take: a bug, never a user error
            raise BequestError(f"internal: grown module misfits: {left[0]}; please report this")
        report.update(mode="grown", grown_from=shape_of(old), growth=str(grown_dir),
                      width=growth["maps"].get("width"), depth=growth["maps"].get("depth"),
                      growth_max_abs_logit_change=growth.get("max_abs_logit_change"),
                      trained_after_growth=grown_dir.resolve() != host.resolve())
    if init == "sampled":
        tensors = sampled(tensors, seed)
    elif init == "scratch":
        tensors = scratch(module, host, refilled, seed)
    report["tensors"] = {**counts, "total": len(want)}
    report["config_changed"] = sorted(k for k in refilled if refilled[k] != module.config.get(k))
    refilled = {**refilled, "base_model_name_or_path": str(host)}
    return Module(module.kind, refilled, tensors), report


def port(r: PortRecipe) -> dict:
    """Port a PEFT module onto another host: as is, or grown along the host's growth maps."""
    check_output(r.out, r.overwrite)
    module = read_module(r.adapter)
    ported, report = port_module(module, r.to, init=r.init, seed=r.seed)
    report["source"] = str(r.adapter)
    with atomic_dir(r.out, r.overwrite) as folder:
        write_module(folder, ported)
        (folder / "port.json").write_text(json.dumps(report, indent=1))
        save_recipe(folder, r.model_dump(exclude={"overwrite"}))
    n = report["tensors"]
    how = (f"all {n['total']} tensors matched" if report["mode"] == "same-shape"
           else f"grown {report['grown_from']} -> {report['host_shape']}: {n['grown']} grown, {n['fresh']} fresh, "
                f"{n['matched']} unchanged of {n['total']}")
    print(f"saved {r.out}: {module.kind} module, {how}; init {r.init}")
    return report
