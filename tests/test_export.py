"""`bequest export`: a PEFT module folded into its base's weights, exactly, as a plain transformers folder
(every kind that can be folded x every family); the kinds that cannot are one-line refusals that leave
nothing behind."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from bequest.anatomy import FAMILIES, name_labels
from bequest.errors import BequestError
from bequest.export import ExportRecipe, export
from bequest.io import load_model, read_lineage
from bequest.peft import KINDS, attach, module_of, new_config, read_module, with_module, write_adapter
from conftest import LM_TASK, probe
from test_fuzz import one_error_line, run
from test_port import host

EXACT = 1e-5
NAMES = ["one", "two", "three"]
MERGEABLE = ["lora", "ia3", "bottleneck"]  # the bottleneck adapters here are linear (identity activation)
# The writers a bottleneck adapter follows have a bias to take its constant shift in these families only.
WRITER_BIAS = [f for f in sorted(FAMILIES) if FAMILIES[f].biases.get("mlp.down") is True]


def adapter(tmp_path, kind, family="gpt2", *, zero_shift=False, **settings):
    """(base folder, adapter folder): a tiny base and a classifier module on it, every tensor off its init."""
    base = host(tmp_path / "base", family)
    model, _ = load_model(base, "seq_cls", num_labels=3, with_tokenizer=False)
    name_labels(model.config, NAMES)
    torch.manual_seed(1)
    settings = {"rank": 4, "virtual_tokens": 3, "bottleneck": 8, "style": "houlsby", "nonlinearity": "identity", **settings}
    model = with_module(model, new_config(kind, model, **settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
            if zero_shift and name.endswith(("adapter.down.bias", "adapter.up.bias")):
                p.zero_()
    write_adapter(tmp_path / "adapter", module_of(model), model.config, operation="finetune", parent=str(base))
    return base, tmp_path / "adapter"


@torch.no_grad()
def on_base(base, folder, ids):
    model = load_model(base, "seq_cls", num_labels=3, with_tokenizer=False)[0]
    return attach(model, read_module(folder)).eval()(input_ids=ids).logits


@torch.no_grad()
def exported(out, ids):
    """The exported folder's logits, loaded by plain transformers; nothing missing or left over."""
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.id2label == dict(enumerate(NAMES)) and model.config.label2id == {n: i for i, n in enumerate(NAMES)}
    return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", MERGEABLE)
def test_an_exported_model_computes_what_the_module_on_its_base_computes(tmp_path, kind, family):
    base, folder = adapter(tmp_path, kind, family)
    out = tmp_path / "out"
    assert "`bequest export FOLDER OUT` folds it" in (folder / "README.md").read_text()  # the card says so
    if kind == "bottleneck" and family not in WRITER_BIAS:
        with pytest.raises(BequestError, match="has no bias to take it, so it cannot be folded into the base's weights"):
            export(ExportRecipe(adapter=str(folder), out=str(out)))
        assert not out.exists()
        return
    report = export(ExportRecipe(adapter=str(folder), out=str(out)))
    ids = probe()
    assert (exported(out, ids) - on_base(base, folder, ids)).abs().max().item() <= EXACT
    assert report["max_abs_logit_change"] <= EXACT
    # The weights are the base's under the base's names, the head the module's: no adapter tensor is left.
    names = set(load_file(str(out / "model.safetensors")))
    assert not any("lora" in n or "ia3" in n or "adapter" in n or "modules_to_save" in n for n in names), names
    assert read_lineage(out)["operation"] == "export" and read_lineage(out)["source"] == str(folder)


def test_a_linear_adapter_without_a_shift_folds_into_writers_without_a_bias(tmp_path):
    base, folder = adapter(tmp_path, "bottleneck", "llama", zero_shift=True)
    export(ExportRecipe(adapter=str(folder), out=str(tmp_path / "out")))
    ids = probe()
    assert (exported(tmp_path / "out", ids) - on_base(base, folder, ids)).abs().max().item() <= EXACT


def test_the_exported_folder_loads_without_bequest_or_peft(tmp_path):
    """GPT-2's Conv1D LoRA and RoBERTa's IA3 with its head (which peft's own unloading trips over), read by
    a Python that cannot import bequest or peft."""
    ids, expected = probe(), {}
    for kind, family in (("lora", "gpt2"), ("ia3", "roberta")):
        base, folder = adapter(tmp_path / kind, kind, family)
        export(ExportRecipe(adapter=str(folder), out=str(tmp_path / kind / "out")))
        expected[str(tmp_path / kind / "out")] = on_base(base, folder, ids).tolist()
    script = f"""
import json, sys
sys.modules["peft"] = sys.modules["bequest"] = None  # an import of either fails
import torch
from transformers import AutoModelForSequenceClassification, AutoConfig
expected, ids = json.loads({json.dumps(json.dumps(expected))}), torch.tensor({ids.tolist()})
for out, logits in expected.items():
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        print((model(input_ids=ids).logits - torch.tensor(logits)).abs().max().item())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(float(line) <= EXACT for line in done.stdout.split()), done.stdout


REFUSED = {
    "prefix": (dict(), "3 virtual tokens are extra positions the model attends to"),
    "prompt": (dict(), "3 virtual tokens are extra positions the model attends to"),
    "bottleneck": (dict(nonlinearity="relu"), "its relu between down and up is not linear"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_a_module_that_cannot_be_folded_is_one_line_and_nothing_is_left(tmp_path, kind):
    settings, says = REFUSED[kind]
    _, folder = adapter(tmp_path, kind, **settings)
    assert "bequest export" not in (folder / "README.md").read_text()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = run(["export", str(folder), str(tmp_path / "out")])
    assert code == 2 and one_error_line(output) and "cannot be folded into its base's weights" in output, output
    assert says in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_every_kind_says_whether_it_folds():
    """A new kind must decide: the registry's kinds are the ones tested above, folded or refused."""
    assert set(KINDS) == set(MERGEABLE) | set(REFUSED)


def test_export_from_the_command_line_with_another_base_and_an_existing_out(tmp_path):
    base, folder = adapter(tmp_path, "lora")
    moved = tmp_path / "moved-base"
    base.rename(moved)  # the recorded base is gone: --base names it
    code, output = run(["export", str(folder), str(tmp_path / "out")])
    assert code == 2 and one_error_line(output) and "--base" in output, output
    code, output = run(["export", str(folder), str(tmp_path / "out"), "--base", str(moved)])
    assert code == 0 and "max |Δ logits|" in output, output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    assert (tmp_path / "out" / "README.md").read_text().count("library_name: transformers") == 1
    code, output = run(["export", str(folder), str(tmp_path / "out"), "--base", str(moved)])
    assert code == 2 and "--overwrite" in output, output


def test_a_wrong_fold_is_caught_before_anything_is_written(tmp_path, monkeypatch):
    _, folder = adapter(tmp_path, "lora")
    fold = type(KINDS["lora"]).merge

    def off_by_a_little(self, carrier):
        model = fold(self, carrier)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if n.endswith("mlp.c_fc.weight")).add_(1e-2)
        return model

    monkeypatch.setattr(type(KINDS["lora"]), "merge", off_by_a_little)
    with pytest.raises(BequestError, match="moved the logits"):
        export(ExportRecipe(adapter=str(folder), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_classifier_module_without_its_head_is_refused_on_an_lm_base(tmp_path):
    base = host(tmp_path / "base")
    model, _ = load_model(base, "seq_cls", num_labels=3, with_tokenizer=False)
    model = with_module(model, {**new_config("bottleneck", model, nonlinearity="identity"), "modules_to_save": []})
    write_adapter(tmp_path / "adapter", module_of(model), model.config, operation="test", parent=str(base))
    assert LM_TASK["gpt2"] == "causal_lm"
    with pytest.raises(BequestError, match="saves no classifier head"):
        export(ExportRecipe(adapter=str(tmp_path / "adapter"), out=str(tmp_path / "out")))
