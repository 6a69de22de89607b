"""Model folders in and out: every model and tokenizer bequest loads comes through here, checked
against its config before any weight loads; every model folder it writes carries a lineage card.

torch and transformers are imported by the functions that load with them: reading a config as plain
data and checking a checkpoint against it (what planning a growth needs) take neither.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bequest import __version__
from bequest.anatomy import AUTO_CLASSES, PlainConfig, anatomy, family_of, task_of
from bequest.errors import BequestError
from bequest.io.folders import atomic_dir
from bequest.io.hub import hub_id, missing_model
from bequest.io.safetensors import read_header, weight_files

if TYPE_CHECKING:
    import transformers

# Non-parameter tensors older checkpoints carry (causal masks, position ids, rotary caches).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".position_ids", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------- reading


def load_config(path: str | Path) -> transformers.PretrainedConfig:
    import transformers

    path = _config_file(path).parent
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of a broken file, it is the file's fault
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BequestError(f"{path / 'config.json'}: unreadable config ({reason}); fix or re-save it") from None
    _check_shape(config, path / "config.json")
    return config


def read_config(path: str | Path) -> PlainConfig:
    """config.json as plain data, checked as `load_config` checks it; for work that builds no model
    (planning a growth, checking a checkpoint), without transformers' seconds of imports."""
    file = _config_file(path)
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(settings, dict):
            raise ValueError("not a table of settings")
    except (OSError, ValueError) as e:
        raise BequestError(f"{file}: unreadable config ({str(e).splitlines()[0]}); fix or re-save it") from None
    config = PlainConfig(settings)
    _check_shape(config, file)
    return config


def _config_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise missing_model(path)
    if not path.is_dir():
        raise BequestError(f"{path} is a file; give the model's folder")
    if not (path / "config.json").exists():
        raise BequestError(f"{path}: missing config.json; a model folder needs the config it was saved with")
    return path / "config.json"


REQUIRED = ("hidden", "layers", "heads", "vocab")  # shape settings every supported family states


def _check_shape(config, where: Path) -> None:
    """Shape settings are whole numbers >= 1 that fit together (transformers would fail deep inside)."""
    fam = family_of(config)
    for key, attr in fam.config_keys.items():
        value = getattr(config, attr, None)
        if value is None and key not in REQUIRED:
            continue  # a default the family derives (GPT-2's n_inner, Llama's head_dim)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BequestError(f"{where}: {attr} is {value!r}; it must be a whole number of at least 1, fix config.json")
    a = anatomy(config, "base")
    if getattr(config, fam.config_keys.get("head_dim", ""), None) is None and a.hidden % a.heads:
        raise BequestError(f"{where}: {a.hidden} hidden units do not split into {a.heads} heads; fix config.json")
    if a.heads % a.kv_heads:
        raise BequestError(f"{where}: {a.kv_heads} KV heads do not divide {a.heads} heads; fix config.json")


def check_checkpoint(path: Path, config, task: str) -> dict[str, dict]:
    """Every tensor has a role and the shape the config implies, and every tensor the checkpoint's own
    model needs is there, checked before anything loads (transformers would fill a missing one with
    random values and only warn).

    Returns the parameter tensors' headers (name -> dtype, shape, offsets), buffers left out.
    """
    anat = anatomy(config, task)
    params = anat.parameters()
    expected = {str(slot): params[n] for n, slot in anat.slots(params).items()}
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
    own = task_of(config)  # a head the checkpoint never had (a classifier on an LM) is new, not missing
    own_anat = anat if own == task else anatomy(config, own)
    own_params = own_anat.parameters()
    found = {str(slot) for slot in anat.slots(headers).values()}
    missing = [(n, str(s)) for n, s in own_anat.slots(own_params).items() if str(s) not in found]
    if missing:
        name, slot = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BequestError(f"{path}: no tensor for {name} ({slot}){more}; the checkpoint is incomplete, "
                           "re-save or re-download it")
    return headers


def check_model(path: str | Path) -> transformers.PretrainedConfig:
    """A model folder checked as a loader would check it (config, every tensor's role, shape and
    presence; headers only, no weight read); its config."""
    config = load_config(path)
    check_checkpoint(Path(path), config, task_of(config))
    return config


def load_tokenizer(path: str | Path, required: str | None = None):
    """The tokenizer saved beside a model; None without one, or an error naming `required`'s need."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        if required:
            raise BequestError(f"{path} has no tokenizer.json; {required} needs it, save it beside the model")
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_model(path: str | Path, task: str | None = None, *, num_labels: int | None = None, seed: int = 0,
               with_tokenizer: bool = True):
    """(model, tokenizer or None) from an HF folder, in fp32.

    `task` picks the head class (default: the checkpoint's own). A head the checkpoint lacks (a
    classifier on an LM) is new: it is seeded with `seed` and transformers' note about it is not news.
    """
    import torch
    import transformers

    path = Path(path)
    config = load_config(path)
    own = task_of(config)
    task = task or own
    if task == "seq_cls" and num_labels:
        config.num_labels = num_labels
    check_checkpoint(path, config, task)
    auto = getattr(transformers, AUTO_CLASSES[task])
    transformers.set_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    if task != own:
        transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            if task != own:
                warnings.simplefilter("ignore")
            model = auto.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                         trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise BequestError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.config.architectures = [type(model).__name__]
    return model, load_tokenizer(path) if with_tokenizer else None


def load_lm(path: str | Path, seq_len: int, purpose: str):
    """(model, tokenizer, anatomy) of a saved language model that can take `seq_len`-token blocks."""
    model, tokenizer = load_model(path)
    a = anatomy(model)
    if a.task not in ("causal_lm", "masked_lm"):
        raise BequestError(f"{path} is a {a.task} model; {purpose} needs a causal or masked LM")
    if tokenizer is None:
        raise BequestError(f"{path} has no tokenizer.json; {purpose} reuses it, save it beside the model")
    if seq_len > a.usable_positions:
        raise BequestError(f"--seq-len {seq_len} exceeds {path}'s {a.usable_positions} positions; lower it")
    return model, tokenizer, a


# ---------------------------------------------------------------- writing


# The hub's task for each head: what its widget and `pipeline()` without a task name do with a folder.
PIPELINES = {"causal_lm": "text-generation", "masked_lm": "fill-mask", "seq_cls": "text-classification",
             "base": "feature-extraction"}


def reference(parent: str | Path) -> str:
    """A parent others can follow from anywhere: the hub id of a cached hub model, an absolute path for
    another local folder, else as given."""
    return hub_id(parent) or (os.path.abspath(parent) if Path(parent).exists() else str(parent))


def model_card(lineage: dict, *, task: str | None = None, library: str = "transformers") -> str:
    parent = lineage.get("parent")
    if parent and hub_id(parent):  # the lineage names a cached hub model by its id, as the user gave it
        parent = hub_id(parent)
        lineage = {**lineage, "parent": parent}
    meta = {"base_model": reference(parent) if parent else None, "library_name": library,
            "pipeline_tag": PIPELINES.get(task), "tags": ["bequest"], "bequest": lineage}
    front = yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False)
    title = f"{lineage.get('operation', 'model')} by bequest {lineage.get('version', __version__)}"
    return f"---\n{front}---\n\n# {title}\n\nLineage: {parent or 'trained from scratch'}.\n"


def write_card(folder: Path, *, operation: str, parent: str | None = None, recipe: dict | None = None,
               lineage: dict | None = None, task: str | None = None, library: str = "transformers",
               note: str = "") -> None:
    """The lineage card of an output folder; `lineage`: fields the operation adds (a source, a path)."""
    record = {"parent": parent, "operation": operation, **(lineage or {}), "recipe": recipe or {}, "version": __version__}
    (folder / "README.md").write_text(model_card(record, task=task, library=library) + note)


def save_tokenizer(folder: Path, tokenizer, positions: int) -> None:
    """The tokenizer beside a model, its model_max_length the `positions` the text has there (0: no
    limit, left as it is), so that truncation=True yields inputs the model can take."""
    if positions:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its own limit
        tokenizer.model_max_length = positions
    tokenizer.save_pretrained(folder)


def write_model(
    folder: Path,
    model,
    tokenizer=None,
    *,
    operation: str,
    parent: str | None = None,
    recipe: dict | None = None,
    lineage: dict | None = None,
    max_shard_size: str = "2GB",
) -> None:
    """Save a loadable HF folder with its lineage card into `folder` (normally an atomic_dir)."""
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    a = anatomy(model)
    if tokenizer is not None:
        save_tokenizer(folder, tokenizer, a.usable_positions)
    write_card(folder, operation=operation, parent=parent, recipe=recipe, lineage=lineage, task=a.task)
    if recipe is not None:
        save_recipe(folder, recipe)


def save_recipe(folder: str | Path, recipe: dict) -> None:
    """The resolved recipe beside an output, as the YAML `--recipe` reads back."""
    (Path(folder) / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


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
