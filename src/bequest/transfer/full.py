"""A full fine-tune carried onto an unrelated NEW model (docs/methods.md, section 8).

The task delta of every tensor (tuned - OLD base, matched by anatomy slot) is carried into NEW's
coordinates and added to NEW's own weights: a block projection's through the maps of what it reads
and writes (`dW_new = S^T dW R^T`, its bias `S^T db`), split evenly over the NEW blocks that take after
one OLD block; the embeddings' row by row (tokens over the shared vocabulary, positions and token
types by index) through the embedding map; an untied LM head that reads the final hidden state
likewise. The task head (classifier, its dense layer, BERT's pooler) is carried whole, as recycling
carries it. What has no map (norms, rows outside the shared vocabulary, OLD blocks no NEW block takes
after) is left out and reported with its share of the delta's norm.
"""

from __future__ import annotations

import copy
import time

import torch

from bequest.anatomy import TASK_ROLES, anatomy, build_model
from bequest.grow.state import from_roles, join_key, split_key, to_roles
from bequest.transfer.alignment import READ, SITES, WRITE, Alignment, head_axes, report

# Tables whose rows are tokens (paired through the shared vocabulary) or indices (paired as they are);
# an LM head reading the final hidden state is one, BERT's (behind its own dense layer) is not.
ROWS = {"embed.token": "vocab", "lm_head": "vocab", "embed.position": "index", "embed.type": "index"}


def transfer_full(tuned, old_base, new_base, alignment: Alignment) -> tuple[torch.nn.Module, dict]:
    """(NEW with `tuned`'s head and its task delta carried over, the report). `new_base` is NEW as it
    will be used: its body, or the whole LM when the fine-tune tunes a pre-trained LM head (a head NEW
    is given without is built fresh, and counted as such)."""
    start = time.perf_counter()
    task = anatomy(tuned).task
    tuned_s, old_s, new_s = (to_roles(dict(m.named_parameters()), anatomy(m)) for m in (tuned, old_base, new_base))
    model = build_model(_config(new_base.config, tuned.config, task), task)
    anat = anatomy(model, task)
    params = dict(model.named_parameters())
    state = to_roles(params, anat)
    delta = {k: (tuned_s[k] - old_s[k]).double() for k in tuned_s
             if k in old_s and tuned_s[k].shape == old_s[k].shape and split_key(k)[1] not in TASK_ROLES}
    carried = {split_key(k)[1] for k in tuned_s if split_key(k)[1] in TASK_ROLES}
    fits, moved, counts = {}, {}, {"mapped": 0, "kept": 0, "fresh": 0}
    for key in state:
        layer, role, kind = split_key(key)
        if role in TASK_ROLES and key in tuned_s:  # the head, whole
            state[key] = alignment.carry(tuned_s[key].double(), head_axes(anat.family, role, kind, carried), None, fits).float()
            counts["mapped"] += 1
            continue
        if key not in new_s:  # a head the tuned model lacks: as the fresh model holds it
            counts["fresh"] += 1
            continue
        source = key if layer is None else join_key(alignment.layers[layer], role, kind)
        change = _carry(key, new_s[key].shape, delta.get(source), alignment, anat, fits, moved, source)
        state[key] = new_s[key] + (0 if change is None else change.float())
        counts["mapped" if change is not None else "kept"] += 1
    total = sum(d.square().sum() for d in delta.values())
    lost = {k: d.square().sum() - moved.get(k, 0.0) for k, d in delta.items()}
    skipped = {k: round(float((v / total).clamp_min(0).sqrt()), 4) for k, v in lost.items() if v > 1e-12 * total}
    with torch.no_grad():
        for name, t in from_roles(state, anat, params).items():
            params[name].copy_(t)
    like = next(new_base.parameters())
    model = model.to(like.device, like.dtype).eval()
    counts.update(skipped=len(skipped), skipped_tensors=skipped,
                  skipped_share=round(float((sum(lost.values()) / total).clamp_min(0).sqrt()), 4) if total > 0 else 0.0)
    return model, {"type": "full", **report(alignment, fits, counts, time.perf_counter() - start)}


def _carry(key: str, shape, d, alignment: Alignment, anat, fits: dict, moved: dict, source: str):
    """The delta `d` of OLD's `source` tensor in the coordinates of NEW's `key` of `shape` (None: no
    map for it); `moved[source]` gets the squared norm of the part carried."""
    if d is None:
        return None
    layer, role, kind = split_key(key)
    if role in SITES:
        writes, reads = SITES[role]
        axes = [(writes, WRITE), (reads, READ)] if kind == "weight" else [(writes, WRITE)]
        share = alignment.sharing(layer)
        moved[source] = moved.get(source, 0.0) + d.square().sum() / share
        return alignment.carry(d, axes, layer, fits) / share
    if role in ROWS and not (role == "lm_head" and "lm_head.dense" in anat.family.heads):
        if ROWS[role] == "vocab":
            old_ids, new_ids = alignment.vocab
        else:
            old_ids = new_ids = torch.arange(min(len(d), shape[0]))
        rows = d[old_ids]
        axes = [None, (("embed",), WRITE)] if role.startswith("embed") else [None, (("final",), READ)]
        out = torch.zeros(shape, dtype=d.dtype)
        out[new_ids] = alignment.carry(rows, axes[: d.ndim], None, fits)
        moved[source] = rows.square().sum()
        return out
    return None


def _config(new, tuned, task: str):
    """NEW's config with the tuned model's labels."""
    config = copy.deepcopy(new)
    if task == "seq_cls":
        config.num_labels = tuned.num_labels
        config.id2label, config.label2id = dict(tuned.id2label), dict(tuned.label2id)
    return config
