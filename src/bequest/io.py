"""Model folders in and out: validated lazy reads, atomic writes, and a lineage model card.

Reads never unpickle: only safetensors are accepted. Writes go to a hidden sibling folder that is
renamed into place at the end, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
import transformers
import yaml

from bequest import __version__
from bequest.anatomy import AUTO_CLASSES, anatomy, task_of
from bequest.errors import BequestError

# Non-parameter tensors older checkpoints carry (causal masks, position ids, rotary caches).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".position_ids", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------- reading


def read_header(file: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file, checked against the file's real size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise BequestError(f"{file}: not a readable safetensors file ({e}); re-save or re-download it") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise BequestError(
            f"{file}: truncated or corrupted safetensors ({size} bytes, header says {8 + n + end}); "
            "re-save or re-download it"
        )
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise BequestError(f"{index}: unreadable shard index ({e}); re-save the model") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise BequestError(f"{index}: missing shard {missing[0]}; copy the whole model folder")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise BequestError(
            f"{path}: only pickle weights (*.bin); bequest never unpickles, convert them with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise BequestError(f"{path}: no model.safetensors found; point at a Hugging Face model folder")


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    path = Path(path)
    if not path.is_dir():
        raise BequestError(f"{path}: no such model folder")
    if not (path / "config.json").exists():
        raise BequestError(f"{path}: missing config.json; a model folder needs the config it was saved with")
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise BequestError(f"{path / 'config.json'}: unreadable config ({str(e).splitlines()[0]})") from None


def check_checkpoint(path: Path, config, task: str) -> dict[str, dict]:
    """Every tensor has a role and the shape the config implies, checked before anything loads.

    Returns the parameter tensors' headers (name -> dtype, shape, offsets), buffers left out.
    """
    auto = getattr(transformers, AUTO_CLASSES[task])
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    anat = anatomy(skeleton, task)
    params = dict(skeleton.named_parameters())
    expected = {str(slot): tuple(params[n].shape) for n, slot in anat.slots(params).items()}
    headers = {}
    for file in weight_files(path):
        for name, info in read_header(file).items():
            if name.endswith(_BUFFER_SUFFIXES):
                continue
            try:
                slot = str(anat.slots([name])[name])
            except BequestError as e:
                raise BequestError(f"{file}: {e}") from None
            want = expected.get(slot)
            if want is not None and tuple(info["shape"]) != want:
                raise BequestError(
                    f"{file}: tensor {name} has shape {tuple(info['shape'])} but config.json implies "
                    f"{want}; the weights and config.json do not belong together"
                )
            headers[name] = info
    return headers


def load_model(path: str | Path, task: str | None = None, with_tokenizer: bool = True):
    """(model, tokenizer or None) from an HF folder, in fp32; `task` picks the head class."""
    path = Path(path)
    config = load_config(path)
    task = task or task_of(config)
    check_checkpoint(path, config, task)
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise BequestError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    tokenizer = None
    if with_tokenizer and (path / "tokenizer.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer


# ---------------------------------------------------------------- writing


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


def model_card(lineage: dict) -> str:
    meta = {"base_model": lineage.get("parent"), "tags": ["bequest"], "bequest": lineage}
    if meta["base_model"] is None:
        del meta["base_model"]
    front = yaml.safe_dump(meta, sort_keys=False)
    title = f"{lineage.get('operation', 'model')} by bequest {lineage.get('version', __version__)}"
    return f"---\n{front}---\n\n# {title}\n\nLineage: {lineage.get('parent') or 'trained from scratch'}.\n"


def write_model(
    folder: Path,
    model,
    tokenizer=None,
    *,
    operation: str,
    parent: str | None = None,
    recipe: dict | None = None,
    max_shard_size: str = "2GB",
) -> None:
    """Save a loadable HF folder with its lineage card into `folder` (normally an atomic_dir)."""
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    lineage = {"parent": parent, "operation": operation, "recipe": recipe or {}, "version": __version__}
    (folder / "README.md").write_text(model_card(lineage))
    if recipe is not None:
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def save_model(out, model, tokenizer=None, *, overwrite: bool = False, **card) -> Path:
    """Atomically save `model` (and tokenizer) to `out` as a normal save_pretrained folder."""
    with atomic_dir(out, overwrite) as tmp:
        write_model(tmp, model, tokenizer, **card)
    return Path(out)


def read_lineage(path: str | Path) -> dict | None:
    card = Path(path) / "README.md"
    if not card.exists():
        return None
    text = card.read_text()
    if not text.startswith("---\n"):
        return None
    try:
        meta = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except (ValueError, yaml.YAMLError):
        return None
    return (meta or {}).get("bequest")
