"""`write_report(folder)`: report.md (its own figures beside it in report-figures/) and report.html (the
same, every figure embedded as a data: URI, so the one file is the whole report), each replaced whole."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from bequest.report.document import document
from bequest.report.render import html, markdown

FIGURES = "report-figures"


def write_report(folder: str | Path, name: str | None = None) -> Path:
    """Write the report of the output folder `folder` (`name`: how its title names it, default the folder's
    name); return report.html's path."""
    folder = Path(folder)
    doc = document(folder, str(name or folder.name), FIGURES)
    _replace_figures(folder / FIGURES, {f.src: f.data for f in doc.figures() if f.src.startswith(FIGURES + "/")})
    _write(folder / "report.md", markdown(doc))
    _write(folder / "report.html", html(doc))
    return folder / "report.html"


def _replace_figures(where: Path, figures: dict[str, bytes]) -> None:
    """The report's own figures folder, swapped in whole: a reader never sees half of an old and a new one."""
    fresh = where.with_name(f".{where.name}.tmp-{uuid.uuid4().hex[:8]}")
    if figures:
        fresh.mkdir()
        for src, data in figures.items():
            (fresh / Path(src).name).write_bytes(data)
    old = where.with_name(f".{where.name}.old-{uuid.uuid4().hex[:8]}")
    if where.exists():
        os.replace(where, old)
    if figures:
        os.replace(fresh, where)
    shutil.rmtree(old, ignore_errors=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
