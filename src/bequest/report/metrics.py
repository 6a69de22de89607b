"""Reading what the verbs write (metrics.jsonl, eval.json and the other JSON records), and the figures
derived from it: the FLOPs at which a loss curve reaches a target, the step at which an accuracy curve
does. Every number a report shows comes through here, formatted by `fmt`."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_json(path: Path) -> dict:
    """A JSON record as a mapping; {} when the file is absent (a report shows what is there)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def rows(folder: Path) -> list[dict]:
    """metrics.jsonl of a training run: one row per log or evaluation."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def runs_under(folder: Path) -> list[tuple[str, list[dict]]]:
    """(name, rows) of every run in a folder's subfolders (an inherit chain's generations, a stream's tasks
    or stages), in their order."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / "metrics.jsonl").is_file()]
    found.sort(key=lambda p: (int(p.name.split("-")[0]) if p.name.split("-")[0].isdigit() else math.inf, p.name))
    return [(p.name, rows(p)) for p in found]


def series(log: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, key) at every row that has `key`; one point per x (the last logged: the final evaluation repeats
    the last scheduled one)."""
    points = {r[x]: r[key] for r in log if key in r and x in r}
    return sorted(points.items())


def reach(points: list[tuple[float, float]], target: float, below: bool = True) -> float | None:
    """The first x at which the curve reaches `target` (at or below it for a loss, at or above for an
    accuracy), linearly interpolated between evaluations; None when it never does."""
    def done(y):
        return y <= target + 1e-12 if below else y >= target - 1e-12

    if points and done(points[0][1]):
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if done(y1):
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def first_step(points: list[tuple[float, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy is at least `target` (no interpolation: steps are whole)."""
    return next((int(x) for x, y in points if y >= target - 1e-9), None)


def fmt(value) -> str:
    """A figure as every report prints it: 4 significant digits, 3 for big counts; '—' for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int) and abs(value) < 100_000:
        return str(value)
    if abs(value) >= 100_000:
        return f"{value:.3g}"
    return f"{value:.4g}"


def percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"
