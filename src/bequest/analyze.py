"""`bequest analyze`: how two models relate (docs/methods.md, section 3.3), as KIND.json + KIND.png.

- lmc: linear mode connectivity. Loss and accuracy of theta(l) = (1 - l) theta_a + l theta_b on a task's
  validation set at `points` values of l in [0, 1]; the barrier is the largest rise of the loss above
  the straight line between the endpoints (about 0: the two minima are linearly connected).
- weights: L2 distance and cosine similarity of the two weight vectors, overall and per block.
- similarity: functional similarity. Linear CKA (Kornblith et al. 2019) between every layer of a and
  every layer of b, on the same inputs: of hidden states (one row per token) or of head-averaged
  attention patterns (one row per query token), drawn as a heat map.

Parameters are matched by anatomy slot, so an LM and a classifier of the same shape can be compared.
"""

from __future__ import annotations

import copy
import json
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from pydantic import Field

from bequest.anatomy import anatomy
from bequest.data.prepare import task_splits
from bequest.engine.data import labelled
from bequest.errors import BequestError
from bequest.io import atomic_dir, check_output, load_model, save_recipe
from bequest.transfer.fit import cka
from bequest.recipe import ModelFolder, OutputFields, TaskFields

Kind = Literal["lmc", "weights", "similarity"]


class AnalyzeRecipe(TaskFields, OutputFields):
    kind: Kind = Field(
        "lmc", description="lmc (loss along the line a -> b), weights (distance, cosine), similarity (CKA heat map)"
    )
    a: ModelFolder = Field(..., description="first model folder or cached hub id (its tokenizer encodes the inputs)")
    b: ModelFolder = Field(..., description="second model folder or cached hub id, same shape as a")
    out: str = Field(..., description="output folder: KIND.json and KIND.png")
    points: int = Field(21, ge=2, description="values of lambda from 0 to 1 (lmc)")
    features: Literal["hidden", "attention"] = Field("hidden", description="what similarity compares per layer")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")


# ---------------------------------------------------------------- weights


def _slotted(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {str(s): params[n].detach() for n, s in anatomy(model).slots(params).items()}


def shared(a, b) -> list[str]:
    """Slots both models have, with equal shapes; any other mismatch of the common body is an error."""
    sa, sb = _slotted(a), _slotted(b)
    keys = [k for k in sa if k in sb]
    bad = [k for k in keys if sa[k].shape != sb[k].shape]
    if bad:
        k = bad[0]
        raise BequestError(f"{k} is {list(sa[k].shape)} in a but {list(sb[k].shape)} in b; compare models of one shape")
    return keys


@torch.no_grad()
def interpolate(a, b, lam: float):
    """A copy of `a` with every parameter at (1 - lam) * theta_a + lam * theta_b (lam = 0: a, 1: b, bit for bit)."""
    if set(dict(a.named_parameters())) != set(dict(b.named_parameters())):
        raise BequestError("the two models have different parameters; interpolate two models of one architecture")
    model = copy.deepcopy(a)
    pb = dict(b.named_parameters())
    for name, p in model.named_parameters():
        if p.shape != pb[name].shape:
            raise BequestError(f"{name} is {list(p.shape)} in a but {list(pb[name].shape)} in b")
        p.copy_((1.0 - lam) * p + lam * pb[name])
    return model


def weight_stats(a, b) -> dict:
    sa, sb = _slotted(a), _slotted(b)
    keys = shared(a, b)

    def stats(ks):
        x = torch.cat([sa[k].flatten().double() for k in ks])
        y = torch.cat([sb[k].flatten().double() for k in ks])
        return {"l2": float((x - y).norm()), "relative_l2": float((x - y).norm() / x.norm().clamp_min(1e-30)),
                "cosine": float(F.cosine_similarity(x, y, dim=0))}

    layers = sorted({int(k.split(".")[1]) for k in keys if k.startswith("layer.")})
    per_layer = [{"layer": i, **stats([k for k in keys if k.startswith(f"layer.{i}.")])} for i in layers]
    return {"parameters": len(keys), **stats(keys), "per_layer": per_layer}


# ---------------------------------------------------------------- function


def _batches(encoded, tokenizer, size: int):
    pad = transformers.DataCollatorWithPadding(tokenizer)
    for i in range(0, len(encoded), size):
        yield pad([encoded[j] for j in range(i, min(i + size, len(encoded)))])


@torch.no_grad()
def evaluate(model, encoded, tokenizer, batch_size: int = 32) -> dict:
    """Mean cross-entropy and accuracy of a classifier on tokenized labelled examples."""
    model.eval()
    loss = correct = 0.0
    for batch in _batches(encoded, tokenizer, batch_size):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(-1) == labels).sum())
    return {"loss": loss / len(encoded), "accuracy": correct / len(encoded)}


def lmc(a, b, encoded, tokenizer, points: int = 21, batch_size: int = 32) -> dict:
    lambdas = [i / (points - 1) for i in range(points)]
    rows = [{"lambda": lam, **evaluate(interpolate(a, b, lam), encoded, tokenizer, batch_size)} for lam in lambdas]
    ends = rows[0]["loss"], rows[-1]["loss"]
    barrier = max(r["loss"] - ((1 - r["lambda"]) * ends[0] + r["lambda"] * ends[1]) for r in rows)
    return {"points": rows, "loss_barrier": barrier,
            "accuracy_drop": min(rows[0]["accuracy"], rows[-1]["accuracy"]) - min(r["accuracy"] for r in rows)}


@torch.no_grad()
def representations(model, encoded, tokenizer, features: str = "hidden", batch_size: int = 32) -> list[torch.Tensor]:
    """One [tokens, dim] matrix per layer: hidden states (embeddings first) or head-averaged attention rows."""
    model.eval()
    if features == "attention":
        model.set_attn_implementation("eager")  # fused kernels do not return attention weights
    layers: list[list[torch.Tensor]] = []
    width = max(len(x) for x in encoded["input_ids"])  # attention rows padded to this, so batches stack
    for batch in _batches(encoded, tokenizer, batch_size):
        batch.pop("labels", None)
        out = model(**batch, output_hidden_states=features == "hidden", output_attentions=features == "attention")
        keep = batch["attention_mask"].bool()
        if features == "hidden":
            per = [h[keep] for h in out.hidden_states]
        else:
            per = [F.pad(att.mean(1), (0, width - att.shape[-1]))[keep] for att in out.attentions]
        layers = layers or [[] for _ in per]
        for i, t in enumerate(per):
            layers[i].append(t.float())
    return [torch.cat(t) for t in layers]


def similarity(a, b, encoded, tokenizer, features: str = "hidden", batch_size: int = 32) -> list[list[float]]:
    ra = representations(a, encoded, tokenizer, features, batch_size)
    rb = representations(b, encoded, tokenizer, features, batch_size)
    return [[cka(x, y) for y in rb] for x in ra]


# ---------------------------------------------------------------- the verb


def _plot(kind: str, result: dict, r: AnalyzeRecipe):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if kind == "lmc":
        lam = [p["lambda"] for p in result["points"]]
        ax.plot(lam, [p["loss"] for p in result["points"]], "o-", color="C0")
        ax.set(xlabel="lambda (0: a, 1: b)", ylabel="loss", title=f"linear mode connectivity on {r.data}")
        acc = ax.twinx()
        acc.plot(lam, [p["accuracy"] for p in result["points"]], "s--", color="C1")
        acc.set_ylabel("accuracy", color="C1")
    elif kind == "weights":
        rows = result["per_layer"]
        ax.bar([row["layer"] for row in rows], [row["cosine"] for row in rows])
        ax.set(xlabel="block", ylabel="cosine(theta_a, theta_b)", title=f"overall cosine {result['cosine']:.3f}")
    else:
        m = result["matrix"]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="linear CKA")
        first = "embeddings, then blocks" if r.features == "hidden" else "blocks"
        ax.set(xlabel=f"b layer ({first})", ylabel=f"a layer ({first})", title=f"{r.features} similarity on {r.data}")
    return fig


def analyze(r: AnalyzeRecipe) -> dict:
    """Compare two models: linear mode connectivity, weight distance, or per-layer functional similarity."""
    check_output(r.out, r.overwrite)
    a, tokenizer = load_model(r.a)
    b, _ = load_model(r.b, with_tokenizer=False)
    if tokenizer is None:
        raise BequestError(f"{r.a} has no tokenizer.json; the inputs are encoded with a's tokenizer")
    if r.kind == "weights":
        result = weight_stats(a, b)
    else:
        _, texts = task_splits(r.data, eval_examples=r.eval_examples, files=r)
        encoded = labelled(texts, tokenizer, r.max_len)
        if r.kind == "lmc":
            for path, m in ((r.a, a), (r.b, b)):
                if anatomy(m).task != "seq_cls":
                    raise BequestError(f"{path} is a {anatomy(m).task} model; lmc compares two classifiers")
            result = lmc(a, b, encoded, tokenizer, r.points, r.batch_size)
        else:
            result = {"features": r.features, "matrix": similarity(a, b, encoded, tokenizer, r.features, r.batch_size)}
            result["diagonal"] = [row[i] for i, row in enumerate(result["matrix"]) if i < len(row)]
    result = {"kind": r.kind, "a": r.a, "b": r.b, **result}
    fig = _plot(r.kind, result, r)
    with atomic_dir(r.out, r.overwrite) as folder:
        (folder / f"{r.kind}.json").write_text(json.dumps(result, indent=1))
        fig.savefig(folder / f"{r.kind}.png", dpi=120, bbox_inches="tight")
        save_recipe(folder, r.model_dump(exclude={"overwrite"}))
    if r.kind == "lmc":
        summary = f"loss barrier {result['loss_barrier']:.4f}"
    elif r.kind == "weights":
        summary = f"L2 {result['l2']:.4g}, cosine {result['cosine']:.4f}"
    else:
        summary = f"mean diagonal CKA {sum(result['diagonal']) / max(len(result['diagonal']), 1):.3f}"
    print(f"saved {r.out}: {summary}")
    return result
