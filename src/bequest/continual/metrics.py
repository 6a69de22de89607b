"""What a stream of tasks did to the model: average and last-task accuracy, backward and forward transfer,
forgetting, a heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def continual_metrics(matrix, initial=None) -> dict:
    """The figures of an accuracy matrix. R[i][j] is the accuracy on task j after training task i (square,
    T x T, tasks in training order); `initial`, b[j], is the accuracy on task j before any training.

    - average_accuracy (ACC): the mean of the last row, how well the final model does on every task.
    - last_task_accuracy: R[T-1][T-1], how well the final model learnt the task it was trained on last.
    - bwt (backward transfer): the mean over j < T-1 of R[T-1][j] - R[j][j], how much a task's accuracy
      moved between learning it and the end of the stream; negative when later tasks overwrote it.
    - forgetting: the mean over j < T-1 of max_{i < T-1} R[i][j] - R[T-1][j], how far each earlier task
      fell from the best it ever reached.
    - fwt (forward transfer, as GEM defines it): the mean over j >= 1 of R[j-1][j] - b[j], what training on
      the tasks before j did for task j before the model saw any of it, against the model as it started.
      Under `--classify head` a task's own head rows are untrained until its turn, so there it measures what
      the shared body did for a head that is still random.

    With one task there is nothing to forget or transfer: bwt, forgetting and fwt are None; fwt is None too
    without `initial`.
    """
    r = np.asarray(matrix, dtype=float)
    last = r.shape[0] - 1
    out = {"average_accuracy": float(r[last].mean()), "last_task_accuracy": float(r[last, last]),
           "bwt": None, "forgetting": None, "fwt": None}
    if last > 0:
        out["bwt"] = float(np.mean([r[last, j] - r[j, j] for j in range(last)]))
        out["forgetting"] = float(np.mean([r[:last, j].max() - r[last, j] for j in range(last)]))
        if initial is not None:
            b = np.asarray(initial, dtype=float)
            out["fwt"] = float(np.mean([r[j - 1, j] - b[j] for j in range(1, last + 1)]))
    return out


def heatmap(matrix, tasks: list[str], path: Path, title: str, initial=None) -> None:
    """The accuracy matrix as a colour grid with its values written in (Agg canvas, no pyplot state); with
    `initial`, a first row of the accuracies before any training."""
    from matplotlib.figure import Figure

    rows = ([initial] if initial is not None else []) + list(matrix)
    r = np.asarray(rows, dtype=float) * 100
    fig = Figure(figsize=(1.1 * len(tasks) + 2.5, 0.9 * len(rows) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            ax.text(j, i, f"{r[i, j]:.0f}", ha="center", va="center", color="white" if r[i, j] < 60 else "black")
    if initial is not None:
        ax.axhline(0.5, color="white", lw=3)  # the untrained model, apart from the rows of training
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), (["before training"] if initial is not None else []) + tasks)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
