"""Sharded growth (grow/sharded.py) writes what the in-memory path writes, atomically."""

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from bequest.errors import BequestError
from bequest.grow import GrowSpec, grow, sharded
from bequest.grow.command import GrowRecipe, grow_command
from bequest.io import atomic_dir, load_model, parse_size, save_model, weight_files
from conftest import CASES as CASES_ALL
from test_grow import ODD, shape, trained

SHARD = "20KB"  # tiny models still come in several shards


def save(path, model):
    save_model(path, model, operation="pretrain", max_shard_size=SHARD)
    return path


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in weight_files(Path(folder)):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def grown_sharded(src, out, **kwargs):
    plan = sharded.plan(src, GrowSpec(**kwargs), shard_size=parse_size(SHARD))
    with atomic_dir(out) as folder:
        sharded.write(plan, folder, progress=False)
    return plan


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


Case = namedtuple("Case", "family task config grow")
CASES = [
    Case(fam, "", {}, {**shape(fam, ODD, layers=4 if depth == "solar" else 5), "width": width, "depth": depth})
    for fam in ("gpt2", "llama", "bert")
    for width, depth in [("exact", "identity"), ("fpi", "stack"), ("aki", "interleave"), ("exact", "solar")]
] + [
    Case("llama", "", {}, {"layers": 5}),  # unchanged width: pure copies and zeros
    Case("llama", "", {}, {"layers": 5, "noise": 1e-3, "seed": 3}),  # ... except the noised new blocks
    Case("llama", "", {}, {**shape("llama", ODD), "width": "fpi", "noise": 1e-3}),
    Case("llama", "", {"tie_word_embeddings": True}, shape("llama", ODD)),
    Case("qwen2", "seq_cls", {}, {**shape("qwen2", ODD), "depth": "stack"}),
    Case("bert", "seq_cls", {}, {"hidden": 64, "width": "fpi", "layers": 3}),  # pooler and classifier
    Case("roberta", "", {}, {"hidden": 48, "heads": 6, "width": "aki", "layers": 3}),
    Case("gpt2", "", {"scale_attn_by_inverse_layer_idx": True}, {"layers": 5}),  # moved q is rescaled
    Case("gpt2", "", {}, {"layers": 5, "placement": "top"}),
]


def _id(c: Case) -> str:
    return "-".join([c.family, c.task or "lm", *c.config, *(f"{k}{v}" for k, v in c.grow.items())])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sharded_equals_in_memory_bit_for_bit(case, tmp_path):
    model = trained(case.family, case.task, **case.config)
    src = save(tmp_path / "src", model)
    grown = grow(model, GrowSpec(**case.grow))
    save_model(tmp_path / "memory", grown.model, operation="grow", max_shard_size=SHARD)
    plan = grown_sharded(src, tmp_path / "sharded", **case.grow)
    assert_same(tensors(tmp_path / "memory"), tensors(tmp_path / "sharded"))
    assert plan.maps == grown.maps
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text()) == memory_config


def test_unchanged_width_only_copies_bytes(tmp_path, monkeypatch):
    src = save(tmp_path / "src", trained("llama"))
    monkeypatch.setattr(sharded, "_widen", lambda *a: pytest.fail("arithmetic on a depth-only identity growth"))
    plan = grown_sharded(src, tmp_path / "out", layers=6)
    hows = {o.name: o.how for shard in plan.shards for o in shard}
    assert set(hows.values()) == {"copy", "zeros"}
    assert hows["model.layers.1.mlp.down_proj.weight"] == "zeros"
    assert len(plan.shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_copies_without_a_file_to_file_sendfile(tmp_path, monkeypatch):
    model = trained("llama")
    src = save(tmp_path / "src", model)

    def sockets_only(*args):
        raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

    monkeypatch.setattr("bequest.io.safetensors.os.sendfile", sockets_only)  # as on macOS
    grown_sharded(src, tmp_path / "sharded", layers=5)
    save_model(tmp_path / "memory", grow(model, GrowSpec(layers=5)).model, operation="grow")
    assert_same(tensors(tmp_path / "memory"), tensors(tmp_path / "sharded"))


@pytest.mark.parametrize("grow_kwargs", [{"layers": 5}, shape("llama", ODD)])
def test_bf16_stays_bf16_and_rounds_the_fp32_result_once(tmp_path, grow_kwargs):
    src = save(tmp_path / "src", trained("llama").to(torch.bfloat16))
    model, _ = load_model(src, with_tokenizer=False)  # the in-memory path upcasts to fp32
    expected = {k: v.to(torch.bfloat16) for k, v in grow(model, GrowSpec(**grow_kwargs)).model.state_dict().items()}
    grown_sharded(src, tmp_path / "out", **grow_kwargs)
    assert_same(expected, tensors(tmp_path / "out"))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


# ---------------------------------------------------------------- the command


def test_command_writes_shards_and_skips_the_probe_when_told(tmp_path, capsys):
    src = save(tmp_path / "src", trained("llama"))
    out = tmp_path / "big"
    result = grow_command(GrowRecipe(src=str(src), out=str(out), layers=5, hidden=48, heads=6, kv_heads=3,
                                     shard_size="30KB", probe=False))
    assert result["max_abs_logit_change"] is None and "not measured" in capsys.readouterr().out
    growth = json.loads((out / "growth.json").read_text())
    assert growth["weights"]["shards"] > 1 and "--no-probe" in growth["probe"]["skipped"]
    assert "not measured" in (out / "README.md").read_text()
    sizes = [f.stat().st_size for f in weight_files(out)]
    assert max(sizes) < 30_000 + 4096  # a shard's tensors fit the size; its header comes on top
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads as any Hugging Face folder


# Every family and head, and the settings the probe's numpy forward reads; a RoPE kind it does not do
# (linear scaling) sends the probe to transformers' own modules.
PROBED = [(fam, task, {}) for fam, task in CASES_ALL] + [
    ("gpt2", "seq_cls", {"pad_token_id": 0}),
    ("gpt2", "causal_lm", {"scale_attn_by_inverse_layer_idx": True, "activation_function": "relu"}),
    ("llama", "causal_lm", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", "seq_cls", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "pad_token_id": 3}),
    ("bert", "masked_lm", {"hidden_act": "gelu_new", "tie_word_embeddings": False}),
    ("llama", "causal_lm", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
]


@pytest.mark.parametrize("family, task, config", PROBED, ids=[f"{f}-{t}-{','.join(c)}" for f, t, c in PROBED])
def test_probe_reads_modules_from_the_shards_and_agrees_with_loaded_models(tmp_path, monkeypatch, family, task, config):
    """The probe is on at every size because it never holds a model: module by module from the shards,
    it must measure what the loaded models measure (noise makes the change non-zero)."""
    from bequest.grow import max_abs_logit_change, probe
    from bequest.grow.probe import probe_ids

    by_transformers = []
    monkeypatch.setattr(probe, "folder_outputs", lambda *a, real=probe.folder_outputs: by_transformers.append(1) or real(*a))
    src = save(tmp_path / "src", trained(family, task, **config))
    report = grow_command(GrowRecipe(src=str(src), out=str(tmp_path / "g"), layers=3, noise=0.02, shard_size="20KB"))
    old, new = load_model(src)[0], load_model(tmp_path / "g")[0]
    loaded = max_abs_logit_change(old, new, probe_ids(old))
    assert report["max_abs_logit_change"] == pytest.approx(loaded, rel=1e-4, abs=1e-6) and loaded > 1e-4
    assert bool(by_transformers) == ("linear" in str(config))


def test_probe_takes_copied_blocks_only_when_their_bytes_on_disk_match(tmp_path, monkeypatch):
    """A depth growth's copied blocks are not run again: the probe compares their written bytes with the
    source block's and takes its output. A block whose bytes on disk differ is run, and measured."""
    from safetensors.torch import save_file

    from bequest.grow.forward import Model
    from bequest.grow.probe import probe_folders, probe_ids
    from bequest.io import read_config

    src = save(tmp_path / "src", trained("llama"))
    out = tmp_path / "deep"
    with atomic_dir(out) as folder:  # blocks: 0, a new one, 1, a new one; in one file
        sharded.write(sharded.plan(src, GrowSpec(layers=4), shard_size=10**9), folder, progress=False)
    ran, real = [], Model.block
    monkeypatch.setattr(Model, "block", lambda self, h, i: ran.append((self.layers, i)) or real(self, h, i))
    ids = probe_ids(read_config(src))
    assert probe_folders(src, out, ids) == 0
    assert sorted(ran) == [(2, 0), (2, 1), (4, 1), (4, 3)]  # the source's blocks and the two new ones
    grown = tensors(out)
    grown["model.layers.2.mlp.up_proj.weight"] *= 1.5  # block 2 is source block 1's copy
    save_file(grown, str(out / "model.safetensors"), metadata={"format": "pt"})
    ran.clear()
    assert probe_folders(src, out, ids) > 1e-3 and (4, 2) in ran


def test_copied_tensors_are_compared_as_they_are_written(tmp_path, monkeypatch):
    """The writer tells the probe of each copy while both are in the page cache; once the model is
    written, no copied block is run or found equal again (a new block is only told apart from the
    source block after its own). Only pairs found equal count as known."""
    from bequest.grow import forward, probe

    compared, after = [], []
    monkeypatch.setattr(probe, "same_bytes", lambda *a, real=probe.same_bytes: compared.append(a[1:]) or real(*a))
    monkeypatch.setattr(forward, "same_bytes", lambda *a, real=forward.same_bytes: after.append(real(*a)) or after[-1])
    ran, real_block = [], forward.Model.block
    monkeypatch.setattr(forward.Model, "block", lambda self, h, i: ran.append((self.layers, i)) or real_block(self, h, i))
    src = save(tmp_path / "src", trained("llama"))
    report = grow_command(GrowRecipe(src=str(src), out=str(tmp_path / "deep"), layers=4))
    plan = sharded.plan(src, GrowSpec(layers=4), shard_size=2 * 10**9)
    copies = [o.name for shard in plan.shards for o in shard if o.how == "copy"]
    assert report["max_abs_logit_change"] == 0
    assert sorted(copy.name for _, copy in compared) == sorted(copies) and not any(after)
    assert sorted(ran) == [(2, 0), (2, 1), (4, 1), (4, 3)]

    stored = {n: s for f in weight_files(tmp_path / "deep") for n, s in forward.stored_tensors(f).items()}
    q = "model.layers.{}.self_attn.q_proj.weight"
    with probe.probing(src, probe.probe_ids(plan.anat.config)) as p:  # a copy reported wrongly: not known
        source = next(s for f in weight_files(src) for n, s in forward.stored_tensors(f).items() if n == q.format(0))
        p.read(source, stored[q.format(2)])  # grown block 2 is source block 1
        assert p.against(tmp_path / "deep") == 0 and p.equal == set()


@pytest.mark.parametrize("grow_kwargs", [{"layers": 4}, {"hidden": 48, "heads": 6, "kv_heads": 3}], ids=["depth", "width"])
def test_the_source_pass_reads_only_what_the_writer_has_read(tmp_path, grow_kwargs):
    """While the grown model is written, the probe's pass over the source follows the writer (so the two
    never read from disk side by side); copies and computed tensors alike let it on."""
    from bequest.grow import probe

    src = save(tmp_path / "src", trained("llama"))
    plan = sharded.plan(src, GrowSpec(**grow_kwargs), shard_size=2 * 10**9)
    events = []
    with probe.probing(src, probe.probe_ids(plan.anat.config)) as p, atomic_dir(tmp_path / "out") as folder:
        mapped = p.old.reader.mapped
        # (the few embedding rows of the probe's tokens are read as they are: a few pages)
        p.old.reader.mapped = lambda s, whole=True: (whole and events.append(("probe", s.name))) or mapped(s, whole)

        def read(source, copy=None):
            events.append(("writer", source.name))
            time.sleep(0.002)  # give the probe's thread time to run ahead, if it could
            p.read(source, copy)

        sharded.write(plan, folder, progress=False, on_read=read)
        assert p.against(folder) == pytest.approx(0, abs=1e-5)
    probed = [name for who, name in events if who == "probe"]
    assert len(probed) > 10
    for k, (who, name) in enumerate(events):
        if who == "probe":
            assert ("writer", name) in events[:k], f"the probe read {name} before the writer"


def test_products_split_over_threads_match_one_thread(tmp_path, monkeypatch):
    """Big products are split over threads by rows (Conv1D: by inputs, partial sums added in order)."""
    import contextlib

    from bequest.grow import forward
    from bequest.grow.probe import probe_ids, source_pass
    from bequest.io import read_config

    def run(folder, threads):
        monkeypatch.setattr(forward, "THREADS", threads)
        monkeypatch.setattr(forward, "CHUNK", 256)  # every weight of the tiny models is several slices
        ranges = []
        monkeypatch.setattr(forward.Model, "_split", lambda self, part, s, real=forward.Model._split:
                            real(self, lambda rows: ranges.append(rows) or part(rows), s))
        with contextlib.ExitStack() as stack:
            model = forward.Model(folder, probe_ids(read_config(folder)), stack)
            trace, outputs = source_pass(model, threading.Event())
        return outputs, any(rows.start > 0 for rows in ranges)

    for family in ("gpt2", "llama"):
        src = save(tmp_path / family, trained(family))
        (one, split_one), (three, split_three) = run(src, 1), run(src, 3)
        assert not split_one and split_three
        for a, b in zip(one, three):
            assert abs(a - b).max() <= 1e-5 * abs(a).max()


LIGHT = """
import sys
from pathlib import Path
from bequest.grow import GrowSpec, sharded
from bequest.grow.probe import probe_folders, probe_ids
from bequest.io import atomic_dir

src, out = map(Path, sys.argv[1:])
plan = sharded.plan(src, GrowSpec(layers=5))
with atomic_dir(out) as folder:
    sharded.write(plan, folder, progress=False)
print(probe_folders(src, out, probe_ids(plan.anat.config)))
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_depth_growth_and_its_probe_import_neither_torch_nor_transformers(tmp_path):
    """Their imports take longer than growing a 2 GB checkpoint: planning reads config.json and the headers,
    copying moves bytes, the probe runs numpy."""
    src = save(tmp_path / "src", trained("llama"))
    r = subprocess.run([sys.executable, "-c", LIGHT, str(src), str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.stdout.splitlines() == ["0.0", "[]"], r.stderr[-2000:]


def test_full_disk_is_refused_up_front(tmp_path, monkeypatch):
    src = save(tmp_path / "src", trained("llama"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("bequest.io.safetensors.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(BequestError, match=r"0\.00 GB free but the grown model needs 0\.07 GB"):
        grow_command(GrowRecipe(src=str(src), out=str(tmp_path / "out" / "big"), layers=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing was created


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500 mb", 5 * 10**8), ("4GiB", 2**32), ("1234", 1234)])
def test_shard_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "2XB", "0GB", "-1MB", "inf", "nan"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(BequestError, match="write it like 2GB"):
        parse_size(text)


# ---------------------------------------------------------------- a killed run

KILLER = """
import os, signal, sys
from bequest.grow import sharded
from bequest.grow.command import GrowRecipe, grow_command

src, out, where = sys.argv[1:]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if where == "weights":  # in the middle of the shards
    real, calls = sharded.pwrite, []
    def pwrite(*a):
        calls.append(1)
        (die if len(calls) == 8 else real)(*a)
    sharded.pwrite = pwrite
else:  # after the weights, the index and the config, before the card
    sharded.copy_tokenizer = die
grow_command(GrowRecipe(src=src, out=out, layers=5, hidden=48, heads=6, kv_heads=3, shard_size="20KB", probe=False))
"""


@pytest.mark.parametrize("where", ["weights", "card"])
def test_a_killed_run_leaves_nothing_that_looks_complete(tmp_path, where):
    src = save(tmp_path / "src", trained("llama"))
    out = tmp_path / "big"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", KILLER, str(src), str(out), where], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not out.exists()
    [left] = [p for p in tmp_path.iterdir() if p.name != "src"]
    assert left.name.startswith(".big.tmp-")  # hidden, and named for what it is
    names = {p.name for p in left.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert ("config.json" in names) == ("model.safetensors.index.json" in names) == (where == "card")
    with pytest.raises(BequestError):
        load_model(out)


def test_the_next_grow_removes_what_a_killed_grow_left(tmp_path):
    src = save(tmp_path / "src", trained("llama"))
    stale = tmp_path / ".big.tmp-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 4096)
    grow_command(GrowRecipe(src=str(src), out=str(tmp_path / "big"), layers=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "src"]


@pytest.mark.parametrize("noise, dtype", [(1e39, torch.float32), (1e6, torch.float16)])
def test_noise_that_breaks_the_weights_is_an_error(tmp_path, noise, dtype):
    """The probe read NaN/inf as "no change" (max() keeps the old value past a NaN); non-finite weights are refused."""
    src = save(tmp_path / "src", trained("llama").to(dtype))
    with pytest.raises(BequestError, match="non-finite"):
        grow_command(GrowRecipe(src=str(src), out=str(tmp_path / "big"), hidden=48, heads=6, kv_heads=3,
                                noise=noise))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_probe_refuses_non_finite_outputs():
    from bequest.grow import max_abs_logit_change

    old, new = trained("llama"), trained("llama")
    with torch.no_grad():
        next(new.parameters()).fill_(float("nan"))
    with pytest.raises(BequestError, match="not finite"):
        max_abs_logit_change(old, new, torch.randint(0, 100, (2, 8)))
