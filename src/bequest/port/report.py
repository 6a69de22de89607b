"""The portability study's report: per-condition summaries, verdicts, a table and a plot of accuracy
against fine-tuning steps, written beside the runs (`bequest.port.study`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bequest.peft import KINDS
from bequest.port.carry import INITS


def summary(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (pair, type, init), at the start, the end and over the whole curve."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["type"], row["init"]), []).append(row)
    out = []
    for (pair, kind, init), rs in groups.items():
        cell = {"pair": pair, "type": kind, "init": init, "seeds": len(rs)}
        for key in ("accuracy_start", "accuracy_final", "accuracy_mean"):
            values = [r[key] for r in rs]
            cell[key] = float(np.mean(values))
            cell[key + "_std"] = float(np.std(values))
        out.append(cell)
    return out


def verdicts(cells: list[dict]) -> list[dict]:
    """Per (pair, type): does ported beat scratch and sampled at the end (`final`), and in accuracy
    averaged over the evaluated steps (`mean`)? Both compare means over seeds."""
    by = {(c["pair"], c["type"], c["init"]): c for c in cells}
    out = []
    for pair, kind in sorted({(c["pair"], c["type"]) for c in cells}):
        ported = by.get((pair, kind, "ported"))
        others = [by[(pair, kind, i)] for i in ("scratch", "sampled") if (pair, kind, i) in by]
        if ported and others:
            out.append({"pair": pair, "type": kind,
                        "final": all(ported["accuracy_final"] > o["accuracy_final"] for o in others),
                        "mean": all(ported["accuracy_mean"] > o["accuracy_mean"] for o in others)})
    return out


def _mean_curves(rows: list[dict]) -> dict[tuple, tuple[list, np.ndarray]]:
    curves: dict[tuple, list] = {}
    for row in rows:
        curves.setdefault((row["pair"], row["type"], row["init"]), []).append(row["curve"])
    out = {}
    for key, cs in curves.items():
        steps = [s for s, _ in cs[0]]
        accs = np.array([[a for _, a in c] for c in cs if [s for s, _ in c] == steps])
        out[key] = (steps, accs)
    return out


def plot(rows: list[dict]):
    """Accuracy against fine-tuning steps: a panel per (pair, type), a line per init (mean, min-max band)."""
    from matplotlib.figure import Figure

    pairs = sorted({r["pair"] for r in rows})
    kinds = [k for k in KINDS if any(r["type"] == k for r in rows)]
    fig = Figure(figsize=(3.2 * len(kinds), 2.6 * len(pairs) + 0.4))
    axes = np.array(fig.subplots(len(pairs), len(kinds), squeeze=False, sharey=True))
    colours = {"ported": "tab:green", "scratch": "tab:blue", "sampled": "tab:red"}
    curves = _mean_curves(rows)
    for pair, kind, init in sorted(curves, key=lambda k: (k[0], k[1], INITS.index(k[2]))):
        steps, accs = curves[(pair, kind, init)]
        ax = axes[pairs.index(pair), kinds.index(kind)]
        ax.plot(steps, accs.mean(0), label=init, color=colours.get(init))
        ax.fill_between(steps, accs.min(0), accs.max(0), alpha=0.2, color=colours.get(init))
        ax.set_title(f"{pair}: {kind}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning steps")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def table(cells: list[dict]) -> str:
    lines = ["| pair | type | init | seeds | accuracy at step 0 | final accuracy | mean over the curve |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in sorted(cells, key=lambda c: (c["pair"], list(KINDS).index(c["type"]), INITS.index(c["init"]))):
        lines.append(f"| {c['pair']} | {c['type']} | {c['init']} | {c['seeds']} | "
                     + " | ".join(f"{100 * c[k]:.1f} ± {100 * c[k + '_std']:.1f}"
                                  for k in ("accuracy_start", "accuracy_final", "accuracy_mean")) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict]) -> dict:
    cells = summary(rows)
    wins = verdicts(cells)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    flat = [{k: v for k, v in row.items() if k not in ("curve", "tensors")} for row in rows]
    if flat:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    lines = ["# Portability study", "", f"{len(rows)} runs. Accuracy in %, mean ± std over seeds.", "", table(cells), "",
             "| pair | type | ported beats scratch and sampled: final | over the curve |", "| --- | --- | --- | --- |"]
    lines += [f"| {w['pair']} | {w['type']} | {'yes' if w['final'] else 'no'} | {'yes' if w['mean'] else 'no'} |" for w in wins]
    (out / "report.md").write_text("\n".join(lines) + "\n\n![accuracy against steps](report.png)\n")
    if rows:
        plot(rows).savefig(out / "report.png", dpi=120, bbox_inches="tight")
    return {"runs": len(rows), "summary": cells, "verdicts": wins}
