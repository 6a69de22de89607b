"""The default corpus: standard-library docstrings and the pydoc topics, split by domain.

Every Python install ships this text, so it needs no download. One document is one
docstring (or one ~400-character chunk of a pydoc topic); see stdlib_docs.py for how
they are collected. Building takes well under a second, so nothing is cached on disk.
The larger packages corpus (`corpus="packages"`, packages.py) is read through the same
functions.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

from bequest.data import stdlib_docs
from bequest.errors import BequestError

DOMAINS: tuple[str, ...] = tuple(stdlib_docs.MODULES)
CORPORA: tuple[str, ...] = ("default", "packages")  # the embedded ones; --corpus also takes a path
SPLITS: tuple[str, ...] = ("train", "validation")
VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Doc:
    """One document plus what the classification tasks need to know about it."""

    name: str  # qualified name, e.g. "collections.OrderedDict.move_to_end"
    domain: str
    module: str
    kind: str  # module / class / function / method / attribute / topic
    text: str
    arity: int | None  # parameters besides self/cls, for functions and methods


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (`hash()` is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_of(name: str) -> str:
    return "validation" if stable_fraction(name) < VALIDATION_FRACTION else "train"


@lru_cache(maxsize=1)
def build_docs() -> tuple[Doc, ...]:
    """All documents, identical in every process on the same Python version."""
    # A pristine child interpreter (-I: no env vars or user site, -S: no site hooks)
    # sees the stdlib exactly as shipped, whatever this process imported or patched.
    cmd = [sys.executable, "-I", "-S", stdlib_docs.__file__]
    try:
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout
        records = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        # No usable interpreter to spawn (embedded/frozen Python): collect here instead,
        # which is only as reproducible as this process's stdlib is untouched.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = stdlib_docs.collect()
    return tuple(Doc(**r) for r in records)


def domains(corpus: str = "default") -> tuple[str, ...]:
    """The domain names of an embedded corpus."""
    if corpus == "packages":
        from bequest.data.packages import DOMAINS as PACKAGE_DOMAINS

        return tuple(PACKAGE_DOMAINS)
    return DOMAINS


def named_domains(spec: str, corpus: str = "default") -> list[str] | None:
    """The domains of an embedded corpus that `spec` names ('a+b' joins several), or None if it names none
    (then it is a path)."""
    parts = spec.split("+")
    return parts if all(p in domains(corpus) for p in parts) else None


def check_domain(domain: str | None, corpus: str = "default") -> None:
    if domain is not None and domain not in domains(corpus):
        where = "" if corpus == "default" else f" of the {corpus} corpus"
        raise BequestError(f"unknown domain {domain!r}{where}; choose one of: {', '.join(domains(corpus))}")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise BequestError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


def corpus_docs(domain: str | None = None, split: str = "train", corpus: str = "default") -> list[Doc]:
    """The documents of one domain (None: all) and split of an embedded corpus, in corpus order."""
    check_domain(domain, corpus)
    check_split(split)
    if corpus == "packages":
        from bequest.data.packages import package_docs

        return package_docs(domain, split)
    return [d for d in build_docs() if domain in (None, d.domain) and split_of(d.name) == split]


def load_corpus(domain: str | None = None, split: str = "train", corpus: str = "default"):
    """An embedded corpus (default: the stdlib one) as a `datasets.Dataset` with columns text, domain, name."""
    import datasets  # slow to import; only pay for it when a dataset is asked for

    docs = corpus_docs(domain, split, corpus)
    columns = {"text": [d.text for d in docs], "domain": [d.domain for d in docs], "name": [d.name for d in docs]}
    return datasets.Dataset.from_dict(columns)

