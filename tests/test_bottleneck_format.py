"""bequest's bottleneck format on disk (docs/bottleneck-format.md): a folder peft cannot take for one of
its own, that bequest reads back exactly; version-0 folders (peft's file names) still read; a newer
version, two layouts at once or a foreign format are one-line refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bequest.errors import BequestError
from bequest.io import load_model
from bequest.io.adapters import FORMAT_VERSION, PEFT_CONFIG, PEFT_WEIGHTS
from bequest.lineage import read_node
from bequest.peft import attach, module_of, new_config, read_module, with_module, write_adapter, write_module
from conftest import probe
from test_fuzz import one_error_line, run
from test_port import host, max_change

CONFIG, WEIGHTS = "bottleneck_config.json", "bottleneck_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    """(host folder, the adapter's folder, the model carrying it): every adapter tensor off its init."""
    base = host(tmp_path / "base")
    model = _host(base)
    torch.manual_seed(1)
    model = with_module(model, new_config("bottleneck", model, bottleneck=8, style="houlsby"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    write_adapter(tmp_path / "adapter", module_of(model), model.config, operation="test", parent=str(base))
    return base, tmp_path / "adapter", model.eval()


def _host(base):
    return load_model(base, "seq_cls", num_labels=3, with_tokenizer=False)[0]


def _on(base, folder):
    return attach(_host(base), read_module(folder)).eval()


def test_a_bottleneck_folder_is_in_bequests_format_and_reads_back_exactly(saved):
    base, folder, model = saved
    config = json.loads((folder / CONFIG).read_text())
    assert (config["format"], config["format_version"]) == ("bequest-bottleneck", FORMAT_VERSION)
    assert (config["style"], config["size"], config["nonlinearity"]) == ("houlsby", 8, "relu")
    assert "peft_type" not in config and config["base_model_name_or_path"] == str(base)
    assert not (folder / PEFT_CONFIG).exists() and not (folder / PEFT_WEIGHTS).exists()
    assert any(".adapter.down.weight" in k for k in load_file(str(folder / WEIGHTS)))
    assert max_change(model, _on(base, folder), probe()) == 0
    assert "not a peft folder" in (folder / "README.md").read_text()
    assert read_node(folder).peft_type == "BOTTLENECK" and read_node(folder).parent == base.resolve()


def test_peft_does_not_take_a_bottleneck_folder_for_its_own(saved):
    """It used to die inside peft with a bare KeyError: 'BOTTLENECK'; now peft finds no config of its own."""
    from peft import PeftModel

    base, folder, _ = saved
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(_host(base), str(folder))


def test_a_version_0_folder_still_reads(saved, tmp_path):
    """Version 0: peft's file names, peft_type BOTTLENECK (and peft's inference_mode) in adapter_config.json."""
    base, folder, model = saved
    old = tmp_path / "old"
    old.mkdir()
    config = {k: v for k, v in json.loads((folder / CONFIG).read_text()).items() if k not in ("format", "format_version")}
    (old / PEFT_CONFIG).write_text(json.dumps({"peft_type": "BOTTLENECK", **config, "inference_mode": True}))
    save_file(load_file(str(folder / WEIGHTS)), str(old / PEFT_WEIGHTS))
    module = read_module(old)
    assert module.kind == "bottleneck" and "inference_mode" not in module.config
    assert max_change(model, _on(base, old), probe()) == 0
    assert read_node(old).peft_type == "BOTTLENECK"
    write_module(tmp_path / "again", module)  # written again: in the current format
    assert json.loads((tmp_path / "again" / CONFIG).read_text())["format_version"] == FORMAT_VERSION
    assert not (tmp_path / "again" / PEFT_CONFIG).exists()


BROKEN = {
    "newer version": ({"format_version": FORMAT_VERSION + 1}, f"format version {FORMAT_VERSION + 1} is newer"),
    "version as text": ({"format_version": "1"}, "is not a version number"),
    "another format": ({"format": "adapters-hub"}, "not 'bequest-bottleneck'"),
    "unknown setting": ({"gate": True}, "gate"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_bottleneck_folder_bequest_cannot_read_is_one_line(saved, tmp_path, broken):
    base, folder, _ = saved
    changes, says = BROKEN[broken]
    (folder / CONFIG).write_text(json.dumps({**json.loads((folder / CONFIG).read_text()), **changes}))
    with pytest.raises(BequestError, match=says):
        _on(base, folder)
    code, output = run(["port", "--adapter", str(folder), "--to", str(base), str(tmp_path / "out")])
    assert code == 2 and one_error_line(output) and says in output, output
    assert not (tmp_path / "out").exists()
    if broken != "unknown setting":  # lineage reads no settings: it reports what it cannot read and goes on
        assert says in read_node(folder).problem


def test_a_folder_in_two_layouts_is_refused(saved):
    _, folder, _ = saved
    (folder / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(BequestError, match="holds both"):
        read_module(folder)


def test_the_activations_offered_are_the_ones_adapters_have_and_a_source_keeps_its_own():
    from typing import get_args

    from bequest.peft.bottleneck import ACTIVATIONS
    from bequest.recipe import PeftFields
    from bequest.upgrade.paths import _settings

    assert get_args(PeftFields.model_fields["nonlinearity"].annotation) == tuple(ACTIVATIONS)
    # A fresh module in `bequest upgrade` takes the source's settings, its activation among them.
    assert _settings({"peft_type": "BOTTLENECK", "size": 8, "style": "houlsby", "nonlinearity": "identity"}).nonlinearity == "identity"
