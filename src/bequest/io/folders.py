"""Output folders: refuse to overwrite, write into a hidden sibling, rename into place at the end.

An interrupted run never leaves a folder that looks complete; a training run's checkpoints live in
the hidden `.OUT.partial` folder, from which a rerun resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import uuid
from pathlib import Path

from bequest.errors import BequestError

_HELD: dict[Path, int] = {}  # folders this process holds, and the open descriptor that holds each


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to touch an existing output unless asked; call before doing any work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BequestError(f"{out} already exists; pass --overwrite to replace it or choose another path")
    if out.exists() and not out.is_dir():
        raise BequestError(f"{out} exists and is not a folder; remove it or choose another path")
    where = out.absolute().parent
    while not where.exists():
        where = where.parent
    if not os.access(where, os.W_OK):
        raise BequestError(f"cannot write into {where} (read-only); choose an OUT in a writable folder")
    return out


def make_dir(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BequestError(f"cannot write into {folder.parent} ({e.strerror}); choose an OUT in a writable folder") from None
    return folder


def hold(folder: Path) -> None:
    """Hold `folder` (an advisory lock on the folder itself) until `let_go` or the end of this process:
    another bequest run that tries to hold it is refused. A killed run holds nothing."""
    let_go(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BequestError(f"{folder} is in use by another bequest run; wait for it to end or choose another OUT") from None
    _HELD[folder.absolute()] = fd


def let_go(folder: Path) -> None:
    fd = _HELD.pop(folder.absolute(), None)
    if fd is not None:
        os.close(fd)


def partial_dir(out: str | Path) -> Path:
    """Where a run's output grows before it is renamed into place (also holds resume checkpoints)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, work: Path | None = None):
    """Yield a hidden sibling folder; on success it becomes `out`, on failure nothing changes."""
    out = check_output(out, overwrite)
    for stale in out.parent.glob(f"{glob.escape(f'.{out.name}')}.tmp-*"):
        hold(stale)  # refused while another run writes OUT; else it is what a killed run left behind
        let_go(stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = work
    if tmp is None:
        tmp = make_dir(out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        hold(tmp)
    try:
        yield tmp
    except BaseException:
        if work is None:
            let_go(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.is_symlink():  # overwrite replaces the link itself; what it pointed to is left alone
        out.unlink()
    elif out.exists():  # overwrite: move the old folder aside first so a crash loses neither
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    let_go(tmp)
