"""Output folders: refuse to overwrite, write into a hidden sibling, rename into place at the end.

An interrupted run never leaves a folder that looks complete; a training run's checkpoints live in
the hidden `.OUT.partial` folder, from which a rerun resumes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from bequest.errors import BequestError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to touch an existing output unless asked; call before doing any work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BequestError(f"{out} already exists; pass --overwrite to replace it or choose another path")
    if out.exists() and not out.is_dir():
        raise BequestError(f"{out} exists and is not a folder; remove it or choose another path")
    return out


def partial_dir(out: str | Path) -> Path:
    """Where a run's output grows before it is renamed into place (also holds resume checkpoints)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, work: Path | None = None):
    """Yield a hidden sibling folder; on success it becomes `out`, on failure nothing changes."""
    out = check_output(out, overwrite)
    tmp = work or out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=work is not None)
    try:
        yield tmp
    except BaseException:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # overwrite: move the old folder aside first so a crash loses neither
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
