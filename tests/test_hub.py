"""Hub ids stand for their models in the local Hugging Face cache (never the network): every verb takes
one where it takes a model folder, and the outputs' records name the id the user gave."""

import hashlib
import json
import os
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from bequest import data
from bequest.anatomy import build_model, make_config
from bequest.cli import app
from bequest.data.prepare import special_ids
from bequest.io import hub_id, save_model

ID, COMMIT = "org/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"
TASK = ["--data", "kind", "--max-len", "24", "--train-examples", "16", "--eval-examples", "8", "--batch-size", "8",
        "--steps", "2", "--eval-every", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache laid out as huggingface_hub lays it: refs/main names a commit, whose snapshot links every
    file of a tiny GPT-2 (weights, config, tokenizer) to its blob."""
    root = tmp_path_factory.mktemp("hub")
    tokenizer = data.train_tokenizer("bpe", 500)
    config = make_config("gpt2", layers=1, hidden=32, heads=2, vocab=len(tokenizer), positions=32,
                         **special_ids(tokenizer))
    saved = save_model(root / "saved", build_model(config, "causal_lm"), tokenizer, operation="test")
    (saved / "README.md").unlink()  # a hub model's card is its own; bequest's lineage starts at the id
    repo = root / "cache" / f"models--{ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True)
    for file in saved.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(COMMIT)
    return {"cache": str(root / "cache"), "snapshot": snapshot}


def _run(hub, args):
    return CliRunner().invoke(app, args, env={"HF_HUB_CACHE": hub["cache"], "HF_HUB_OFFLINE": "1"},
                              catch_exceptions=False)


def _front(folder) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_a_snapshot_folder_knows_its_id(hub):
    assert hub_id(hub["snapshot"]) == ID and hub_id(hub["snapshot"].parent) is None
    assert hub_id("out/models--org--tiny-gpt2") is None


def test_finetune_grow_and_info_take_a_cached_hub_id(hub, tmp_path):
    tuned, lora, grown = tmp_path / "tuned", tmp_path / "lora", tmp_path / "grown"
    r = _run(hub, ["finetune", "--model", ID, *TASK, str(tuned)])
    assert r.exit_code == 0, r.output
    r = _run(hub, ["finetune", "--model", ID, "--peft", "lora", *TASK, str(lora)])
    assert r.exit_code == 0, r.output
    r = _run(hub, ["grow", ID, str(grown), "--hidden", "64", "--heads", "4", "--layers", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads((grown / "growth.json").read_text())["max_abs_logit_change"] < 1e-4
    for out in (tuned, lora, grown):  # the records name the id as given, not a path into this machine's cache
        front = _front(out)
        assert front["base_model"] == ID and front["bequest"]["parent"] == ID, out
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())
        assert recipe.get("model", recipe.get("src")) == ID, out
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == ID
    r = _run(hub, ["export", str(lora), str(tmp_path / "merged")])  # the recorded id is found in the cache
    assert r.exit_code == 0, r.output
    assert _front(tmp_path / "merged")["bequest"]["parent"] == ID
    r = _run(hub, ["info", ID])
    assert r.exit_code == 0 and r.output.startswith(f"{ID} ({hub['snapshot']})") and "gpt2" in r.output, r.output
    r = _run(hub, ["lineage", str(tmp_path)])  # the recorded id leads back to the cached model
    assert r.exit_code == 0, r.output
    assert f"grow from {ID}" in r.output and f"\n{ID}  gpt2 1x32" in "\n" + r.output, r.output


@pytest.mark.parametrize("verb", [["finetune", "--model", "org/absent", *TASK], ["grow", "org/absent"]])
def test_an_id_missing_from_the_cache_is_a_one_line_error(hub, tmp_path, verb):
    r = _run(hub, [*verb, str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert r.output == (
        f"error: 'org/absent' is neither a model folder nor a model id in the local Hugging Face cache "
        f"(HF_HUB_CACHE={hub['cache']}); download it first with `hf download org/absent` or pass a folder\n")
    assert list(tmp_path.iterdir()) == []
