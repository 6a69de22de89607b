import json

import pytest
import torch
import transformers

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.grow import GrowSpec, grow, grow_optimizer_state, max_abs_logit_change
from bequest.grow.command import GrowRecipe, grow_command
from bequest.grow.state import to_roles
from bequest.io import save_model
from conftest import GQA, LM_TASK, probe, tiny

PRE = ["gpt2", "llama", "mistral", "qwen2"]
POST = ["bert", "roberta"]
# 32 -> 48 wide, 4 -> 6 heads, 2 -> 3 KV heads, FFN 64 -> 80, 2 -> 5 layers; and a doubling.
ODD = {"hidden": 48, "heads": 6, "kv_heads": 3, "ffn": 80, "layers": 5}
DOUBLE = {"hidden": 64, "heads": 8, "kv_heads": 4, "ffn": 128, "layers": 4}
EXACT = 1e-5


def trained(family, task="", seed=0, **config):
    """A tiny model whose norms and biases are not at their init values (1 and 0 would hide bugs)."""
    model = tiny(family, task or LM_TASK[family], seed=seed, **config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def shape(family, target, **change):
    target = {**target, **change}
    if family not in GQA:
        target.pop("kv_heads")
    return target


def roles(model, attr=None):
    """The model's parameters (or their .grad) by role, linear weights [out, in], q/k/v split."""
    named = {n: p if attr is None else getattr(p, attr) for n, p in model.named_parameters()}
    return to_roles(named, anatomy(model))


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------- function preservation


@pytest.mark.parametrize("family", PRE)
@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
@pytest.mark.parametrize("target,attn", [(ODD, "eager"), (DOUBLE, "sdpa")])
def test_exact_width_and_identity_depth_keep_the_function(family, task, target, attn):
    model = trained(family, task, pad_token_id=0, attn_implementation=attn)
    grown = grow(model, GrowSpec(**shape(family, target)))
    assert grown.model.config._attn_implementation == attn
    assert anatomy(grown.model).summary()["layers"] == target["layers"]
    assert max_abs_logit_change(model, grown.model, probe()) <= EXACT


@pytest.mark.parametrize(
    "family,config,change",
    [
        ("llama", {"tie_word_embeddings": True}, {}),  # tied: lm_head reads the new embedding columns
        ("qwen2", {"tie_word_embeddings": True}, {}),
        ("llama", {}, {"heads": 8, "kv_heads": 2, "hidden": 64}),  # KV group 2 -> 4: old heads move
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, {}),  # scale follows the layer's new index
        ("gpt2", {}, {"hidden": 32, "heads": 4}),  # depth and FFN only
    ],
)
def test_exact_special_cases(family, config, change):
    model = trained(family, **config)
    grown = grow(model, GrowSpec(**shape(family, ODD, **change)))
    assert anatomy(grown.model).tied == anatomy(model).tied
    assert max_abs_logit_change(model, grown.model, probe()) <= EXACT


@pytest.mark.parametrize("placement", ["top", "0,1,1", "1,1,1"])
def test_identity_placements_are_exact(placement):
    model = trained("qwen2")
    grown = grow(model, GrowSpec(layers=5, placement=placement))
    assert grown.model.config.layer_types == ["full_attention"] * 5
    assert max_abs_logit_change(model, grown.model, probe()) <= EXACT


@pytest.mark.parametrize("family", PRE + POST)
@pytest.mark.parametrize("width", ["fpi", "exact"])
@pytest.mark.parametrize("task", ["", "base"])  # base: the last hidden state's old coordinates
def test_integer_multiple_width_is_exact_for_every_family(family, width, task):
    # FFN 64 -> 80 copies FFN units unevenly: exact anyway, their readers divide per unit.
    model = trained(family, task)
    grown = grow(model, GrowSpec(**shape(family, DOUBLE, ffn=80, layers=2), width=width))
    assert max_abs_logit_change(model, grown.model, probe()) <= EXACT


@pytest.mark.parametrize("family", POST)
def test_post_norm_classifier_fpi_is_exact(family):
    model = trained(family, "seq_cls")
    grown = grow(model, GrowSpec(hidden=64, width="fpi"))
    assert max_abs_logit_change(model, grown.model, probe()) <= EXACT


@pytest.mark.parametrize("family", POST)
@pytest.mark.parametrize("change", [{"hidden": 48, "heads": 6}, {"layers": 3}])
def test_post_norm_deviation_is_measured_not_hidden(family, change):
    # A non-multiple width shifts LayerNorm statistics; an identity block still applies its LayerNorms.
    model = trained(family)
    grown = grow(model, GrowSpec(**change))
    deviation = max_abs_logit_change(model, grown.model, probe())
    assert 1e-4 < deviation < 10


# ---------------------------------------------------------------- training after growth


CASES = [("exact", "identity"), ("fpi", "stack"), ("aki", "interleave"), ("exact", "solar")]


@pytest.mark.parametrize("family", PRE + POST)
@pytest.mark.parametrize("width,depth", CASES)
def test_grown_models_train(family, width, depth):
    model = trained(family)
    target = shape(family, ODD, layers=4 if depth == "solar" else 5)
    new = grow(model, GrowSpec(**target, width=width, depth=depth, noise=1e-3 if width != "exact" else 0.0)).model.train()
    ids = probe(length=12, seed=3)
    opt = torch.optim.AdamW(new.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = loss_of(new, ids)
        loss.backward()
        losses.append(loss.item())
        if step == 2:  # by now every parameter has woken up
            dead = [k for k, g in roles(new, "grad").items() if not g.abs().sum() > 0]
            assert not dead, dead
        opt.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", PRE + POST)
def test_zero_writers_get_gradients_at_step_one(family):
    # docs/methods.md, section 1: readers of fresh hidden coordinates see 0 on step 1 and so get no gradient yet;
    # the zero-initialised writers (new heads' and FFN units' outputs, identity blocks) must.
    model = trained(family)
    grown = grow(model, GrowSpec(**shape(family, ODD)))
    new = grown.model.train()
    loss_of(new, probe(length=12, seed=3)).backward()
    g = roles(new, "grad")
    old_heads, hd = 4, 8
    fresh_block = grown.maps["layers"].index(None)
    assert g["layer.0.attn.o.weight"][:, old_heads * hd :].abs().sum() > 0
    assert g["layer.0.mlp.down.weight"][:, 64:].abs().sum() > 0
    assert g[f"layer.{fresh_block}.attn.o.weight"].abs().sum() > 0
    assert g[f"layer.{fresh_block}.mlp.down.weight"].abs().sum() > 0
    # Writers into fresh hidden coordinates are reached through the norms' non-zero new gains.
    assert g["embed.token.weight"][:, 32:].abs().sum() > 0
    # ... while fresh readers wait for step 2, as the math says (LayerNorm's "0" is a rounding error).
    q = g["layer.0.attn.q.weight"].abs()
    assert q[:, 32:].max() < 1e-4 * q[:, :32].max()


# ---------------------------------------------------------------- depth operators and maps


@pytest.mark.parametrize(
    "depth,layers,expected",
    [
        ("identity", 5, [0, None, 1, None, None]),
        ("stack", 5, [0, 1, 0, 1, 0]),
        ("interleave", 5, [0, 0, 1, 1, 1]),
        ("solar", 3, [0, 1, 1]),
        ("solar", 4, [0, 1, 0, 1]),
    ],
)
def test_depth_operators_layer_maps_and_reload(depth, layers, expected, tmp_path):
    model = trained("qwen2")
    grown = grow(model, GrowSpec(layers=layers, depth=depth, width="aki", hidden=48))
    assert grown.maps["layers"] == expected
    assert grown.model.config.num_hidden_layers == layers == len(grown.model.config.layer_types)
    grown.model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert max_abs_logit_change(grown.model, again, probe()) == 0


def test_solar_of_four_layers_overlaps():
    grown = grow(trained("llama", layers=4), GrowSpec(layers=6, depth="solar"))
    assert grown.maps["layers"] == [0, 1, 2, 1, 2, 3]


def test_maps_by_hand():
    exact = grow(trained("llama"), GrowSpec(**ODD)).maps
    assert exact["hidden"] == list(range(32)) + [None] * 16
    assert exact["heads"] == [[0, 1, 2, 3, None, None]] * 5
    assert exact["kv_heads"] == [[0, 1, None]] * 5
    assert exact["ffn"][0] == list(range(64)) + [None] * 16
    assert exact["layers"] == [0, None, 1, None, None]
    fpi = grow(trained("llama"), GrowSpec(width="fpi", hidden=64, heads=8, kv_heads=2)).maps
    assert fpi["hidden"] == list(range(32)) * 2
    assert fpi["heads"][0] == [0, 1, 0, 1, 2, 3, 2, 3]  # each KV group of 2 grows to 4 in place
    assert fpi["kv_heads"][0] == [0, 1]
    aki = grow(trained("gpt2", layers=3), GrowSpec(width="aki", hidden=48, heads=6)).maps
    assert aki["new_units_from_layer"] == [1, 2, 2]
    assert json.loads(json.dumps(aki)) == aki


def test_fpi_copies_and_splits_by_hand():
    model = trained("llama")
    new = grow(model, GrowSpec(width="fpi", hidden=64, heads=8, kv_heads=4, ffn=96)).model
    old, grown = roles(model), roles(new)
    emb, down, up = old["embed.token.weight"], old["layer.1.mlp.down.weight"], old["layer.1.mlp.up.weight"]
    assert torch.equal(grown["embed.token.weight"], torch.cat([emb, emb], 1))  # writers copy
    assert torch.allclose(grown["layer.1.mlp.up.weight"][:64], torch.cat([up, up], 1) / 2)  # readers split
    # FFN unit 5 is copied once (64 + 5), unit 40 is not: its reader is divided by 2, the other not.
    assert torch.allclose(grown["layer.1.mlp.down.weight"][:32, 5], down[:, 5] / 2)
    assert torch.allclose(grown["layer.1.mlp.down.weight"][:32, 40], down[:, 40])


def test_aki_takes_new_units_from_the_layer_above():
    model = trained("llama")
    fpi = roles(grow(model, GrowSpec(width="fpi", ffn=96)).model)
    aki = roles(grow(model, GrowSpec(width="aki", ffn=96)).model)
    up = "layer.{}.mlp.up.weight"
    assert torch.equal(aki[up.format(0)][:64], fpi[up.format(0)][:64])
    assert torch.equal(aki[up.format(0)][64:], fpi[up.format(1)][64:])
    assert torch.equal(aki[up.format(1)], fpi[up.format(1)])  # the top layer fills from itself


# ---------------------------------------------------------------- noise, errors, optimizer


def test_noise_is_small_measured_and_seeded():
    model = trained("gpt2")
    plain = grow(model, GrowSpec(**shape("gpt2", ODD))).model
    a = grow(model, GrowSpec(**shape("gpt2", ODD), noise=1e-3, seed=1)).model
    b = grow(model, GrowSpec(**shape("gpt2", ODD), noise=1e-3, seed=1)).model
    c = grow(model, GrowSpec(**shape("gpt2", ODD), noise=1e-3, seed=2)).model
    moved = max_abs_logit_change(plain, a, probe())
    assert 1e-6 < moved < 0.1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize(
    "family,kwargs,message",
    [
        ("gpt2", {"hidden": 16}, "smaller than"),
        ("llama", {"layers": 1}, "smaller than"),
        ("gpt2", {"hidden": 48, "heads": 8}, "head size 8; pass --heads 6"),
        ("gpt2", {"hidden": 44}, "multiple of 8"),
        ("llama", {"heads": 6, "hidden": 48, "kv_heads": 4}, "must divide"),
        ("llama", {"heads": 6, "hidden": 48, "kv_heads": 6}, "shrink the KV group"),
        ("bert", {"kv_heads": 2}, "no grouped KV heads"),
        ("gpt2", {"width": "lemon"}, "unknown width operator"),
        ("gpt2", {"depth": "tower"}, "unknown depth operator"),
        ("gpt2", {"layers": 4, "placement": "middle"}, "placement"),
        ("gpt2", {"layers": 4, "placement": "0,7"}, "0..1"),
        ("gpt2", {"layers": 5, "depth": "solar"}, "at most 4"),
    ],
)
def test_bad_targets_are_refused(family, kwargs, message):
    with pytest.raises(BequestError, match=message):
        grow(tiny(family, LM_TASK[family]), GrowSpec(**kwargs))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: fused, transposed q/k/v moments
def test_optimizer_state_follows_the_maps(family):
    model = trained(family).train()
    ids = probe(length=12, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, ids).backward()
        opt.step()
    grown = grow(model, GrowSpec(**shape(family, ODD)))
    state = grow_optimizer_state(opt.state_dict(), model, grown.model, grown.maps)
    new_opt = torch.optim.AdamW(grown.model.parameters(), lr=1e-3)
    new_opt.load_state_dict(state)

    def moments(m, o):
        params = dict(m.named_parameters())
        return to_roles({n: o.state[p]["exp_avg"] for n, p in params.items()}, anatomy(m))

    old, new = moments(model, opt), moments(grown.model, new_opt)
    assert torch.equal(new["embed.token.weight"][:, :32], old["embed.token.weight"])
    assert new["embed.token.weight"][:, 32:].abs().sum() == 0
    assert torch.equal(new["layer.2.mlp.up.weight"][:64, :32], old["layer.1.mlp.up.weight"])
    v = old["layer.1.attn.v.weight"]
    assert torch.equal(new["layer.2.attn.v.weight"][: v.shape[0], : v.shape[1]], v)
    assert new["layer.1.attn.q.weight"].abs().sum() == 0  # an identity block starts without history
    assert all(s["step"].item() == 2 for s in new_opt.state.values())
    new_opt.zero_grad()
    loss_of(grown.model.train(), ids).backward()
    new_opt.step()  # training goes on


def test_optimizer_state_follows_aki_donor_layers():
    model = trained("llama").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_of(model, probe(length=12, seed=3)).backward()
    opt.step()
    grown = grow(model, GrowSpec(width="aki", ffn=96))
    state = grow_optimizer_state(opt.state_dict(), model, grown.model, grown.maps)
    old = to_roles({n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}, anatomy(model))
    ids = {n: i for i, (n, _) in enumerate(grown.model.named_parameters())}
    new = to_roles({n: state["state"][i]["exp_avg_sq"] for n, i in ids.items()}, anatomy(grown.model))
    up = "layer.{}.mlp.up.weight"
    assert torch.equal(new[up.format(0)][:64], old[up.format(0)])
    assert torch.equal(new[up.format(0)][64:], old[up.format(1)][:32])  # FFN units 64.. copy 0.., from layer 1


# ---------------------------------------------------------------- the command


def test_grow_command_round_trip(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "small", tmp_path / "big"
    model = trained("gpt2")
    save_model(src, model, operation="pretrain")
    recipe = GrowRecipe(src=str(src), out=str(out), hidden=48, ffn=80, layers=3)
    result = grow_command(recipe)
    assert result["max_abs_logit_change"] <= EXACT
    assert "max |Δ logits|" in capsys.readouterr().out

    growth = json.loads((out / "growth.json").read_text())
    assert growth["maps"]["layers"] == [0, 1, None] and growth["width"] == "exact"
    assert "max |Δ logits|" in (out / "README.md").read_text()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    in_memory = grow(model, GrowSpec(hidden=48, ffn=80, layers=3)).model
    assert max_abs_logit_change(in_memory, loaded, probe()) == 0

    with monkeypatch.context() as m:  # refused before any work: nothing is written or read
        m.setattr("bequest.grow.sharded.write", lambda *a, **k: pytest.fail("wrote before refusing"))
        m.setattr("bequest.grow.command.probing", lambda *a, **k: pytest.fail("probed before refusing"))
        with pytest.raises(BequestError, match="already exists"):
            grow_command(recipe)
        with pytest.raises(BequestError, match="multiple of 8"):  # judged from config.json alone
            grow_command(recipe.model_copy(update={"out": str(tmp_path / "other"), "hidden": 44}))
    grow_command(recipe.model_copy(update={"overwrite": True, "layers": 4}))
    assert transformers.AutoConfig.from_pretrained(out).n_layer == 4


def test_grow_command_reports_post_norm_deviation(tmp_path):
    src, out = tmp_path / "bert", tmp_path / "bert-deep"
    save_model(src, trained("bert"), operation="pretrain")
    result = grow_command(GrowRecipe(src=str(src), out=str(out), layers=3))
    growth = json.loads((out / "growth.json").read_text())
    assert growth["max_abs_logit_change"] == result["max_abs_logit_change"] > 1e-4
    assert f"{result['max_abs_logit_change']:.3g}" in (out / "README.md").read_text()
