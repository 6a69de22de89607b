"""Lineage of a three-generation family with adapters and fine-tunes: the tree, its text, JSON and PNG,
and `relation(old, new)` across continued training, two growth steps and unrelated models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bequest import cli
from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.grow.command import GrowRecipe, grow_command
from bequest.io import load_config, load_model, save_model
from bequest.lineage import compose, relation, scan
from bequest.peft import module_of, new_config, with_module, write_module
from bequest.port.command import PortRecipe, port
from conftest import tiny


def trained(model, seed, only=""):
    """`model` with its weights moved, as training would; `only`: just the roles that start with it."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, slot in anatomy(model).slots(params).items():
            if slot.role.startswith(only):
                params[name].add_(0.05 * torch.randn(params[name].shape, generator=g))
    return model


def by_role(folder):
    """{'layer.0.mlp.up.bias': tensor, ...}: a saved model's weights by anatomy role."""
    weights = load_file(str(folder / "model.safetensors"))
    return {str(slot): weights[name] for name, slot in anatomy(load_config(folder)).slots(weights).items()}


def adapter(host, kind, folder):
    model, _ = load_model(host, "seq_cls", num_labels=3, with_tokenizer=False)
    torch.manual_seed(0)
    write_module(folder, module_of(with_module(model, new_config(kind, model, rank=4))))


@pytest.fixture(scope="module")
def family(tmp_path_factory, monkeypatch_module):
    """G1 -> G1' (continued); G1 -> G2 (grown) -> G2' (continued) -> G3 (grown); an independent model;
    on G1: LoRA and IA3 (bequest), LoRA (plain peft), a full fine-tune; the LoRA ported onto G2."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("family")
    monkeypatch_module.chdir(root)  # parents recorded relative to here, as a user's commands would
    zoo = root / "zoo"
    zoo.mkdir()
    f = {k: zoo / k for k in ("g1", "g1b", "g2", "g2b", "g3", "other", "lora", "ia3", "peft-lora", "ft", "lora-g2")}
    g1 = trained(tiny("gpt2", "causal_lm", seed=0), 1)
    save_model(f["g1"], g1, operation="pretrain")
    save_model(f["g1b"], trained(g1, 2), operation="continue-pretrain", parent="zoo/g1")
    grow_command(GrowRecipe(src="zoo/g1", out="zoo/g2", hidden=48, heads=6, ffn=96, layers=3, probe=False))
    # Trained further, the MLP biases left alone so the maps can be checked on them below.
    g2 = trained(load_model(f["g2"], with_tokenizer=False)[0], 3, only="attn.")
    save_model(f["g2b"], g2, operation="continue-pretrain", parent="g2")  # relative to its own folder
    grow_command(GrowRecipe(src=str(f["g2b"]), out="zoo/g3", hidden=64, heads=8, ffn=128, layers=6,
                            width="fpi", depth="stack", probe=False))
    save_model(f["other"], tiny("gpt2", "causal_lm", seed=5, hidden=48, heads=6, ffn=96), operation="pretrain")
    adapter(f["g1"], "lora", f["lora"])
    adapter("zoo/g1", "ia3", f["ia3"])
    base = load_model(f["g1"], with_tokenizer=False)[0]
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(f["peft-lora"])
    save_model(f["ft"], trained(load_model(f["g1"], "seq_cls", num_labels=3, with_tokenizer=False)[0], 4),
               operation="finetune", parent="zoo/g1")
    port(PortRecipe(adapter="zoo/lora", to="zoo/g2", out="zoo/lora-g2"))
    return f


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_relations(family, tmp_path, monkeypatch):
    f = family
    monkeypatch.chdir(tmp_path)  # 'zoo/g1', recorded from the family's folder, is found from anywhere
    assert relation(f["g1"], f["g1"]).kind == "same"
    assert relation(f["g1"], f["g1"] / ".." / "g1").kind == "same"
    assert relation(f["g1"], f["g1b"]).kind == "continued"
    assert relation(f["g1"], f["ft"]).kind == "continued"
    assert relation(f["g2"], f["g2b"]).operations == ["continue-pretrain"]
    r = relation(f["g1"], f["other"])
    assert r.kind == "unrelated" and r.path == [] and r.missing is None
    assert relation(f["g1b"], f["g3"]).kind == "unrelated"  # a sibling line, not an ancestor
    assert "ancestor" in relation(f["g3"], f["g1"]).reason
    with pytest.raises(BequestError, match="adapter"):
        relation(f["g1"], f["lora"])


def test_grown_twice_composes_the_maps(family):
    f = family
    r = relation(f["g1"], f["g3"])
    assert r.kind == "grown"
    assert r.path == [f[k].resolve() for k in ("g1", "g2", "g2b", "g3")]
    assert r.operations == ["grow", "continue-pretrain", "grow"]
    assert [s.folder for s in r.steps] == [f["g2"].resolve(), f["g3"].resolve()]
    a, b = (json.loads((f[k] / "growth.json").read_text())["maps"] for k in ("g2", "g3"))
    assert [s.maps for s in r.steps] == [a, b]
    # By hand: each G3 unit's G2 unit, then that unit's G1 unit (fresh blocks hold only fresh units).
    assert r.maps["layers"] == [None if s is None else a["layers"][s] for s in b["layers"]]
    assert r.maps["hidden"] == [None if u is None else a["hidden"][u] for u in b["hidden"]]
    for j, s in enumerate(b["layers"]):
        for k in ("heads", "kv_heads", "ffn"):
            want = [None if a["layers"][s] is None or u is None else a[k][s][u] for u in b[k][j]]
            assert r.maps[k][j] == want
    assert len(r.maps["hidden"]) == 64 and len(r.maps["layers"]) == 6 and len(r.maps["ffn"][0]) == 128
    assert any(m is None for m in r.maps["layers"]) and any(u is None for u in r.maps["hidden"])
    # Every source index is right: G3's units hold what G1's units they name held (writers copy; the
    # token embedding and the MLP biases were not trained in between).
    w1, w3 = by_role(f["g1"]), by_role(f["g3"])
    for u, src in enumerate(r.maps["hidden"]):
        if src is not None:
            assert torch.equal(w3["embed.token.weight"][:, u], w1["embed.token.weight"][:, src])
    checked = 0
    for j, layer in enumerate(r.maps["layers"]):
        for unit, src in enumerate(r.maps["ffn"][j]):
            if src is not None:
                assert w3[f"layer.{j}.mlp.up.bias"][unit] == w1[f"layer.{layer}.mlp.up.bias"][src]
                checked += 1
    assert checked > 128
    assert compose([a]) != a and compose([a])["layers"] == a["layers"]  # one step: fresh blocks marked fresh


def test_a_missing_parent_is_reported(family, tmp_path):
    f = family
    chain = tmp_path / "chain"
    for k in ("g1", "g2", "g2b", "g3"):
        shutil.copytree(f[k], chain / k)
    for k in ("g2b", "g3"):  # their cards name zoo/...: point them at the copies
        card = (chain / k / "README.md").read_text()
        (chain / k / "README.md").write_text(card.replace(str(f["g2b"]), str(chain / "g2b")))
    (chain / "g2" / "README.md").write_text((chain / "g2" / "README.md").read_text().replace("zoo/g1", str(chain / "g1")))
    assert relation(chain / "g1", chain / "g3").kind == "grown"
    assert relation(f["g1"], chain / "g3").kind == "grown"  # a byte-identical copy of G1 is G1
    assert relation(f["g1"], chain / "g1").reason == "same config and weight bytes"
    growth = json.loads((chain / "g3" / "growth.json").read_text())
    (chain / "g3" / "growth.json").write_text(json.dumps({**growth, "maps": {**growth["maps"], "ffn": [[0]]}}))
    assert "do not describe" in relation(chain / "g1", chain / "g3").reason  # maps from a 1-unit FFN
    del growth["maps"]["kv_heads"]
    (chain / "g3" / "growth.json").write_text(json.dumps(growth))
    with pytest.raises(BequestError, match="malformed index maps"):
        relation(chain / "g1", chain / "g3")
    shutil.rmtree(chain / "g2")
    r = relation(chain / "g1", chain / "g3")
    assert r.kind == "unrelated" and r.missing == "g2" and str((chain / "g2b").resolve()) in r.reason
    node = scan([chain]).nodes[(chain / "g2b").resolve()]
    assert node.missing and node.recorded == "g2"


def test_the_tree(family):
    f = family
    g = scan([f["g1"].parent])
    assert set(g.nodes) == {p.resolve() for p in f.values()}
    kinds = {k: g.nodes[p.resolve()].kind for k, p in f.items()}
    assert kinds == {**{k: "model" for k in ("g1", "g1b", "g2", "g2b", "g3", "other")}, "ft": "fine-tune",
                     **{k: "adapter" for k in ("lora", "ia3", "peft-lora", "lora-g2")}}
    gens = {k: g.generations[p.resolve()] for k, p in f.items()}
    assert gens == {"g1": 1, "g1b": 2, "g2": 2, "g2b": 3, "g3": 4, "other": 1, "lora": 1, "ia3": 1, "peft-lora": 1,
                    "ft": 1, "lora-g2": 2}
    edges = {(e.parent.name, e.child.name, e.operation, e.role) for e in g.edges}
    assert edges == {("g1", "g1b", "continue-pretrain", "parent"), ("g1", "g2", "grow", "parent"),
                     ("g2", "g2b", "continue-pretrain", "parent"), ("g2b", "g3", "grow", "parent"),
                     ("g1", "lora", None, "parent"), ("g1", "ia3", None, "parent"), ("g1", "peft-lora", None, "parent"),
                     ("g1", "ft", "finetune", "parent"), ("g2", "lora-g2", "port", "parent"),
                     ("lora", "lora-g2", "port", "source")}
    # Given one grown model, its ancestors come along.
    assert {p.name for p in scan([f["g3"]]).nodes} == {"g1", "g2", "g2b", "g3"}


def test_the_verb_prints_text_json_and_a_png(family, tmp_path):
    f = family
    runner = CliRunner()
    result = runner.invoke(cli.build(["lineage"]), ["lineage", "zoo", "--png", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    text = result.output
    for k in f:
        assert f"zoo/{k} " in text
    assert "zoo/g3  gpt2 6x64 (8 heads, ffn 128) · generation 4 · grow from zoo/g2b" in text
    assert "├── zoo/lora-g2  adapter LORA · port onto zoo/g2 · carried from zoo/lora" in text
    assert "zoo/ft  fine-tune (seq_cls) gpt2 2x32 (4 heads, ffn 64) · finetune of zoo/g1" in text
    assert "zoo/peft-lora  adapter LORA · on zoo/g1 (no lineage record)" in text
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "t.png"]  # no temporary file left
    result = runner.invoke(cli.build(["lineage"]), ["lineage", str(f["g1"]), str(f["g3"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {n["name"] for n in data["nodes"]} == {"zoo/g1", "zoo/g2", "zoo/g2b", "zoo/g3"}
    assert {(e["operation"], e["role"]) for e in data["edges"]} == {("grow", "parent"), ("continue-pretrain", "parent")}
    assert next(n for n in data["nodes"] if n["name"] == "zoo/g3")["shape"]["hidden"] == 64


def test_bad_input_is_one_line(family, tmp_path):
    runner = CliRunner()
    for args in (["lineage", "zoo", str(tmp_path / "nowhere")], ["lineage", str(tmp_path)],
                 ["lineage", "zoo", "--png", str(tmp_path / "no" / "t.png")]):
        result = runner.invoke(cli.build(["lineage"]), args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output, result.output
