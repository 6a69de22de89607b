"""`bequest lineage DIR...`: the family tree of the models, fine-tunes and adapters in or under DIR."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pydantic import Field, field_validator

from bequest.errors import BequestError
from bequest.lineage.draw import draw
from bequest.lineage.graph import scan
from bequest.recipe import ModelFolder, OutputFields

with warnings.catch_warnings():
    # pydantic warns that a field named `json` hides BaseModel's deprecated .json(); bequest never calls it
    warnings.filterwarnings("ignore", message='Field name "json"')

    class LineageRecipe(OutputFields):
        dirs: list[ModelFolder] = Field(..., min_length=1, description="model, fine-tune or adapter folders (or "
                                        "cached hub ids), or folders to search for them (every folder below, hidden "
                                        "ones skipped)")
        json: bool = Field(False, description="print the tree as JSON (nodes and edges) instead of text")
        png: str | None = Field(None, description="also draw the tree into this PNG file")

        @field_validator("dirs", mode="before")
        @classmethod
        def _one(cls, v):
            return [v] if isinstance(v, str) else v


def lineage(r: LineageRecipe) -> dict:
    """Print the family tree of model folders: generations, operations, shapes, adapters and fine-tunes."""
    if r.png:
        png = Path(r.png)
        if png.exists() and not r.overwrite:
            raise BequestError(f"{png} already exists; pass --overwrite to replace it or choose another file")
        if not png.parent.is_dir():
            raise BequestError(f"{png.parent}: no such folder for the PNG; create it or choose another file")
    graph = scan(r.dirs)
    if r.png:
        draw(graph, r.png)
    out = graph.as_dict()
    print(json.dumps(out, indent=1) if r.json else graph.text())
    return out
