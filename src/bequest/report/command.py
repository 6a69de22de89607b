"""`bequest report DIR`: (re)build the report of a bequest output folder from the files in it."""

from __future__ import annotations

from pydantic import Field

from bequest.recipe import Recipe
from bequest.report.write import write_report


class ReportRecipe(Recipe):
    dir: str = Field(..., description="a bequest output folder: a model, fine-tune, adapter, upgrade, learn, "
                     "lifelong, inherit or demo output")


def report(r: ReportRecipe) -> str:
    """Write report.md and a self-contained report.html into a bequest output folder, from what it holds."""
    page = write_report(r.dir, r.dir)
    print(f"wrote {page.with_suffix('.md')} and {page}")
    return str(page)
