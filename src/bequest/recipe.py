"""Recipes: every verb's settings as one pydantic model, filled from YAML and/or CLI flags.

The model is the single source of defaults and help text: the CLI builds its options from it, and the
resolved recipe is saved beside every output so a run can be repeated exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from bequest.errors import BequestError

R = TypeVar("R", bound=BaseModel)


def one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "recipe"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{source}: {where}: {err['msg']}{more}; fix that value"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BequestError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BequestError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BequestError(f"{path}: a recipe must be a mapping of setting: value")
    return data


def resolve(cls: type[R], recipe_file: str | Path | None = None, **flags) -> R:
    """Recipe file values, overridden by the flags that were given (None = not given)."""
    values = read_yaml(recipe_file) if recipe_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**values)
    except ValidationError as e:
        raise BequestError(one_line(e, str(recipe_file or "options"))) from None
