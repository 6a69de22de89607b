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

_HELD: dict[Path, int] = {}  # OUT -> the open lock file that holds it for this process


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to touch an existing output unless asked, and hold OUT for this run; call before doing
    any work."""
    out = Path(out)
    claim(out)
    if out.exists() and not overwrite:
        raise BequestError(f"{out} already exists; pass --overwrite to replace it or choose another path")
    if out.exists() and not out.is_dir():
        raise BequestError(f"{out} exists and is not a folder; remove it or choose another path")
    return out


def claim(out: Path) -> None:
    """Hold OUT until this run ends (`release`): a second run into the same OUT is refused while this
    one lives, and whatever a killed run into OUT left behind (`.OUT.tmp-*`) is removed."""
    if os.environ.get("RANK", "0") != "0":  # the other processes of a launch follow their main one
        return
    key = out.absolute()
    if key in _HELD:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BequestError(f"cannot write into {out.parent} ({e.strerror}); choose an OUT in a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BequestError(f"{out} is being written by another bequest run; wait for it to end or choose another OUT") from None
    _HELD[key] = fd
    for stale in glob.glob(glob.escape(str(out.parent / f".{out.name}.tmp-")) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def release(out: str | Path | None = None) -> None:
    """Let go of OUT (default: every OUT this process holds) and remove its lock file."""
    keys = list(_HELD) if out is None else [Path(out).absolute()]
    for key in keys:
        fd = _HELD.pop(key, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(key.parent / f".{key.name}.lock")
            os.close(fd)


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
    if out.is_symlink():  # overwrite replaces the link itself; what it pointed to is left alone
        out.unlink()
    elif out.exists():  # overwrite: move the old folder aside first so a crash loses neither
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    release(out)
