"""What a stream of tasks did to the model: average accuracy, backward transfer, forgetting, a heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def continual_metrics(matrix) -> dict:
    """Average accuracy after the last task, backward transfer and forgetting of an accuracy matrix.

    R[i][j] is the accuracy on task j after training task i (square, T x T). BWT = mean over j < T-1 of
    R[T-1][j] - R[j][j]; forgetting = mean over j < T-1 of max_{i < T-1} R[i][j] - R[T-1][j]. With one
    task there is nothing to forget: both are None.
    """
    r = np.asarray(matrix, dtype=float)
    last = r.shape[0] - 1
    out = {"average_accuracy": float(r[last].mean()), "bwt": None, "forgetting": None}
    if last > 0:
        out["bwt"] = float(np.mean([r[last, j] - r[j, j] for j in range(last)]))
        out["forgetting"] = float(np.mean([r[:last, j].max() - r[last, j] for j in range(last)]))
    return out


def heatmap(matrix, tasks: list[str], path: Path, title: str) -> None:
    """The accuracy matrix as a colour grid with its values written in (Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure

    r = np.asarray(matrix, dtype=float) * 100
    fig = Figure(figsize=(1.1 * len(tasks) + 2.5, 0.9 * len(tasks) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            ax.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="white" if r[i, j] < 60 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
