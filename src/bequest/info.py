"""`bequest info`: what a model folder holds, read from its config and tensor headers only."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

from bequest.anatomy import anatomy, task_of
from bequest.io import check_checkpoint, load_config, model_folder, read_lineage


def describe(model: str | Path) -> str:
    """`model`: a folder or the id of a model in the local Hugging Face cache."""
    path = Path(model_folder(str(model)))
    config = load_config(path)
    anat = anatomy(config, task_of(config))
    headers = check_checkpoint(path, config, anat.task)
    slots = anat.slots(headers)
    n_params = sum(prod(headers[n]["shape"]) for n in slots)
    roles = Counter(s.role for s in slots.values())
    lines = [f"{model}" if path == Path(model) else f"{model} ({path})"]
    lines += [f"  {k:16} {v}" for k, v in anat.summary().items()]
    lines.append(f"  {'parameters':16} {n_params:,} in {len(slots)} tensors")
    lines.append(f"  {'tensors by role':16} " + ", ".join(f"{r} x{c}" for r, c in sorted(roles.items())))
    lineage = read_lineage(path)
    if lineage:
        lines.append(f"  {'lineage':16} {lineage.get('operation')} from {lineage.get('parent') or 'scratch'}"
                     f" (bequest {lineage.get('version')})")
    return "\n".join(lines)
