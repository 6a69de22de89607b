"""bequest.data: the embedded corpus, its tasks, the local tokenizers and user files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bequest.data import (
    DOMAINS,
    TASKS,
    load_corpus,
    load_labeled_files,
    load_task,
    load_text_files,
    task_labels,
    tokenizer_kind,
    train_tokenizer,
)
from bequest.data import tokenizer as tokenizer_module
from bequest.errors import BequestError

VOCAB = 500
SRC = Path(__file__).resolve().parents[1] / "src"


def fingerprint(cache_dir: str) -> dict[str, str]:
    """Hashes of the corpus, one task and a trained tokenizer; run here and in fresh processes."""
    sha = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()  # noqa: E731
    corpus = {split: load_corpus(None, split).to_dict() for split in ("train", "validation")}
    task = {split: load_task("arity", split).to_dict() for split in ("train", "validation")}
    tok = train_tokenizer("bpe", VOCAB, cache_dir=cache_dir)
    return {"corpus": sha(corpus), "task": sha(task), "vocab": sha(sorted(tok.get_vocab().items()))}


# --- corpus -------------------------------------------------------------------------


def test_every_domain_has_both_splits_without_overlap(capsys):
    assert len(DOMAINS) >= 4
    report = []
    for domain in DOMAINS:
        train, val = load_corpus(domain, "train"), load_corpus(domain, "validation")
        assert train.column_names == ["text", "domain", "name"]
        assert len(train) > 0 and len(val) > 0
        assert set(train["domain"]) == set(val["domain"]) == {domain}
        assert not set(train["name"]) & set(val["name"])
        assert not set(train["text"]) & set(val["text"])
        assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
        assert sum(map(len, list(train["text"]) + list(val["text"]))) > 100_000, domain
        for split, ds in (("train", train), ("validation", val)):
            report.append(f"{domain:9s} {split:10s} {len(ds):5d} docs {sum(map(len, ds['text'])):8,d} chars")
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_all_domains_is_the_union_and_documents_are_clean():
    everything = load_corpus()
    assert len(everything) == sum(len(load_corpus(d)) for d in DOMAINS)
    texts = list(everything["text"])
    assert len(set(texts)) == len(texts)  # identical docstrings kept once
    assert min(map(len, texts)) >= 40
    assert len(set(everything["name"])) == len(texts)


def test_unknown_domain_or_split_lists_the_valid_ones():
    with pytest.raises(BequestError, match="text.*language") as err:
        load_corpus("poetry")
    assert "\n" not in str(err.value)
    with pytest.raises(BequestError, match="train, validation"):
        load_corpus("text", "test")


def test_same_data_in_fresh_processes(tmp_path_factory, bpe_cache):
    # Two fresh interpreters with different hash seeds race to train into one cache dir.
    shared = str(tmp_path_factory.mktemp("race"))
    code = (
        f"import json, sys; sys.path[:0] = [{str(SRC)!r}, {str(Path(__file__).parent)!r}]; "
        f"from test_data import fingerprint; print(json.dumps(fingerprint({shared!r})))"
    )
    procs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "BEQUEST_CACHE": shared}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True))
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == fingerprint(bpe_cache)
    assert not [p for p in Path(shared, "tokenizers").iterdir() if p.name.startswith(".")]  # no temp dirs left


# --- tasks --------------------------------------------------------------------------


def test_tasks_have_three_classes_and_valid_labels(capsys):
    assert len(TASKS) >= 5
    report = []
    for name in TASKS:
        names = task_labels(name)
        assert len(names) >= 3
        for split in ("train", "validation"):
            ds = load_task(name, split)
            assert ds.column_names == ["text", "label"]
            assert ds.features["label"].names == names
            labels = list(ds["label"])
            assert all(0 <= y < len(names) for y in labels)
            assert max(map(len, ds["text"])) <= 512
            counts = Counter(labels)
            if split == "train":
                assert len(counts) >= 3 and len(ds) <= 5000
            report.append(f"{name:10s} {split:10s} " + " ".join(f"{names[i]}={counts[i]}" for i in range(len(names))))
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(BequestError, match="domain, kind, module, arity, visibility"):
        load_task("sentiment")
    with pytest.raises(BequestError, match="choose one of"):
        task_labels("sentiment")


# --- tokenizers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe(bpe_cache):
    return train_tokenizer("bpe", VOCAB, cache_dir=bpe_cache)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return train_tokenizer("wordpiece", VOCAB, cache_dir=tmp_path_factory.mktemp("wp"))


def test_bpe_round_trips_and_wraps_sequences(bpe):
    samples = list(load_corpus("language", "validation")["text"])[:20]
    samples.append("  Ünïcödé ☃ 😀\n\ttabs  and\r\nCRLF ")
    for text in samples:
        assert bpe.decode(bpe(text)["input_ids"], skip_special_tokens=True) == text
    ids = bpe("hello world")["input_ids"]
    assert ids[0] == bpe.bos_token_id and ids[-1] == bpe.eos_token_id
    pair = bpe.convert_ids_to_tokens(bpe("a", "b")["input_ids"])
    assert pair[0] == "<s>" and pair[-1] == "</s>" and pair.count("</s>") == 3 and pair[2:4] == ["</s>", "</s>"]
    assert (bpe.pad_token, bpe.unk_token, bpe.mask_token) == ("<pad>", "<unk>", "<mask>")
    assert len(bpe) == VOCAB and bpe.model_max_length == 1024


def test_wordpiece_lowercases_and_uses_bert_template(wordpiece):
    enc = wordpiece("Hello World", "Second ONE")
    tokens = wordpiece.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    assert wordpiece.decode(wordpiece("Hello World")["input_ids"], skip_special_tokens=True) == "hello world"
    assert (wordpiece.cls_token, wordpiece.sep_token, wordpiece.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert (wordpiece.unk_token, wordpiece.mask_token) == ("[UNK]", "[MASK]")


def test_cache_hit_does_not_retrain(bpe, bpe_cache, monkeypatch):
    (cached,) = Path(bpe_cache, "tokenizers").iterdir()
    mtime = cached.stat().st_mtime_ns

    def boom(*args):
        raise AssertionError("retrained although the cache was warm")

    monkeypatch.setattr(tokenizer_module, "_train", boom)
    again = train_tokenizer("bpe", VOCAB, cache_dir=bpe_cache, model_max_length=64)
    assert again.get_vocab() == bpe.get_vocab() and again.model_max_length == 64
    assert cached.stat().st_mtime_ns == mtime


def test_training_is_deterministic(bpe, tmp_path_factory):
    assert train_tokenizer("bpe", VOCAB, cache_dir=tmp_path_factory.mktemp("bpe2")).get_vocab() == bpe.get_vocab()
    a = train_tokenizer("wordpiece", VOCAB, cache_dir=tmp_path_factory.mktemp("wp2"))
    b = train_tokenizer("wordpiece", VOCAB, cache_dir=tmp_path_factory.mktemp("wp3"))
    assert a.get_vocab() == b.get_vocab()  # "##x" ids used to follow hash-map order


def test_tokenizer_kind_and_bad_arguments():
    assert tokenizer_kind("bert") == "wordpiece"
    assert {tokenizer_kind(f) for f in ("gpt2", "roberta", "llama", "mistral", "qwen2")} == {"bpe"}
    with pytest.raises(BequestError, match="bert"):
        tokenizer_kind("t5")
    with pytest.raises(BequestError, match="bpe, wordpiece"):
        train_tokenizer("unigram")


# --- user files ---------------------------------------------------------------------

WORDS, LABELS = ["yes", "no", "maybe"], ["pos", "neg", "meh"]
ROWS = [{"text": f"example {i} says {WORDS[i % 3]}", "label": LABELS[i % 3]} for i in range(60)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "lines.txt").write_text("\n".join(r["text"] for r in ROWS) + "\n\n")
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    with open(root / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    table = pa.Table.from_pylist([{"body": r["text"], "y": i % 4} for i, r in enumerate(ROWS)])
    pq.write_table(table, root / "rows.parquet")
    (root / "split").mkdir()
    (root / "split" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:50]))
    (root / "split" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[50:]))
    (root / "split" / "README.md").write_text("ignored: not a data file")
    (root / "empty.csv").write_text("")
    (root / "notes.xml").write_text("<a/>")
    return root


@pytest.mark.parametrize(
    "name, column", [("lines.txt", "text"), ("rows.jsonl", "text"), ("rows.csv", "text"), ("rows.parquet", "body")]
)
def test_text_files_load_and_split_stably(files, name, column):
    train = load_text_files(files / name, "train", text_column=column, validation_fraction=0.3)
    val = load_text_files(files / name, "validation", text_column=column, validation_fraction=0.3)
    assert train.column_names == ["text"] and len(train) > 0 and len(val) > 0
    assert len(train) + len(val) == len(ROWS)  # blank lines dropped
    assert not set(train["text"]) & set(val["text"])
    again = load_text_files(files / name, "validation", text_column=column, validation_fraction=0.3)
    assert list(again["text"]) == list(val["text"])
    assert len(load_text_files(files / name, "validation", text_column=column)) < len(val)


def test_string_labels_become_sorted_ids(files):
    train = load_labeled_files(files / "rows.jsonl")
    val = load_labeled_files(files / "rows.jsonl", "validation")
    names = train.features["label"].names
    assert names == val.features["label"].names == ["meh", "neg", "pos"]
    assert train.column_names == ["text", "label"]
    for row in train:
        assert names[row["label"]] == {"yes": "pos", "no": "neg", "maybe": "meh"}[row["text"].split()[-1]]
    ints = load_labeled_files(files / "rows.parquet", text_column="body", label_column="y")
    assert ints.features["label"].names == ["0", "1", "2", "3"]
    assert len(load_labeled_files(files / "rows.csv")) == len(train)


def test_validation_file_in_a_directory_is_used(files):
    assert len(load_labeled_files(files / "split")) == 50
    assert len(load_labeled_files(files / "split", "validation")) == 10


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: load_text_files(f / "missing.csv"), "does not exist"),
        (lambda f: load_text_files(f / "notes.xml"), "unsupported extension"),
        (lambda f: load_text_files(f / "rows.csv", text_column="body"), "no column 'body'.*--text-column"),
        (lambda f: load_labeled_files(f / "rows.csv", label_column="y"), "no column 'y'.*--label-column"),
        (lambda f: load_labeled_files(f / "lines.txt"), "hold no labels"),
        (lambda f: load_text_files(f / "empty.csv"), "empty.csv is empty"),
        (lambda f: load_text_files(f), "mixes formats"),
        (lambda f: load_text_files(f / "rows.csv", "test"), "train, validation"),
    ],
)
def test_bad_user_files_raise_one_line_errors(files, call, message):
    with pytest.raises(BequestError, match=message) as err:
        call(files)
    assert "\n" not in str(err.value)


def test_label_column_needs_two_labels_of_one_type(tmp_path):
    """One label would train a regression model scoring 1.000; mixed types used to crash inside Arrow."""
    rows = [{"text": f"document {i} says something", "label": "only"} for i in range(30)]
    (tmp_path / "single.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BequestError, match="at least two labels.*--label-column"):
        load_labeled_files(tmp_path / "single.jsonl")
    rows = [{"text": f"document {i} says something", "label": i % 3 if i % 2 else "x"} for i in range(30)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BequestError, match="all strings or all integers"):
        load_labeled_files(tmp_path / "mixed.jsonl")


def test_file_settings_reach_the_reader(tmp_path):
    """--text-column / --label-column / --validation-fraction, which the errors recommend, exist and work."""
    from bequest.data.prepare import task_splits
    from bequest.finetune import FinetuneRecipe

    rows = [{"body": f"document {i} says something", "y": "ab"[i % 2]} for i in range(60)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = FinetuneRecipe(model="m", out="o", data=str(tmp_path / "rows.jsonl"), text_column="body", label_column="y",
                       validation_fraction=0.5)
    train, val = task_splits(r.data, files=r)
    assert len(train) + len(val) == 60 and len(val) > 15 and val.features["label"].names == ["a", "b"]
