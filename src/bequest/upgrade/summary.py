"""OUT/summary.{md,csv,json,png}: per source the path taken and its accuracy on OLD, on NEW at step 0
and after tuning, beside a fresh module's when one was tuned."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

COLUMNS = ["source", "kind", "relation", "path", "status", "acc_old", "acc_step0", "acc_final", "fresh_step0",
           "fresh_final", "steps", "steps_to_fresh_best", "fresh_steps_to_best", "seconds", "fresh_seconds", "reason"]


def reached(curve: list, target: float) -> int | None:
    """The first evaluated step whose accuracy is at least `target` (None: never)."""
    return next((step for step, acc in curve if acc >= target - 1e-9), None)


def flat(row: dict) -> dict:
    """A summary row of one source's report."""
    out = {k: row.get(k) for k in COLUMNS}
    fresh = row.get("fresh")
    if fresh:
        best = max(acc for _, acc in fresh["curve"])
        out.update(fresh_step0=fresh["acc_step0"], fresh_final=fresh["acc_final"], fresh_seconds=fresh["tune_seconds"],
                   fresh_steps_to_best=reached(fresh["curve"], best),
                   steps_to_fresh_best=reached(row.get("curve", []), best))
    return out


def write_summary(out: Path, rows: list[dict], header: dict) -> None:
    table = [flat(row) for row in rows]
    _write(out / "summary.json", json.dumps({**header, "sources": rows}, indent=1, default=str))
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    _write(out / "summary.csv", text.getvalue())
    _write(out / "summary.md", markdown(table, header))
    plot(rows, out / "summary.png")


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "/")


def markdown(table: list[dict], header: dict) -> str:
    shown = [c for c in COLUMNS if any(row.get(c) is not None for row in table)]
    lines = [f"# Upgrade of {header['from']} to {header['to']} ({header['relation']})", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in table]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against tuning steps per source (upgraded vs fresh, OLD's as a line); bars without tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("acc_step0") is not None]
    if not done:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no source was measured (no task data)", ha="center", va="center")
        ax.axis("off")
    else:
        cols = min(4, len(done))
        fig, axes = plt.subplots(math.ceil(len(done) / cols), cols, figsize=(3.2 * cols, 2.6 * math.ceil(len(done) / cols)),
                                 squeeze=False)
        for ax, row in zip(axes.flat, done):
            curve = row.get("curve") or [(0, row["acc_step0"])]
            ax.plot(*zip(*curve), marker=".", label=f"{row['path']}")
            if row.get("fresh"):
                ax.plot(*zip(*row["fresh"]["curve"]), marker=".", color="grey", label="fresh")
            ax.axhline(row["acc_old"], ls="--", color="black", lw=0.8, label="on OLD")
            ax.set_title(f"{Path(row['source']).name} ({row['kind']})", fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.set_ylabel("accuracy", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(done):]:
            ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
