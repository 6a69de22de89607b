import json
from collections import Counter

import pytest
import transformers

from bequest.anatomy import FAMILIES, PlainConfig, anatomy, make_config, supported
from bequest.errors import BequestError
from conftest import CASES, tiny


@pytest.mark.parametrize("family,task", CASES)
def test_every_parameter_has_exactly_one_role(family, task):
    model = tiny(family, task)
    anat = anatomy(model)
    assert anat.task == task
    names = [n for n, _ in model.named_parameters()]
    slots = anat.slots(names)  # raises on any unmapped name
    assert len(slots) == len(names)
    twice = [s for s, c in Counter(map(str, slots.values())).items() if c > 1]
    assert not twice, twice
    # Every block carries the same roles, and the names map back.
    per_layer = [sorted(str(s).split(".", 2)[2] for s in slots.values() if s.layer == i) for i in range(anat.layers)]
    assert all(p == per_layer[0] for p in per_layer) and per_layer[0]
    assert set(anat.names(names).values()) == set(names)


@pytest.mark.parametrize("family,task", CASES)
def test_facts(family, task):
    anat = anatomy(tiny(family, task))
    assert (anat.hidden, anat.layers, anat.heads, anat.ffn, anat.head_dim) == (32, 2, 4, 64, 8)
    assert anat.kv_heads == (2 if family in ("llama", "mistral", "qwen2") else 4)
    assert anat.family.norm_position == ("post" if family in ("bert", "roberta") else "pre")
    assert anat.family.norm == ("layernorm" if family in ("gpt2", "bert", "roberta") else "rmsnorm")
    assert anat.eps > 0
    roles = {s.role for s in anat.slots(n for n, _ in tiny(family, task).named_parameters()).values()}
    if family == "gpt2":
        assert anat.family.fused_qkv and anat.family.conv1d and "attn.qkv" in roles
    else:
        assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= roles
    if task in ("causal_lm", "masked_lm") and not anat.tied:
        assert "lm_head" in roles
    if task == "seq_cls":
        assert "classifier" in roles


def test_gpt2_fused_qkv_layout():
    # The anatomy's claim that c_attn is [in, 3 * hidden] (Conv1D, transposed) holds.
    model = tiny("gpt2", "causal_lm")
    assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (32, 96)


def test_unsupported_architecture_lists_supported():
    config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64)
    with pytest.raises(BequestError, match="supports: " + ", ".join(supported())):
        anatomy(config)


def test_bad_shapes_are_refused():
    with pytest.raises(BequestError, match="multiple of --heads"):
        make_config("gpt2", layers=1, hidden=30, heads=4, vocab=100)
    with pytest.raises(BequestError, match="must divide"):
        make_config("llama", layers=1, hidden=32, heads=4, kv_heads=3, vocab=100)
    with pytest.raises(BequestError, match="unknown family"):
        make_config("t5", layers=1, hidden=32, heads=4, vocab=100)


# Settings that change which parameters a model has, or their shapes.
VARIANTS = [{}, {"tie_word_embeddings": False}, {"tie_word_embeddings": True}, {"attention_bias": True},
            {"mlp_bias": True}, {"n_inner": None}, {"type_vocab_size": 3}]


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) or "plain")
def test_parameters_from_the_config_alone_are_the_models(family, task, variant):
    """Checking and growing a checkpoint know every parameter's name, shape and order from config.json alone,
    without building a model; they must be the model's own (growth draws random numbers in that order)."""
    import torch

    from bequest.anatomy import AUTO_CLASSES

    config = make_config(family, layers=2, hidden=32, heads=4, ffn=64, vocab=120, num_labels=3,
                         **({"kv_heads": 2} if family in ("llama", "mistral", "qwen2") else {}), **variant)
    with torch.device("meta"):
        model = getattr(transformers, AUTO_CLASSES[task]).from_config(config)
    expected = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert list(anatomy(config, task).parameters().items()) == expected
    plain = PlainConfig(json.loads(config.to_json_string()))
    assert list(anatomy(plain, task).parameters().items()) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_plain_config_reads_defaults_as_transformers_does(family):
    """A config.json that leaves settings out: bequest's defaults are the transformers config class's."""
    fam = FAMILIES[family]
    cls = getattr(transformers, fam.config_class)
    for settings in [{}, {fam.config_keys["hidden"]: 64, fam.config_keys["heads"]: 4}]:
        plain, real = PlainConfig({"model_type": family, **settings}), cls(**settings)
        for key in [*fam.defaults, "num_labels"]:
            assert getattr(plain, key) == getattr(real, key), key
        assert anatomy(plain).summary() == anatomy(real).summary()  # what bequest derives: KV heads, head size, FFN
