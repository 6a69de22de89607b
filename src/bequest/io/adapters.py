"""The layouts of a PEFT module folder on disk, and the one reader and writer of their configs.

Two layouts are written:

- peft's: `adapter_config.json` (with its `peft_type`) and `adapter_model.safetensors`, as
  `PeftModel.save_pretrained` writes them;
- bequest's bottleneck format (docs/bottleneck-format.md): `bottleneck_config.json`, which says
  `"format": "bequest-bottleneck"` and its `format_version`, and `bottleneck_model.safetensors`. Its
  file names are its own so that peft, which has no bottleneck adapters, never takes the folder for one
  of its own.

Version 0 of the bottleneck format is the layout bequest wrote before it had one: peft's file names,
with `"peft_type": "BOTTLENECK"` in adapter_config.json. It is read, never written.

In memory every module's config carries a `peft_type`, bequest's bottleneck adapters' too
(`BOTTLENECK`): that is how bequest tells its kinds apart. Only this module knows that the bottleneck
format says `format` instead. Reading needs no torch (`bequest lineage` reads adapter configs too).
"""

from __future__ import annotations

import json
from pathlib import Path

from bequest.errors import BequestError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS = "bottleneck_config.json", "bottleneck_model.safetensors"
BOTTLENECK = "BOTTLENECK"  # the bottleneck kind's peft_type in memory (and in a version-0 folder)
FORMAT, FORMAT_VERSION = "bequest-bottleneck", 1
_MARKS = ("format", "format_version")  # the bottleneck file's own keys, not settings of the adapter
_NEVER_READ = ("inference_mode",)  # version 0 copied peft's; bequest's adapters are frozen or not as loaded


def is_adapter(folder: str | Path) -> bool:
    """Whether `folder` holds a module in any layout bequest reads."""
    return any((Path(folder) / name).is_file() for name in (PEFT_CONFIG, BOTTLENECK_CONFIG))


def read_adapter_config(folder: str | Path) -> tuple[dict, Path]:
    """(the module's config as bequest holds it in memory, the file its tensors should be in).

    Refuses, in one line, a folder in no layout, in two at once, a config that is no JSON mapping, and a
    bottleneck format other than the ones this bequest knows."""
    folder = Path(folder)
    found = [name for name in (PEFT_CONFIG, BOTTLENECK_CONFIG) if (folder / name).is_file()]
    if not found:
        raise BequestError(f"{folder}: no {PEFT_CONFIG} or {BOTTLENECK_CONFIG}; point at a peft or bequest adapter folder")
    if len(found) > 1:
        raise BequestError(f"{folder}: holds both {PEFT_CONFIG} and {BOTTLENECK_CONFIG}; keep the one its weights belong to")
    path = folder / found[0]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BequestError(f"{path}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise BequestError(f"{path}: not a mapping of settings; re-save the adapter")
    if found[0] == PEFT_CONFIG:
        if config.get("peft_type") == BOTTLENECK:  # version 0
            config = {k: v for k, v in config.items() if k not in _NEVER_READ}
        return config, folder / PEFT_WEIGHTS
    _check_format(path, config)
    return {"peft_type": BOTTLENECK, **{k: v for k, v in config.items() if k not in _MARKS}}, folder / BOTTLENECK_WEIGHTS


def _check_format(path: Path, config: dict) -> None:
    if config.get("format") != FORMAT:
        raise BequestError(f"{path}: format is {config.get('format')!r}, not {FORMAT!r}; re-save the adapter with bequest")
    version = config.get("format_version")
    if type(version) is not int or version < 1:
        raise BequestError(f"{path}: format_version {version!r} is not a version number; re-save the adapter with bequest")
    if version > FORMAT_VERSION:
        raise BequestError(f"{path}: {FORMAT} format version {version} is newer than this bequest reads "
                           f"({FORMAT_VERSION}); upgrade bequest")


def write_adapter_config(folder: str | Path, config: dict) -> Path:
    """Write a module's config (as held in memory) in the layout its kind takes; the file its tensors go in."""
    folder = Path(folder)
    if config.get("peft_type") == BOTTLENECK:
        settings = {k: v for k, v in config.items() if k != "peft_type" and k not in _NEVER_READ}
        name, weights, config = BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS, {"format": FORMAT, "format_version": FORMAT_VERSION, **settings}
    else:
        name, weights = PEFT_CONFIG, PEFT_WEIGHTS
    (folder / name).write_text(json.dumps(config, indent=1))
    return folder / weights
