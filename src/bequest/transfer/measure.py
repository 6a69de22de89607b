"""Measure OLD against NEW on the same tokens (docs/methods.md, section 8).

Both base bodies run in fp32, in eval mode and without gradients, on batches of paired token blocks.
A first pass records every block's output on the first `cka_tokens` tokens and matches blocks by
linear CKA (a monotone assignment, `fit.monotone`). A second pass records, through forward hooks on
each block's linear projections, what they read and write, and adds each NEW block's activations and
those of the OLD block it takes after to that site's `Pair`: memory is one batch's activations plus
the Gram matrices, whatever the number of tokens.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack, contextmanager
from functools import partial

import torch

from bequest.anatomy import anatomy
from bequest.transfer.alignment import SITES, WIDENING, Alignment
from bequest.transfer.fit import Pair, cka, monotone
from bequest.transfer.pairs import paired_blocks, shared_vocabulary


def measure(old_model, new_model, old_tokenizer, new_tokenizer, texts: list[str], *, seq_len: int = 64,
            max_tokens: int = 8192, batch_size: int = 8, cka_tokens: int = 2048, ridge: float = 1e-12) -> Alignment:
    """OLD's spaces mapped onto NEW's, measured on `texts` (models as `bequest.io.load_model` gives
    them, any head; only their base bodies run)."""
    start = time.perf_counter()
    anat = anatomy(old_model), anatomy(new_model)
    models = (old_model, new_model)
    vocab = shared_vocabulary(old_tokenizer, new_tokenizer, tuple(len(m.get_input_embeddings().weight) for m in models))
    room = [a.usable_positions for a in anat if a.usable_positions]
    ids = paired_blocks(texts, old_tokenizer, vocab, seq_len=min([seq_len, *room]), max_tokens=max_tokens,
                        least=max(a.hidden for a in anat))
    batches = list(zip(ids[0].split(batch_size), ids[1].split(batch_size)))
    with ExitStack() as stack, torch.no_grad():
        for model in models:
            stack.enter_context(_measuring(model))
        score = _similarity(models, anat, batches, cka_tokens)
        layers = monotone(score)
        pairs = _pairs(models, anat, batches, layers, ridge)
        embed = pairs[(None, "embed")] = Pair(ridge)
        embed.add(*(m.get_input_embeddings().weight[v.to(m.device)] for m, v in zip(models, vocab)))
    pairs = {key: pair.cpu() for key, pair in pairs.items()}
    return Alignment(copy.deepcopy(old_model.config), copy.deepcopy(new_model.config), layers, score, pairs, vocab,
                     ids[0].numel(), time.perf_counter() - start)


def _similarity(models, anat, batches, cka_tokens: int) -> list[list[float]]:
    """[NEW block][OLD block]: linear CKA of the blocks' outputs on the first `cka_tokens` tokens."""
    outputs = []
    for side, (model, a) in enumerate(zip(models, anat)):
        out = [[] for _ in range(a.layers)]
        with _hooked([block.register_forward_hook(partial(_keep_output, rows))
                      for block, rows in zip(_blocks(model, a), out)]):
            seen = 0
            for batch in batches:
                if seen >= cka_tokens:
                    break
                model.base_model(input_ids=batch[side].to(model.device))
                seen += batch[side].numel()
        outputs.append([torch.cat(rows)[:cka_tokens] for rows in out])
    old, new = outputs
    return [[cka(o, n) for o in old] for n in new]


def _pairs(models, anat, batches, layers: list[int], ridge: float) -> dict:
    """Every site's Pair: NEW block j's activations against those of OLD block layers[j]; the final
    hidden state; BERT-likes' pooled units (the pooler applied to every token, as if each were the first)."""
    stores = ({}, {})
    pairs: dict = {}
    hooks = [module.register_forward_hook(partial(_keep_site, store, i, role))
             for model, a, store in zip(models, anat, stores) for (i, role), module in _linears(model, a).items()]
    poolers = [_pooler(model, a) for model, a in zip(models, anat)]
    with _hooked(hooks):
        for batch in batches:
            finals = []
            for model, store, ids in zip(models, stores, batch):
                store.clear()
                finals.append(model.base_model(input_ids=ids.to(model.device))[0])
            for j, a in enumerate(layers):
                for site in SITES_MEASURED:
                    if (a, site) in stores[0] and (j, site) in stores[1]:
                        pairs.setdefault((j, site), Pair(ridge)).add(stores[0][(a, site)], stores[1][(j, site)])
            pairs.setdefault((None, "final"), Pair(ridge)).add(*finals)
            if all(poolers):
                pooled = [p(h.reshape(-1, 1, h.shape[-1])) for p, h in zip(poolers, finals)]
                pairs.setdefault((None, "pool"), Pair(ridge)).add(*pooled)
    return pairs


SITES_MEASURED = sorted({site for out, inp in SITES.values() for site in out + inp})


def _keep_output(rows: list, module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    rows.append(hidden.detach().reshape(-1, hidden.shape[-1]).cpu())


def _keep_site(store: dict, layer: int, role: str, module, args, output):
    writes, (reads,) = SITES[role]
    store.setdefault((layer, reads), args[0].detach())
    if role not in WIDENING:
        for site, part in zip(writes, output.detach().chunk(len(writes), dim=-1)):  # fused qkv: [q | k | v]
            store[(layer, site)] = part


def _blocks(model, a) -> list[torch.nn.Module]:
    names = a.names(n for n, _ in model.named_parameters())
    suffix = "." + a.family.layer["attn.o"] + ".weight"  # every family's blocks have an output projection
    return [model.get_submodule(names[f"layer.{i}.attn.o.weight"][: -len(suffix)]) for i in range(a.layers)]


def _linears(model, a) -> dict[tuple[int, str], torch.nn.Module]:
    names = a.names(n for n, _ in model.named_parameters())
    return {(i, role): model.get_submodule(names[f"layer.{i}.{role}.weight"].rpartition(".")[0])
            for i in range(a.layers) for role in a.family.layer if role in SITES}


def _pooler(model, a):
    """The module holding the pooler's dense layer and activation (None: the model has no pooler)."""
    name = a.names(n for n, _ in model.named_parameters()).get("pooler.weight")
    return None if name is None else model.get_submodule(name.rpartition(".")[0].rpartition(".")[0])


@contextmanager
def _hooked(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _measuring(model):
    """`model` in eval mode and fp32 for the measurement, as it was afterwards (bf16 -> fp32 -> bf16 is exact)."""
    dtype, training = next(model.parameters()).dtype, model.training
    model.eval()
    if dtype != torch.float32:
        model.float()
    try:
        yield
    finally:
        if dtype != torch.float32:
            model.to(dtype)
        model.train(training)
