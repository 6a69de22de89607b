"""OLD's spaces mapped onto NEW's: which OLD block each NEW block takes after, and a fitted pair of maps
for every site a module or a fine-tune touches (docs/methods.md, section 8).

A site is an activation named by what it holds, the same in every family: what a block's attention
projections read (`attn.in`), what q, k and v write, what the output projection reads and writes
(`attn.mix`, `attn.out`), what the MLP reads, its units after the activation (`mlp.act`) and what it
writes back; outside the blocks the token embeddings over the shared vocabulary (`embed`), the final
hidden state (`final`) and BERT's pooled units (`pool`).

A tensor axis that READS a site is carried by R (NEW -> OLD): a reader of OLD's coordinates then
reads NEW's, `A_new = A R^T`. One that WRITES it is carried by S (OLD -> NEW): `B_new = S^T B`. One
that SCALES it (IA3) is refitted per feature (`Pair.scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bequest.errors import BequestError
from bequest.peft.kind import READ, SCALE, WRITE
from bequest.transfer.fit import Pair

# A block's linear role -> (sites its output writes, the site its input reads). GPT-2's fused qkv
# writes three sites; gate and up write the FFN's units, which are measured where mlp.down reads them.
SITES = {
    "attn.q": (("attn.q",), ("attn.in",)),
    "attn.k": (("attn.k",), ("attn.in",)),
    "attn.v": (("attn.v",), ("attn.in",)),
    "attn.qkv": (("attn.q", "attn.k", "attn.v"), ("attn.in",)),
    "attn.o": (("attn.out",), ("attn.mix",)),
    "mlp.gate": (("mlp.act",), ("mlp.in",)),
    "mlp.up": (("mlp.act",), ("mlp.in",)),
    "mlp.down": (("mlp.out",), ("mlp.act",)),
}
# A widening projection's outputs span at most its input's width, too few directions to fit a map of
# all its units; the units after the activation span them all.
WIDENING = {"mlp.gate", "mlp.up"}


@dataclass
class Alignment:
    old: object  # OLD's config
    new: object  # NEW's config
    layers: list[int]  # NEW block j takes after OLD block layers[j]
    cka: list[list[float]]  # [NEW block][OLD block]: linear CKA of the blocks' outputs
    pairs: dict[tuple[int | None, str], Pair]  # (NEW block or None, site) -> its paired activations
    vocab: tuple[torch.Tensor, torch.Tensor]  # the shared vocabulary: OLD ids, NEW ids
    tokens: int  # paired tokens measured
    seconds: float

    @property
    def unused(self) -> list[int]:
        """OLD blocks no NEW block takes after: what they did is not carried anywhere."""
        return [a for a in range(len(self.cka[0])) if a not in self.layers]

    def sharing(self, layer: int) -> int:
        """How many NEW blocks take after the OLD block NEW block `layer` takes after."""
        return self.layers.count(self.layers[layer])

    def pair(self, layer: int | None, site: str) -> Pair:
        pair = self.pairs.get((layer, site))
        if pair is None:
            where = "" if layer is None else f"block {layer}'s "
            raise BequestError(f"NEW has no {where}{site} to map onto (OLD has one); transfer needs both models to have it, "
                               "or use --method distill")
        return pair

    def carry(self, t: torch.Tensor, axes: list, layer: int | None, fits: dict[str, float]) -> torch.Tensor:
        """`t` (fp64) with every axis (sites, side) carried into NEW's coordinates; the R^2 of each map
        used goes into `fits`. An axis over several sites (fused qkv) is carried part by part."""
        for dim, ax in enumerate(axes):
            if ax is None:
                continue
            sites, side = ax
            pairs = [self.pair(layer, s) for s in sites]
            parts = t.split([p.widths[0] for p in pairs], dim)
            t = torch.cat([_carry(part, dim, p, side) for part, p in zip(parts, pairs)], dim)
            where = "" if layer is None else f"layer.{layer}."
            for site, p in zip(sites, pairs):
                read = side == READ
                fits[f"{where}{site} {'new->old' if read else 'old->new'}"] = p.r2_backward if read else p.r2_forward
        return t

    def summary(self) -> dict:
        return {"layers": list(self.layers), "cka": [round(self.cka[j][a], 4) for j, a in enumerate(self.layers)],
                "old_layers_unused": self.unused, "tokens": self.tokens, "shared_vocabulary": len(self.vocab[0]),
                "measure_seconds": round(self.seconds, 2)}


def _carry(t: torch.Tensor, dim: int, pair: Pair, side: str) -> torch.Tensor:
    if side == SCALE:  # a vector [n, 1] or [1, n] scaling the site's features
        shape = list(t.shape)
        shape[dim] = pair.widths[1]
        return (1 + pair.scale(t.reshape(-1) - 1)).reshape(shape)
    m = pair.backward if side == READ else pair.forward.T  # [new, old] either way
    return torch.movedim(torch.tensordot(m, t, dims=([1], [dim])), 0, dim)


def report(alignment: Alignment, fits: dict[str, float], counts: dict, seconds: float) -> dict:
    """The report every transfer returns: the layer assignment and CKA, the maps' R^2, the tensors."""
    values = list(fits.values())
    r2 = {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4)} if values else {}
    return {"mode": "transferred", **alignment.summary(), "r2": {**r2, "maps": {k: round(v, 4) for k, v in fits.items()}},
            "tensors": counts, "seconds": round(seconds, 2)}


def head_axes(fam, role: str, kind: str, carried: set[str]) -> list:
    """Axes of a task head's tensor carried whole (classifier, its dense layer, BERT's pooler): its
    weight reads the final hidden state, or pooled units; the units it writes are labels or its own.
    A classifier reads the units of a pooling layer carried with it as they are, and NEW's own pooler's
    through the `pool` map."""
    if kind != "weight":
        return [None]
    pooled_by = "classifier.dense" if "classifier.dense" in fam.heads else "pooler" if "pooler" in fam.final else None
    if role != "classifier" or pooled_by is None:
        return [None, (("final",), READ)]
    if pooled_by in carried:
        return [None, None]
    if pooled_by == "pooler":
        return [None, (("pool",), READ)]
    raise BequestError("the classifier comes without its dense layer, which it reads; transfer the whole head")


__all__ = ["READ", "SCALE", "SITES", "WIDENING", "WRITE", "Alignment", "head_axes", "report"]
