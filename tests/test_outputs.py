"""Outputs other tools read fully: classifiers say their classes by name, tokenizers stop at the model's
positions, every adapter folder carries a lineage card, and modules_to_save stays as it was hop by hop."""

import json

import pytest
import torch
import transformers
import yaml

from bequest.data.tasks import load_task
from bequest.finetune import FinetuneRecipe, finetune
from bequest.grow.command import GrowRecipe, grow_command
from bequest.io import load_model, read_lineage
from bequest.peft import attach, module_of, new_config, read_module, with_module, write_adapter
from bequest.port.command import PortRecipe, port
from bequest.pretrain import PretrainRecipe, pretrain
from bequest.recycle import RecycleRecipe, recycle
from conftest import tiny

POSITIONS, VIRTUAL = 32, 4
TASK = dict(data="kind", max_len=24, train_examples=24, eval_examples=8, batch_size=8, warmup=1, save_every=100,
            eval_every=2, steps=2)
LONG = "Return the value of the named attribute of an object. " * 20  # far more tokens than the model has positions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 32-position base, a full fine-tune, a LoRA and a prefix tuned on it, and the LoRA ported twice
    (as it is, by relative paths from the world's folder) and recycled."""
    root = tmp_path_factory.mktemp("outputs")
    pretrain(PretrainRecipe(out=str(root / "base"), family="gpt2", layers=1, hidden=32, heads=2, vocab=500,
                            domain="text", steps=2, seq_len=POSITIONS, batch_size=4, eval_blocks=4, warmup=1))
    finetune(FinetuneRecipe(model=str(root / "base"), out=str(root / "full"), **TASK), progress=False)
    for kind in ("lora", "prefix"):
        finetune(FinetuneRecipe(model=str(root / "base"), out=str(root / kind), peft=kind, virtual_tokens=VIRTUAL,
                                **TASK), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        port(PortRecipe(adapter="lora", to="base", out="ported"))
        port(PortRecipe(adapter="ported", to="base", out="ported-twice"))
    recycle(RecycleRecipe(old_base=str(root / "base"), new_base=str(root / "base"), task_weights=str(root / "ported-twice"),
                          out=str(root / "recycled"), method="init", **{**TASK, "steps": 1}), progress=False)
    return root


def _front(folder) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def _classes() -> list[str]:
    return load_task("kind", "train").features["label"].names


def test_classifiers_say_their_classes_by_name(world):
    names = _classes()
    assert load_model(world / "full")[0].config.id2label == dict(enumerate(names))
    classify = transformers.pipeline("text-classification", model=str(world / "full"), device="cpu")
    assert classify(LONG, truncation=True)[0]["label"] in names  # not LABEL_1
    # An adapter folder says what the host needs: build it with labels.json and plain peft loads the head.
    from peft import PeftModel

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for folder in ("lora", "ported", "recycled"):
        saved = json.loads((world / folder / "labels.json").read_text())
        assert saved == {"num_labels": len(names), "names": names}, folder
        host = transformers.AutoModelForSequenceClassification.from_pretrained(  # as the card says
            world / "base", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        plain = PeftModel.from_pretrained(host, world / folder).eval()
        assert plain.config.id2label == dict(enumerate(names))
        ours = attach(load_model(world / "base", "seq_cls", num_labels=len(names))[0], read_module(world / folder))
        assert torch.equal(plain(input_ids=ids).logits, ours.eval()(input_ids=ids).logits), folder


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    """A BERT masked LM: it has no pooler, so a classifier on it starts one fresh."""
    root = tmp_path_factory.mktemp("mlm")
    pretrain(PretrainRecipe(out=str(root / "base"), family="bert", layers=1, hidden=32, heads=2, vocab=500,
                            domain="text", steps=2, seq_len=POSITIONS, batch_size=4, eval_blocks=4, warmup=1))
    return root / "base"


@pytest.mark.parametrize("kind", ["lora", "ia3", "prefix", "prompt", "bottleneck"])
def test_a_classifier_adapter_saves_the_pooler_its_masked_lm_lacked(masked_lm, tmp_path, kind):
    """The fresh pooler is trained and saved with the classifier: a plain transformers + peft load, whatever
    its random state, computes what bequest's own load computes (before, each load drew another pooler)."""
    from peft import PeftModel

    out = tmp_path / kind
    finetune(FinetuneRecipe(model=str(masked_lm), out=str(out), peft=kind, virtual_tokens=VIRTUAL, **TASK), progress=False)
    module, n = read_module(out), len(_classes())
    assert any(".pooler." in name for name in module.tensors), sorted(module.tensors)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours = attach(load_model(masked_lm, "seq_cls", num_labels=n)[0], module).eval()(input_ids=ids).logits
    if kind == "bottleneck":  # bequest's own format: its loader is the one to check
        theirs = [attach(load_model(masked_lm, "seq_cls", num_labels=n, seed=s)[0], read_module(out)).eval()
                  for s in (1, 2)]
    else:
        theirs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            host = transformers.AutoModelForSequenceClassification.from_pretrained(masked_lm, num_labels=n)
            theirs.append(PeftModel.from_pretrained(host, out).eval())
    for model in theirs:
        assert torch.allclose(model(input_ids=ids).logits, ours, atol=1e-6)


def test_tokenizers_stop_at_the_positions_the_text_has(world):
    for folder, room in (("base", POSITIONS), ("full", POSITIONS), ("lora", POSITIONS), ("prefix", POSITIONS - VIRTUAL)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(world / folder)
        assert tokenizer.model_max_length == room, folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(world / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "base")
    batch = tokenizer(LONG, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == POSITIONS and torch.isfinite(model(**batch).logits).all()


def test_every_adapter_folder_carries_a_lineage_card(world):
    base = str(world / "base")  # typed as "base" from the world's folder: the card says where that is
    for folder, operation in (("lora", "finetune"), ("ported", "port"), ("recycled", "recycle-init")):
        front = _front(world / folder)
        assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-classification", folder
        assert front["base_model"] == base and read_lineage(world / folder)["operation"] == operation, folder
        config = json.loads((world / folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base, folder
    assert read_lineage(world / "ported")["source"] == "lora" and read_lineage(world / "ported")["parent"] == "base"
    assert "PeftModel.from_pretrained" in (world / "lora" / "README.md").read_text()
    front = _front(world / "full")
    assert (front["library_name"], front["pipeline_tag"]) == ("transformers", "text-classification")
    assert _front(world / "base")["pipeline_tag"] == "text-generation"


def test_a_grown_model_card_names_its_pipeline(world, tmp_path):
    """`bequest grow` plans from config.json alone; its card still says what the model is for."""
    for source, tag in (("base", "text-generation"), ("full", "text-classification")):
        grow_command(GrowRecipe(src=str(world / source), out=str(tmp_path / source), layers=2))
        front = _front(tmp_path / source)
        assert (front["library_name"], front["pipeline_tag"]) == ("transformers", tag), source


def test_a_bottleneck_adapter_card_names_bequest_and_keeps_a_hub_id(tmp_path):
    host = tiny("gpt2", "seq_cls")
    model = with_module(host, new_config("bottleneck", host))
    write_adapter(tmp_path / "a", module_of(model), model.config, operation="test", parent="someone/tiny-gpt2")
    front = _front(tmp_path / "a")
    assert front["library_name"] == "bequest" and front["base_model"] == "someone/tiny-gpt2"
    assert json.loads((tmp_path / "a" / "labels.json").read_text())["num_labels"] == 3


def test_modules_to_save_stays_as_it_was_through_ports_and_recycling(world):
    saved = [json.loads((world / f / "adapter_config.json").read_text())["modules_to_save"]
             for f in ("lora", "ported", "ported-twice", "recycled")]
    assert saved[0] and len(set(saved[0])) == len(saved[0])
    assert all(s == saved[0] for s in saved), saved


def test_an_exported_adapter_is_a_model_folder_pipelines_take(world, tmp_path):
    """`bequest export`: the LoRA folded into its base, with the base's tokenizer and the classes by name."""
    from bequest.export import ExportRecipe, export
    from bequest.lineage import read_node

    export(ExportRecipe(adapter=str(world / "lora"), out=str(tmp_path / "model")))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "model").model_max_length == POSITIONS
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "model"), device="cpu")
    assert classify(LONG, truncation=True)[0]["label"] in _classes()
    front = _front(tmp_path / "model")
    assert (front["library_name"], front["pipeline_tag"], front["base_model"]) == ("transformers", "text-classification", str(world / "base"))
    node = read_node(tmp_path / "model")  # bequest lineage: a fine-tune of the base, carried from the LoRA
    assert (node.kind, node.operation, node.parent, node.source) == ("fine-tune", "export", world / "base", world / "lora")
