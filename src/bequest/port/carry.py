"""Carry a PEFT module onto a host: as is on a host of its shape, along the growth maps on a host
`bequest grow` made from one (found through the host's lineage), or replaced by one of the paper's two
baselines, `scratch` (a fresh module of the same config) and `sampled` (each tensor redrawn i.i.d. from
N(its mean, its std)). Anything else is an error naming the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.io import check_model, load_config, load_model, read_lineage
from bequest.peft import Module, expected, misfits, module_of, with_module
from bequest.port.follow import follow, follow_config, source_config

INITS = ("ported", "scratch", "sampled")
Init = Literal[INITS]
MAX_HOPS = 16  # lineage steps searched for the growth a host descends from


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


def scratch(module: Module, host: Path, config: dict, seed: int, task: str) -> dict[str, torch.Tensor]:
    """A fresh module of the same config on the host (the paper's first baseline), seeded."""
    labels = module.num_labels(anatomy(load_config(host)).family)
    model, _ = load_model(host, task, num_labels=labels, seed=seed, with_tokenizer=False)
    torch.manual_seed(seed)
    return module_of(with_module(model, config)).tensors


def port_module(module: Module, host: str | Path, *, init: Init = "ported", seed: int = 0) -> tuple[Module, dict]:
    """(the module for `host`, a report: how it was carried and how many tensors matched / grew).

    A host grown from one the module fits takes it along the growth maps, even where the module would
    also load as is: a deeper host's block 1 is not the old block 1."""
    host = Path(host)
    config = check_model(host)  # a truncated, empty or pickle-only host is refused before anything is written
    task = module.host_task(config)
    fam = anatomy(config, task).family
    labels = module.num_labels(fam)
    refilled, want = expected(module.config, config, task, labels)
    report = {"type": module.kind, "init": init, "host": str(host), "host_shape": shape_of(config)}
    problems = misfits(module.tensors, want)
    record = growth_record(host)
    old = old_want = None
    if record is not None:
        old = source_config(config, record[1]["maps"])
        _, old_want = expected(module.config, old, task, labels)
    if old_want is not None and not misfits(module.tensors, old_want):
        grown_dir, growth = record
        maps = growth["maps"]
        placed = follow_config(module, old_want, want, maps, fam)
        refilled, want = expected(placed, config, task, labels)
        tensors, counts = follow(module, want, config, task, maps, seed)
        left = misfits(tensors, want)
        if left:  # the maps produced something the host does not take: a bug, never a user error
            raise BequestError(f"internal: grown module misfits: {left[0]}; please report this")
        report.update(mode="grown", grown_from=shape_of(old), growth=str(grown_dir),
                      width=maps.get("width"), depth=maps.get("depth"),
                      growth_max_abs_logit_change=growth.get("max_abs_logit_change"),
                      trained_after_growth=grown_dir.resolve() != host.resolve())
    elif not problems:
        tensors, counts = dict(module.tensors), {"matched": len(want), "grown": 0, "fresh": 0}
        report["mode"] = "same-shape"
    elif old is None:
        raise BequestError(
            f"the {module.kind} module does not fit {host} ({shape_of(config)}): {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}{_trained_on(module)}, "
            "and the host was not grown by `bequest grow` (no growth.json in its lineage), so there are no maps "
            "to port it along; port it to a host of the module's own shape"
        )
    else:
        old_problems = misfits(module.tensors, old_want)
        raise BequestError(
            f"the {module.kind} module fits neither {host} ({shape_of(config)}) nor the {shape_of(old)} host it "
            f"was grown from: {old_problems[0]}{_trained_on(module)}; port it to a host of the module's own shape"
        )
    if init == "sampled":
        tensors = sampled(tensors, seed)
    elif init == "scratch":
        tensors = scratch(module, host, refilled, seed, task)
    report["tensors"] = {**counts, "total": len(want)}
    report["config_changed"] = sorted(k for k in refilled if refilled[k] != module.config.get(k))
    refilled = {**refilled, "base_model_name_or_path": str(host)}
    return Module(module.kind, refilled, tensors, module.labels), report
