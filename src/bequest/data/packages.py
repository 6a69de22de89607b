"""The packages corpus (`--corpus packages`): the docstrings of installed packages, one domain per subject.

Several million tokens that every install of bequest already has on disk, in domains as far apart as
deep-learning APIs, symbolic maths, dataframes and plotting. Nothing is imported: every source file a
distribution's RECORD lists is parsed with `ast` (docstrings.py), and each module, class and function
docstring of at least MIN_CHARS characters is one document, in file order (folders named test, tests or
testing are left out: their docstrings describe test cases). The standard library is one domain, the
default corpus's documents (corpus.py); every other domain is one package, or a package and the library
it rests on. Identical texts are kept once per domain.

Each distribution's documents are cached as JSON lines in $BEQUEST_CACHE/corpus under its name and
version, Python's version and RECIPE, so the same versions give byte-identical files and a new version
is parsed afresh. The first build parses about 170 MB of source: about a minute on two cores, with a
progress bar. `versions` is what a run on this corpus saw; recipes record it as `corpus_versions`.

Validation holds out whole modules (VALIDATION_FRACTION of them, by a stable hash of the name): the
docstrings of one module restate each other's parameters, so a held-out sibling would be half seen.
The stdlib domain keeps the default corpus's split.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from bequest.data import docstrings
from bequest.data.cache import cache_root
from bequest.data.corpus import VALIDATION_FRACTION, Doc, build_docs, check_split, split_of, stable_fraction
from bequest.data.docstrings import file_docs
from bequest.errors import BequestError

DOMAINS: dict[str, tuple[str, ...]] = {
    "stdlib": (),  # the default corpus, all its areas as one domain
    "transformers": ("transformers",),
    "torch": ("torch",),
    "sympy": ("sympy", "mpmath"),  # mpmath is sympy's arbitrary-precision arithmetic
    "pandas": ("pandas",),
    "networkx": ("networkx",),
    "numpy": ("numpy",),
    "matplotlib": ("matplotlib",),
    "huggingface_hub": ("huggingface_hub",),
}
RECIPE = 1  # bump when extraction (docstrings.py) changes, so cached distributions are parsed again
SKIP_DIRS = frozenset({"test", "tests", "testing"})


def package_docs(domain: str | None = None, split: str = "train") -> list[Doc]:
    """The documents of one domain (None: all) and split, in corpus order; built and cached on first use."""
    check_split(split)
    names = list(DOMAINS) if domain is None else [check_domain(domain)]
    _ensure([dist for name in names for dist in DOMAINS[name]])
    return [d for name in names for d in _domain_docs(name)[split]]


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise BequestError(f"unknown domain {domain!r} of the packages corpus; choose one of: {', '.join(DOMAINS)}")
    return domain


def versions(domains=None) -> dict[str, str]:
    """{'python': ..., distribution: version} of the text that `domains` (None: all) are made of."""
    names = list(DOMAINS) if domains is None else [check_domain(d) for d in domains]
    return {"python": platform.python_version(), **{d: _version(d, n) for n in names for d in DOMAINS[n]}}


def _version(dist: str, domain: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise BequestError(f"the packages corpus's {domain!r} domain needs {dist}, which is not installed; "
                           f"pip install {dist}") from None


@lru_cache(maxsize=None)
def _domain_docs(domain: str) -> dict[str, tuple[Doc, ...]]:
    """A domain's documents by split (train, validation), read from the cache once per process."""
    held: dict[str, bool] = {}  # module -> held out, hashed once per module

    def split(doc: Doc) -> str:
        if domain == "stdlib":
            return split_of(doc.name)
        if doc.module not in held:
            held[doc.module] = stable_fraction(f"{domain}:{doc.module}") < VALIDATION_FRACTION
        return "validation" if held[doc.module] else "train"

    docs = _read(domain)
    splits = [split(d) for d in docs]
    return {s: tuple(d for d, t in zip(docs, splits) if t == s) for s in ("train", "validation")}


def _read(domain: str) -> list[Doc]:
    if domain == "stdlib":
        return [replace(d, domain="stdlib") for d in build_docs()]
    seen: set[str] = set()
    docs = []
    for dist in DOMAINS[domain]:
        # JSON escapes "\n" but not every character str.splitlines() breaks at (U+2028, U+0085).
        for line in filter(None, _cache_file(dist, domain).read_text(encoding="utf-8").split("\n")):
            record = json.loads(line)
            if record["text"] not in seen:
                seen.add(record["text"])
                docs.append(Doc(domain=domain, **record))
    return docs


# ---------------------------------------------------------------- building


def _cache_file(dist: str, domain: str | None = None) -> Path:
    py = "".join(platform.python_version_tuple()[:2])
    return cache_root() / "corpus" / f"{dist}-{_version(dist, domain or dist)}-py{py}-r{RECIPE}.jsonl"


def _ensure(dists: list[str]) -> None:
    """Parse every distribution of `dists` not cached yet, all files in one pool, and cache each."""
    missing = [d for d in dict.fromkeys(dists) if not _cache_file(d).exists()]
    if not missing:
        return
    files = [(dist, path, module) for dist in missing for path, module in _sources(dist)]
    root = _cache_file(missing[0]).parent
    root.mkdir(parents=True, exist_ok=True)
    parsed: list[list[dict]] = [[] for _ in files]
    with _progress(len(files), missing, root) as advance:
        for i, records in _parse([f[1:] for f in files]):
            parsed[i] = records
            advance()
    for dist in missing:
        seen, lines = set(), []
        for rec in (r for (d, _, _), records in zip(files, parsed) if d == dist for r in records):
            if rec["text"] not in seen:
                seen.add(rec["text"])
                lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        # A private file renamed into place: a racing process sees none or all of it.
        fd, tmp = tempfile.mkstemp(prefix=".", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, _cache_file(dist))


def _sources(dist: str) -> list[tuple[str, str]]:
    """(file, module name) of every Python source of `dist` outside test folders, sorted by path."""
    d = metadata.distribution(dist)
    if d.files is None:
        raise BequestError(f"{dist} lists no files (no RECORD); reinstall it with pip to use the packages corpus")
    out = []
    for f in d.files:
        parts = Path(str(f)).with_suffix("").parts
        if f.suffix == ".py" and ".." not in parts and not SKIP_DIRS & set(parts):
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.append((str(f.locate()), module, str(f)))
    return [(path, module) for path, module, _ in sorted(out, key=lambda t: t[2])]


def _parse(files: list[tuple[str, str]]):
    """(index, docstring records) of every (path, module) in `files`, in any order: spread over worker
    interpreters (docstrings.py run as a script) where there are cores to spare, else read here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, len(files) // 100)  # under ~100 files a worker costs more than it saves
    if workers < 2 or not sys.executable:
        yield from ((i, file_docs(path, module)) for i, (path, module) in enumerate(files))
        return
    done: queue.Queue = queue.Queue()
    procs = []
    try:
        for w in range(workers):
            err = tempfile.TemporaryFile()
            p = subprocess.Popen([sys.executable, "-I", "-S", docstrings.__file__], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err)
            procs.append((p, err))
            threading.Thread(target=_read_lines, args=(p.stdout, done), daemon=True).start()
            p.stdin.write(json.dumps([(i, *files[i]) for i in range(w, len(files), workers)]).encode())
            p.stdin.close()
        for _ in range(len(files) + workers):  # every file, and each worker's end
            item = done.get()
            if item is not None:
                yield item
        for p, err in procs:
            if p.wait():
                err.seek(0)
                why = (err.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
                raise BequestError(f"reading docstrings failed in a worker ({why}); please report this")
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
            err.close()


def _read_lines(stream, done: queue.Queue) -> None:
    for line in stream:
        done.put(json.loads(line))
    done.put(None)


@contextlib.contextmanager
def _progress(total: int, dists: list[str], root: Path):
    """One line saying what is built, then a bar on stderr (on a terminal) advanced once per file."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    console.print(f"building the packages corpus from {', '.join(dists)} (once; cached in {root})", soft_wrap=True)
    columns = (TextColumn("parsing"), BarColumn(), MofNCompleteColumn(), TextColumn("files"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("parse", total=total)
        yield lambda: bar.advance(task)
