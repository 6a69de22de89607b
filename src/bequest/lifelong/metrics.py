"""Perplexity per domain, AP and AP+ after every stage, and their plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from bequest.lifelong.prompts import collate


@torch.no_grad()
def perplexity(model, encoded: Dataset, batch_size: int = 16) -> float:
    """exp(mean NLL) over the labelled tokens of `encoded`."""
    mode = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = collate([encoded[j] for j in range(i, min(i + batch_size, len(encoded)))])
        logits = model(input_ids=b["input_ids"].to(device)).logits[:, :-1].float()
        labels = b["labels"][:, 1:].to(device)
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += (labels != -100).sum().item()
    model.train(mode)
    return math.exp(min(nll / count, 50.0))


def stage_metrics(ppl: list[dict], domains: list[str]) -> list[dict]:
    """AP and AP+ after every stage from ppl[k][domain] (see the package docstring)."""
    out = []
    for k in range(len(ppl)):
        ap = float(np.mean([ppl[k][d] for d in domains[: k + 1]]))
        plus = float(np.mean([ppl[k][d] - ppl[j][d] for j, d in enumerate(domains[:k])])) if k else None
        out.append({"AP": ap, "AP+": plus})
    return out


def plot(metrics: dict, folder: Path) -> None:
    """ap.png (AP and AP+ per stage) and domains.png (each domain's perplexity per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, names = metrics["stages"], metrics["domains"]
    x = range(len(stages))
    ticks = [f"{k}:{n}" for k, n in enumerate(names)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(x, [s["AP"] for s in stages], "o-")
    ax[0].set(title=f"AP ({metrics['method']})", xlabel="after stage", ylabel="mean perplexity, seen domains")
    ax[1].plot(x[1:], [s["AP+"] for s in stages[1:]], "o-", color="C3")
    ax[1].set(title="AP+ (forgetting)", xlabel="after stage", ylabel="mean ppl increase, earlier domains")
    for a in ax:
        a.set_xticks(list(x), ticks, rotation=30)
    fig.tight_layout()
    fig.savefig(folder / "ap.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, name in enumerate(names):
        ax.plot(range(j, len(stages)), [s["ppl"][name] for s in stages[j:]], "o-", label=name)
    ax.set(xlabel="after stage", ylabel="validation perplexity", yscale="log", title="per-domain perplexity")
    ax.set_xticks(list(x), ticks, rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "domains.png", dpi=100)
    plt.close("all")
