"""The packages corpus: built from installed packages' source with ast, deterministic, cached, split by module,
and recorded (package versions) in every recipe that reads it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bequest.data import docstrings, load_corpus, packages
from bequest.data.corpus import build_docs, corpus_docs, split_of
from bequest.data.prepare import domain_texts
from bequest.errors import BequestError

SRC = Path(__file__).resolve().parents[1] / "src"
# Two small packages bequest depends on stand in for the big ones: the same code path, in seconds.
SMALL = {"stdlib": (), "rich": ("rich",), "pydantic": ("pydantic",)}


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(packages, "DOMAINS", SMALL)
    packages._domain_docs.cache_clear()
    yield
    packages._domain_docs.cache_clear()


def build(monkeypatch, cache) -> tuple[dict, dict]:
    """Every document of both splits, and the bytes of every cache file, built into a fresh cache."""
    monkeypatch.setenv("BEQUEST_CACHE", str(cache))
    packages._domain_docs.cache_clear()
    docs = {split: corpus_docs(None, split, "packages") for split in ("train", "validation")}
    return docs, cache_files(cache)


def cache_files(cache) -> dict:
    return {f.name: f.read_bytes() for f in sorted((cache / "corpus").iterdir())}


# At module level, with no main guard: the worker interpreters must not import the caller's script again.
SCRIPT = """from bequest.data import packages
packages.DOMAINS = {"rich": ("rich",), "pydantic": ("pydantic",)}
packages.package_docs()
"""


def test_builds_byte_identical_in_workers_and_in_process_split_by_module(small, monkeypatch, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "BEQUEST_CACHE": str(tmp_path / "a"), "PYTHONPATH": path}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "building the packages corpus from rich, pydantic" in r.stderr, r.stderr[-2000:]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one core: read in this process
    docs, files = build(monkeypatch, tmp_path / "b")
    assert files == cache_files(tmp_path / "a")
    py = "".join(platform.python_version_tuple()[:2])
    assert sorted(files) == sorted(f"{d}-{metadata.version(d)}-py{py}-r1.jsonl" for d in ("rich", "pydantic"))

    every = docs["train"] + docs["validation"]
    assert {d.domain for d in every} == set(SMALL)
    for domain in ("rich", "pydantic"):
        train = [d for d in docs["train"] if d.domain == domain]
        val = [d for d in docs["validation"] if d.domain == domain]
        assert 0.03 < len(val) / (len(train) + len(val)) < 0.3, domain
        assert not {d.module for d in train} & {d.module for d in val}  # whole modules are held out
        texts = [d.text for d in train + val]
        assert len(set(texts)) == len(texts) and min(map(len, texts)) >= docstrings.MIN_CHARS
        assert not any(part in packages.SKIP_DIRS for d in train + val for part in d.module.split("."))
        assert {d.kind for d in train + val} == {"module", "class", "function", "method"}
        assert all(d.name.startswith(d.module) and d.module.split(".")[0] == domain for d in train + val)
    # What ast found is what the source says (rich.print(*objects, sep, end, file, flush): 5 parameters).
    by_name = {d.name: d for d in every}
    assert by_name["rich.print"].kind == "function" and by_name["rich.print"].arity == 5
    assert by_name["rich.console.Console"].kind == "class" and "console" in by_name["rich.console.Console"].text.lower()
    assert by_name["pydantic.main.BaseModel.model_dump"].kind == "method"
    # The standard library is one domain: the default corpus, with its own split.
    stdlib = [(d.name, d.text, split) for split in docs for d in docs[split] if d.domain == "stdlib"]
    assert sorted(stdlib) == sorted((d.name, d.text, split_of(d.name)) for d in build_docs())


def test_one_file_gives_its_docstrings_in_source_order_with_their_owners(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        '"""The module\'s docstring, long enough to be kept as a document."""\n'
        "class A:\n"
        '    """The class\'s docstring, long enough to be kept as a document."""\n'
        "    if True:\n"
        "        def f(self, x, *a, **k):\n"
        '            """A method defined in an if block, long enough to be kept."""\n'
        "    def g(self):\n"
        '        """Short."""\n'
        "        def inner(y):\n"
        '            """A function inside a method, long enough to be kept here."""\n'
        "        def odd():\n"
        '            """A lone surrogate \\udc80 that UTF-8 and tokenizers would refuse."""\n'
    )
    got = [(r["name"], r["kind"], r["arity"]) for r in docstrings.file_docs(str(source), "m")]
    assert got == [("m", "module", None), ("m.A", "class", None), ("m.A.f", "method", 3),
                   ("m.A.g.inner", "function", 1)]


def test_domains_load_alone_joined_and_refuse_unknown_ones(small):
    rich = load_corpus("rich", "train", corpus="packages")
    assert rich.column_names == ["text", "domain", "name"] and set(rich["domain"]) == {"rich"}
    joined = domain_texts("rich+pydantic", "train", corpus="packages")
    assert len(joined) == len(rich) + len(load_corpus("pydantic", "train", corpus="packages"))
    with pytest.raises(BequestError, match="choose one of: stdlib, rich, pydantic") as err:
        load_corpus("poetry", corpus="packages")
    assert "\n" not in str(err.value)


def test_recipes_record_the_versions_of_the_text_they_read():
    from bequest.lifelong import LifelongRecipe
    from bequest.pretrain import PretrainRecipe

    r = PretrainRecipe(out="x", corpus="packages", domain="networkx")
    saved = r.model_dump()
    assert saved["corpus_versions"] == {"python": platform.python_version(), "networkx": metadata.version("networkx")}
    assert PretrainRecipe(**saved) == r  # a saved recipe reads back; the record sets nothing
    assert "corpus_versions" not in PretrainRecipe(out="x").model_dump()
    stream = LifelongRecipe(out="x", corpus="packages", domains="torch,sympy+numpy").model_dump(exclude={"overwrite"})
    assert list(stream["corpus_versions"]) == ["python", "torch", "sympy", "mpmath", "numpy"]
    assert LifelongRecipe(out="x", corpus="packages").stream() == list(packages.DOMAINS)


def test_every_real_domain_is_installed_and_its_sources_are_listed():
    seen = packages.versions()  # refuses a missing distribution
    assert list(seen) == ["python", *(d for dists in packages.DOMAINS.values() for d in dists)]
    for dist in seen.keys() - {"python"}:
        sources = packages._sources(dist)
        assert len(sources) > 50, dist
        assert not any(part in packages.SKIP_DIRS for _, module in sources for part in module.split("."))


def test_a_missing_package_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(packages, "DOMAINS", {"x": ("no-such-package-bequest",)})
    with pytest.raises(BequestError, match="needs no-such-package-bequest, which is not installed; pip install"):
        packages.versions(["x"])


# Minimum characters per domain, from the versions installed when this was written (transformers 5.23, torch
# 2.13, sympy 1.14 + mpmath 1.3, pandas 3.1, networkx 3.6, numpy 2.4, matplotlib 3.11, huggingface_hub 2.4),
# with a margin for releases that trim their docs.
SIZES = {"stdlib": 1.2e6, "transformers": 5e6, "torch": 4.5e6, "sympy": 4.2e6, "pandas": 2.5e6, "networkx": 1.5e6,
         "numpy": 1.2e6, "matplotlib": 1.1e6, "huggingface_hub": 0.7e6}


@pytest.mark.skipif(not os.environ.get("BEQUEST_FULL_CORPUS"),
                    reason="builds the whole packages corpus (about a minute on two free cores); set BEQUEST_FULL_CORPUS=1")
def test_the_full_packages_corpus_has_every_domain_at_size():
    packages._domain_docs.cache_clear()
    chars = {d: 0 for d in packages.DOMAINS}
    for split in ("train", "validation"):
        for doc in corpus_docs(None, split, "packages"):
            chars[doc.domain] += len(doc.text)
    assert set(SIZES) == set(packages.DOMAINS)
    assert all(chars[d] >= SIZES[d] for d in SIZES), chars
