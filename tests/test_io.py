import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bequest import io
from bequest.cli import app
from bequest.errors import BequestError
from conftest import LM_TASK, probe, tiny

FAMILIES = sorted(LM_TASK)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_logits(tmp_path, family):
    model = tiny(family, LM_TASK[family])
    out = io.save_model(tmp_path / "m", model, operation="test", parent="ancestor", recipe={"a": 1})
    loaded, _ = io.load_model(out)
    ids = probe()
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    lineage = io.read_lineage(out)
    assert lineage["parent"] == "ancestor" and lineage["operation"] == "test" and lineage["recipe"] == {"a": 1}
    card = (out / "README.md").read_text()
    assert "base_model: ancestor" in card and "- bequest" in card
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary sibling left


def test_sharded_round_trip(tmp_path):
    model = tiny("llama", "causal_lm")
    out = io.save_model(tmp_path / "m", model, operation="test", max_shard_size="20KB")
    assert len(io.weight_files(out)) > 1
    loaded, _ = io.load_model(out)
    ids = probe()
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(folder, *a, **k):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.models, "write_model", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_model(tmp_path / "m", tiny("gpt2", "causal_lm"), operation="test")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    first = tiny("gpt2", "causal_lm", seed=0)
    second = tiny("gpt2", "causal_lm", seed=1)
    out = io.save_model(tmp_path / "m", first, operation="test")
    with pytest.raises(BequestError, match="already exists; pass --overwrite"):
        io.save_model(out, second, operation="test")
    assert torch.equal(logits(io.load_model(out)[0], probe()), logits(first, probe()))
    io.save_model(out, second, operation="test", overwrite=True)
    assert torch.equal(logits(io.load_model(out)[0], probe()), logits(second, probe()))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.fixture
def saved(tmp_path):
    return io.save_model(tmp_path / "m", tiny("gpt2", "causal_lm"), operation="test")


def _truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "truncated or corrupted"


def _garble_header(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    return "not a readable safetensors"


def _drop_config(folder):
    (folder / "config.json").unlink()
    return "missing config.json"


def _wrong_shape(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_inner"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    return "do not belong together"


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return "never unpickles"


BAD = [_truncate, _garble_header, _drop_config, _wrong_shape, _pickle_only]


@pytest.mark.parametrize("damage", BAD, ids=[f.__name__[1:] for f in BAD])
def test_bad_folders_get_one_line_error_and_exit_2(saved, damage):
    expected = damage(saved)
    with pytest.raises(BequestError, match=expected):
        io.load_model(saved)
    result = CliRunner().invoke(app, ["info", str(saved)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_info_describes_a_model(saved):
    result = CliRunner().invoke(app, ["info", str(saved)])
    assert result.exit_code == 0, result.output
    assert "gpt2" in result.output and "parameters" in result.output and "attn.qkv x4" in result.output  # 2 blocks x (weight, bias)


def test_a_verb_imports_only_its_own_module():
    """`bequest grow` must not pay for the training verbs' imports (Trainer, peft, datasets)."""
    code = ("import sys; from bequest.cli import build; app = build(['grow', '--help']); "
            "print(sorted(c.name for c in app.registered_commands)); "
            "print([m for m in ('transformers.trainer', 'peft', 'datasets', 'bequest.engine') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == ["['grow', 'info']", "[]"], r.stdout


def test_the_full_app_lists_every_verb():
    from bequest.cli import VERBS

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {"info", "study"} | {name for group, name, *_ in VERBS if group is None}
    help_text = CliRunner().invoke(app, ["study", "--help"]).output
    assert "port" in help_text


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_missing_tensor_is_an_error_naming_it(tmp_path, family):
    """A checkpoint missing one tensor is refused, never completed with random weights."""
    from safetensors.torch import load_file, save_file

    out = io.save_model(tmp_path / "m", tiny(family, LM_TASK[family]), operation="test")
    tensors = load_file(str(out / "model.safetensors"))
    dropped = next(k for k in tensors if ".1." in k and k.endswith("weight"))  # a block's weight
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BequestError, match=f"no tensor for .*{dropped.split('.', 1)[1]}.*incomplete"):
        io.load_model(out)
    with pytest.raises(BequestError, match="incomplete"):
        io.load_model(out, "seq_cls", num_labels=2)  # a new head is fine, a missing body tensor is not
    result = CliRunner().invoke(app, ["info", str(out)])
    assert result.exit_code == 2 and "incomplete" in result.output and result.output.count("\n") == 1


def test_new_head_on_an_lm_is_not_missing(tmp_path):
    out = io.save_model(tmp_path / "m", tiny("llama", "causal_lm"), operation="test")
    model, _ = io.load_model(out, "seq_cls", num_labels=3)
    assert model.config.num_labels == 3
