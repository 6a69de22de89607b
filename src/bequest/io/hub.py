"""Hub ids as model folders: `gpt2` or `org/name` stands for its snapshot in the local Hugging Face cache.

Only the cache is read, never the network: a model must be downloaded first (`hf download org/name`).
A folder of that name wins over the id. The way back, from a snapshot folder to its id, is read off the
cache's layout (`models--org--name/snapshots/<commit>`), so a record written about a cached model names
the id the user gave, not a path into one machine's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from bequest.errors import BequestError

_PREFIX = "models--"


def hub_cache() -> str:
    """The cache folder huggingface_hub reads, as the environment says now (HF_HUB_CACHE, else HF_HOME's)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def cached_snapshot(ref: str) -> Path | None:
    """The snapshot folder of hub id `ref` (its `main` revision) in the local cache; None when absent or
    when `ref` cannot be a hub id."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True, cache_dir=hub_cache()))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError) or no hub id at all (HFValidationError)
        return None


def model_folder(ref: str) -> str:
    """A model argument as a folder: `ref` itself when it exists (or is no cached id: the loader then says
    what is wrong), else its cached snapshot."""
    if Path(ref).exists():
        return ref
    cached = cached_snapshot(ref)
    return str(cached) if cached is not None else ref


def hub_id(folder: str | Path) -> str | None:
    """The hub id of a folder that is a snapshot in a Hugging Face cache; None for any other folder."""
    path = Path(folder)
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith(_PREFIX) and len(repo) > len(_PREFIX):
        return repo[len(_PREFIX):].replace("--", "/")  # hub ids never hold "--", so this is the id itself
    return None


def missing_model(ref: str | Path) -> BequestError:
    """The error for a model argument that names nothing on this machine."""
    return BequestError(
        f"'{ref}' is neither a model folder nor a model id in the local Hugging Face cache (HF_HUB_CACHE="
        f"{hub_cache()}); download it first with `hf download {ref}` or pass a folder"
    )
