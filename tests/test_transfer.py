"""Transfer onto an unrelated NEW model: exact where NEW is OLD in other coordinates, a perfect fit on
any other shape, and only through the vocabulary both models share."""

import copy
import functools
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.grow.state import from_roles, to_roles
from bequest.grow.width import Space, axes, gather, is_pooled
from bequest.peft import KINDS, attach, expected, misfits, module_of, new_config, with_module, write_module
from bequest.transfer import measure, transfer_full, transfer_module
from bequest.transfer.fit import Pair, monotone
from conftest import GQA, probe, tiny

EXACT = 1e-4  # max |logits| apart; a transposed map or a swapped block moves them by ~1
WORDS = [f"w{i}" for i in range(120)]
FAMILIES = ["gpt2", "llama", "bert", "roberta"]  # roberta: a classifier with its own dense layer
BIG = {"hidden": 64, "heads": 8, "ffn": 128, "layers": 4}  # twice as wide and deep as tiny's 2 x 32


def word_tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def texts(words=WORDS, n=32, length=64, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def trained(family, seed=0, **shape):
    """A tiny classifier whose weights are off their init (zero biases would make activations rank-deficient)."""
    if family in GQA and "heads" in shape:
        shape.setdefault("kv_heads", shape["heads"] // 2)
    model = tiny(family, "seq_cls", seed=seed, pad_token_id=0, **shape)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def permuted(model, seed=0, rows=None):
    """`model` in other coordinates: hidden units, heads (KV groups kept together), FFN and pooler units
    permuted; the same function. `rows`: the token embedding's rows re-indexed too (NEW id -> OLD id, or
    None for a token OLD lacks, which gets a random row)."""
    a = anatomy(model)
    g = torch.Generator().manual_seed(seed)

    def perm(n):
        return torch.randperm(n, generator=g).tolist()

    group, kv = a.heads // a.kv_heads, perm(a.kv_heads)
    heads = [kv[k] * group + w for k in range(a.kv_heads) for w in perm(group)]
    spaces = {"hidden": Space(perm(a.hidden)), "heads": Space(heads, a.head_dim), "kv_heads": Space(kv, a.head_dim),
              "ffn": Space(perm(a.ffn)), "pool": Space(perm(a.hidden))}
    state = to_roles(dict(model.named_parameters()), a)
    state = {k: gather(t, axes(k, is_pooled(state)), spaces) for k, t in state.items()}
    if rows is not None:
        old = state["embed.token.weight"]
        state["embed.token.weight"] = torch.stack([old[i] if i is not None else torch.randn(old.shape[1], generator=g) * old.std()
                                            for i in rows])
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, t in from_roles(state, anatomy(out), params).items():
            params[name].copy_(t)
    return out.eval()


def tuned_module(model, kind, seed=1, **settings):
    """`model` carrying a module of `kind` with every tensor moved off its init (LoRA B, adapters' up are 0)."""
    torch.manual_seed(seed)
    settings = {"rank": 4, "virtual_tokens": 3, "bottleneck": 8, "style": "houlsby", **settings}
    carrier = with_module(copy.deepcopy(model), new_config(kind, model, **settings))
    with torch.no_grad():
        for p in carrier.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return carrier.eval(), module_of(carrier)


@torch.no_grad()
def apart(a, b, ids=None, ids_b=None):
    ids = probe() if ids is None else ids
    return (a(input_ids=ids).logits - b(input_ids=ids if ids_b is None else ids_b).logits).abs().max().item()


@functools.cache
def twins(family):
    """(OLD, NEW = OLD in other coordinates, their alignment)."""
    old = trained(family)
    new = permuted(old)
    tok = word_tokenizer(WORDS)
    return old, new, measure(old, new, tok, tok, texts(), max_tokens=2048)


@functools.cache
def strangers(family, old_shape=(), new_shape=tuple(BIG.items())):
    """(OLD, NEW initialised independently at another shape, their alignment)."""
    old, new = trained(family, **dict(old_shape)), trained(family, seed=3, **dict(new_shape))
    tok = word_tokenizer(WORDS)
    return old, new, measure(old, new, tok, tok, texts(), max_tokens=2048)


# ---------------------------------------------------------------- exact where NEW is OLD in other coordinates


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_twin_is_matched_block_for_block(family):
    old, new, alignment = twins(family)
    assert apart(old, new) < 1e-5 and not torch.equal(old.get_input_embeddings().weight, new.get_input_embeddings().weight)
    summary = alignment.summary()
    assert summary["layers"] == [0, 1] and summary["old_layers_unused"] == []
    assert all(c > 0.9999 for c in summary["cka"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_module_on_a_permuted_twin_computes_what_it_did_on_old(family, kind):
    old, new, alignment = twins(family)
    carrier, module = tuned_module(old, kind)
    moved, report = transfer_module(module, alignment, new.config)
    assert apart(carrier, old) > 0.1  # the module does something
    assert apart(carrier, attach(copy.deepcopy(new), module)) > 0.01  # loaded as is, in the wrong coordinates
    assert apart(carrier, attach(copy.deepcopy(new), moved)) <= EXACT
    assert report["tensors"]["mapped"] == len(module.tensors) and report["tensors"]["skipped"] == 0
    assert report["r2"]["min"] > 0.9999 and report["layers"] == [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tune_on_a_permuted_twin_computes_what_it_did_on_old(family):
    old, new, alignment = twins(family)
    tuned = copy.deepcopy(old)
    slots = anatomy(tuned).slots(dict(tuned.named_parameters()))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if not slots[name].role.startswith(("norm", "final_norm", "embed.norm")):  # norms have no map
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model, report = transfer_full(tuned, old, new, alignment)
    assert apart(tuned, old) > 0.1
    assert apart(tuned, model) <= EXACT
    assert report["tensors"]["skipped"] == 0 and report["tensors"]["skipped_share"] == 0


def test_full_fine_tune_reports_what_it_cannot_map_with_its_share():
    old, new, alignment = twins("gpt2")
    tuned = copy.deepcopy(old)
    with torch.no_grad():
        tuned.transformer.ln_f.weight.add_(0.5)  # a norm: no map carries it
        tuned.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    _, report = transfer_full(tuned, old, new, alignment)
    skipped = report["tensors"]["skipped_tensors"]
    assert list(skipped) == ["final_norm.weight"] and 0.5 < skipped["final_norm.weight"] < 1
    assert report["tensors"]["skipped_share"] == skipped["final_norm.weight"]


# ---------------------------------------------------------------- another shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_module_fits_a_wider_deeper_stranger_and_loads_with_plain_peft(family, kind, tmp_path):
    from peft import PeftModel

    old, new, alignment = strangers(family)
    _, module = tuned_module(old, kind)
    moved, report = transfer_module(module, alignment, new.config)
    _, want = expected(moved.config, new.config, "seq_cls", 3)
    assert misfits(moved.tensors, want) == []
    assert len(report["layers"]) == 4 and len(report["cka"]) == 4 and report["layers"] == sorted(report["layers"])
    assert -1 < report["r2"]["min"] <= report["r2"]["mean"] <= 1 and report["r2"]["maps"]
    assert all(torch.isfinite(t).all() for t in moved.tensors.values())
    write_module(tmp_path, moved)
    if kind == "bottleneck":  # bequest's own format
        loaded = attach(copy.deepcopy(new), moved)
    else:
        loaded = PeftModel.from_pretrained(copy.deepcopy(new), str(tmp_path)).eval()
    assert apart(loaded, attach(copy.deepcopy(new), moved)) == 0


@pytest.mark.parametrize("kind", ["lora", "ia3", "bottleneck"])
def test_old_blocks_without_a_new_counterpart_are_reported(kind):
    old, new, alignment = strangers("llama", tuple(BIG.items()), ())
    _, module = tuned_module(old, kind)
    moved, report = transfer_module(module, alignment, new.config)
    _, want = expected(moved.config, new.config, "seq_cls", 3)
    assert misfits(moved.tensors, want) == []
    unused = [a for a in range(4) if a not in report["layers"]]
    assert len(report["layers"]) == 2 and report["old_layers_unused"] == unused and len(unused) >= 2
    blocks = {int(k.split("layers.")[1].split(".")[0]) for k in report["tensors"]["skipped_tensors"]}
    assert blocks == set(unused)


def test_full_fine_tune_onto_a_stranger_loads_and_reports():
    old, new, alignment = strangers("gpt2")
    tuned = trained("gpt2", seed=0)  # OLD tuned: OLD plus a delta
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model, report = transfer_full(tuned, old, new, alignment)
    assert type(model) is type(new) and anatomy(model).hidden == 64 and model.config.num_labels == 3
    assert torch.isfinite(model(input_ids=probe()).logits).all()
    assert set(report["old_layers_unused"]) == {0, 1} - set(report["layers"])
    assert 0 < report["tensors"]["skipped_share"] < 1  # norms at least


def test_blocks_sharing_one_old_block_split_its_additive_effect():
    old, new, alignment = strangers("gpt2", (("layers", 1),), (("layers", 2),))
    assert alignment.layers == [0, 0]
    _, module = tuned_module(old, "bottleneck")
    moved, _ = transfer_module(module, alignment, new.config)
    key = "transformer.h.{}.mlp.c_proj.adapter.up.weight"
    for j in (0, 1):
        s = alignment.pair(j, "mlp.out").forward
        assert torch.allclose(moved.tensors[key.format(j)].double(), s.T @ module.tensors[key.format(0)].double() / 2)


def test_a_module_on_named_blocks_lands_on_the_new_blocks_that_take_after_them():
    old, new, alignment = strangers("gpt2")
    carrier = with_module(copy.deepcopy(old), {**new_config("lora", old, rank=4), "target_modules": ["h.0.attn.c_attn", "h.1.mlp.c_fc"]})
    moved, _ = transfer_module(module_of(carrier), alignment, new.config)
    assert sorted(moved.config["target_modules"]) == sorted(
        [f"h.{j}.attn.c_attn" for j, a in enumerate(alignment.layers) if a == 0]
        + [f"h.{j}.mlp.c_fc" for j, a in enumerate(alignment.layers) if a == 1])


# ---------------------------------------------------------------- vocabularies


def test_different_tokenizers_are_measured_on_the_tokens_they_share():
    old_words, new_words = WORDS, [f"w{i}" for i in range(60, 180)]  # w60..w119 shared, under other ids
    old_tok, new_tok = word_tokenizer(old_words), word_tokenizer(new_words)
    old = trained("gpt2")
    new = permuted(old, rows=[old_tok.get_vocab().get(w) for w in new_words])
    shared = texts(old_words[60:])
    alignment = measure(old, new, old_tok, new_tok, shared, max_tokens=2048)
    assert alignment.summary()["shared_vocabulary"] == 60
    line = shared[0].split()[:12]
    ids_old, ids_new = (torch.tensor([t.convert_tokens_to_ids(line)]) for t in (old_tok, new_tok))
    assert apart(old, new, ids_old, ids_new) < 1e-5
    for kind in ("prompt", "lora"):  # the embedding map over the shared rows; activations on shared text
        carrier, module = tuned_module(old, kind)
        moved, _ = transfer_module(module, alignment, new.config)
        assert apart(carrier, attach(copy.deepcopy(new), moved), ids_old, ids_new) <= EXACT


def test_no_shared_vocabulary_is_a_one_line_error_pointing_at_distill():
    old, new = trained("gpt2"), trained("gpt2", seed=1)
    with pytest.raises(BequestError, match="share no vocabulary.*--method distill"):
        measure(old, new, word_tokenizer(WORDS), word_tokenizer([f"v{i}" for i in range(120)]), texts())
    with pytest.raises(BequestError, match="needs at least 32.*--method distill"):  # shared words, but not in the text
        measure(old, new, word_tokenizer(WORDS), word_tokenizer(WORDS[:60] + [f"v{i}" for i in range(60)]), texts(WORDS[60:]))


# ---------------------------------------------------------------- the statistics


def test_pair_recovers_an_invertible_map_both_ways_and_layers_align_monotonically():
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(500, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    pair = Pair(ridge=1e-12)
    pair.add(x[:300], (x @ m)[:300])
    pair.add(x[300:], (x @ m)[300:])
    assert torch.allclose(pair.forward, m, atol=1e-8) and torch.allclose(pair.backward, torch.linalg.inv(m), atol=1e-8)
    assert pair.r2_forward > 1 - 1e-12 and pair.r2_backward > 1 - 1e-12
    assert torch.allclose(pair.scale(torch.zeros(6)), torch.zeros(6, dtype=torch.float64))  # no change stays none
    assert monotone([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.1, 0.9, 0.2]]) == [0, 1, 1]  # greedy: 0, 2, back to 1
    assert monotone([[0.1, 0.9], [0.2, 0.5], [0.3, 0.4], [0.9, 0.1]]) == [1, 1, 1, 1]


def test_pair_does_not_amplify_what_the_text_rarely_visits():
    # Between unrelated models the fit is partial; a direction OLD barely uses must not map with a
    # huge gain (plain least squares: 190 here), or a task delta written there explodes on NEW.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    x[:, 5] *= 1e-4
    y = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) + torch.randn(4000, 6, generator=g, dtype=torch.float64)
    pair = Pair(ridge=1e-12)
    pair.add(x, y)
    assert pair.forward[5].norm() < 1 and 0.3 < pair.r2_forward < 0.95


def test_a_module_trained_on_another_model_is_refused():
    old, new, alignment = twins("gpt2")
    _, module = tuned_module(trained("gpt2", hidden=48, heads=6), "lora")
    with pytest.raises(BequestError, match="does not fit OLD"):
        transfer_module(module, alignment, new.config)


# ---------------------------------------------------------------- across families


def test_modules_cross_families_of_one_layout_and_full_fine_tunes_cross_any():
    tok = word_tokenizer(WORDS)
    llama, qwen = trained("llama"), trained("qwen2", seed=3, **BIG)
    alignment = measure(llama, qwen, tok, tok, texts(), max_tokens=1024)
    _, module = tuned_module(llama, "lora")
    moved, _ = transfer_module(module, alignment, qwen.config)
    assert misfits(moved.tensors, expected(moved.config, qwen.config, "seq_cls", 3)[1]) == []
    gpt2 = trained("gpt2", seed=3, **BIG)
    alignment = measure(llama, gpt2, tok, tok, texts(), max_tokens=1024)
    with pytest.raises(BequestError, match="from llama to gpt2.*--method distill"):
        transfer_module(module, alignment, gpt2.config)
    tuned = copy.deepcopy(llama)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model, report = transfer_full(tuned, llama, gpt2, alignment)
    assert type(model) is type(gpt2) and torch.isfinite(model(input_ids=probe()).logits).all()
    assert "layer.0.mlp.gate.weight" in report["tensors"]["skipped_tensors"]  # GPT-2 has no gate to carry it
