"""Where bequest keeps what it builds (tokenizers, prepared user datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The argument, else $BEQUEST_CACHE, else ~/.cache/bequest (created if missing)."""
    root = Path(cache_dir or os.environ.get("BEQUEST_CACHE") or Path.home() / ".cache" / "bequest").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
