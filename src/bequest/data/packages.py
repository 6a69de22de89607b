"""The packages corpus (`--corpus packages`): the docstrings of installed packages, one domain per subject.

Several million tokens that every install of bequest already has on disk, in domains as far apart as
deep-learning APIs, symbolic maths, dataframes and plotting. Nothing is imported: every source file a
distribution's RECORD lists is parsed with `ast`, and each module, class and function docstring of at
least MIN_CHARS characters is one document, in file order (folders named test/tests/testing are left
out: their docstrings describe test cases). The standard library is one domain, the default corpus's
documents (corpus.py); every other domain is one package, or a package and the library it rests on.
Identical texts are kept once per domain.

Each distribution's documents are cached as JSON lines in $BEQUEST_CACHE/corpus under its name and
version, Python's version and RECIPE, so the same versions give byte-identical files and a new version
is parsed afresh. The first build parses about 170 MB of source: about a minute on two cores, with a
progress bar. `versions` is what a run on this corpus saw; recipes record it as `corpus_versions`.

Validation holds out whole modules (VALIDATION_FRACTION of them, by a stable hash of the name): the
docstrings of one module restate each other's parameters, so a held-out sibling would be half seen.
The stdlib domain keeps the default corpus's split.
"""

from __future__ import annotations

import ast
import contextlib
import json
import multiprocessing
import os
import platform
import tempfile
from dataclasses import replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from bequest.data.cache import cache_root
from bequest.data.corpus import VALIDATION_FRACTION, Doc, build_docs, check_split, split_of, stable_fraction
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
RECIPE = 1  # bump when extraction changes, so cached distributions are parsed again
MIN_CHARS = 40
SKIP_DIRS = frozenset({"test", "tests", "testing"})
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


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
        for line in _cache_file(dist, domain).read_text(encoding="utf-8").splitlines():
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
    jobs = [(dist, path, module) for dist in missing for path, module in _sources(dist)]
    root = _cache_file(missing[0]).parent
    root.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[dict]] = {d: [] for d in missing}
    with _pool(len(jobs)) as run, _progress(len(jobs), missing, root) as advance:
        for (dist, _, _), records in zip(jobs, run(_file_docs, [j[1:] for j in jobs])):
            found[dist] += records
            advance()
    for dist, records in found.items():
        seen, lines = set(), []
        for rec in records:
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


@contextlib.contextmanager
def _pool(n_jobs: int):
    """An ordered map: over spawned processes where there are cores to spare, else in this process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, n_jobs // 100)  # under ~100 files a pool costs more than it saves
    if workers < 2 or multiprocessing.current_process().daemon:  # a daemon may not start processes
        yield map
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, jobs: pool.map(fn, jobs, chunksize=8)


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


# ---------------------------------------------------------------- one file (in a worker process)


def _file_docs(job: tuple[str, str]) -> list[dict]:
    """Every docstring of one source file, in source order, as records of `Doc`'s fields less domain."""
    path, module = job
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, OSError):  # a template or a file of another Python: no documents
        return []
    out: list[dict] = []

    def visit(node, qualname: str, kind: str, arity: int | None) -> None:
        text = ast.get_docstring(node, clean=True) if hasattr(node, "body") and kind else None
        if text and len(text.strip()) >= MIN_CHARS:
            out.append(dict(name=qualname, module=module, kind=kind, text=text.strip(), arity=arity))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}.{child.name}", "class", None)
            elif isinstance(child, FUNCTIONS):
                method = isinstance(node, ast.ClassDef)
                visit(child, f"{qualname}.{child.name}", "method" if method else "function", _arity(child.args))
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child, qualname, "", None)  # an if/try/with block: its definitions belong to `node`

    visit(tree, module, "module", None)
    return out


def _arity(args: ast.arguments) -> int:
    """Parameters besides self/cls, as the default corpus counts them."""
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
    return sum(1 for a in every if a.arg not in ("self", "cls"))
