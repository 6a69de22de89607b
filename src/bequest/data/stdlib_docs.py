"""Collect standard-library docstrings and pydoc topics as JSON records.

Uses only the standard library and no bequest import, because corpus.py runs this file
as a script in a pristine interpreter (`python -I -S`): a host process may have
monkeypatched the stdlib (transformers adds methods to logging.Logger, torch replaces
some inspect functions) or touched lazy attributes, and the corpus must not depend on it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

# Curated, import-safe modules per domain. Left out on purpose: anything with import
# side effects (tkinter, turtle, idlelib, antigravity, this, readline, webbrowser),
# deprecated modules that warn on import (cgi, imghdr, telnetlib, ...) and platform-only
# modules (winreg, msvcrt). A module missing from a given build is skipped.
MODULES: dict[str, tuple[str, ...]] = {
    "text": (
        "cmd", "codecs", "difflib", "encodings", "encodings.idna", "encodings.punycode",
        "fnmatch", "gettext", "html", "html.parser", "locale", "pprint", "quopri", "re",
        "reprlib", "shlex", "string", "stringprep", "textwrap", "unicodedata", "xml.dom",
        "xml.dom.expatbuilder", "xml.dom.minicompat", "xml.dom.minidom", "xml.dom.pulldom",
        "xml.dom.xmlbuilder", "xml.etree.ElementInclude", "xml.etree.ElementPath",
        "xml.etree.ElementTree", "xml.parsers.expat", "xml.sax", "xml.sax.expatreader",
        "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    ),
    "data": (
        "array", "base64", "binascii", "bisect", "bz2", "calendar", "cmath", "collections",
        "collections.abc", "configparser", "copy", "csv", "dataclasses", "datetime",
        "decimal", "enum", "fractions", "functools", "graphlib", "gzip", "hashlib", "heapq",
        "hmac", "itertools", "json", "json.decoder", "json.encoder", "lzma", "math",
        "numbers", "operator", "pickle", "plistlib", "random", "secrets", "shelve",
        "sqlite3", "statistics", "struct", "tarfile", "tomllib", "uuid", "weakref",
        "zipfile", "zlib", "zoneinfo",
    ),
    "system": (
        "argparse", "atexit", "concurrent.futures", "errno", "faulthandler", "filecmp",
        "gc", "getopt", "getpass", "glob", "io", "logging", "logging.handlers", "mmap",
        "multiprocessing", "multiprocessing.pool", "multiprocessing.shared_memory", "os",
        "os.path", "pathlib", "platform", "queue", "resource", "sched", "select",
        "selectors", "shutil", "signal", "stat", "subprocess", "sys", "sysconfig",
        "tempfile", "threading", "time", "tracemalloc",
    ),
    "network": (
        "asyncio.base_events", "asyncio.events", "asyncio.streams", "asyncio.tasks",
        "email", "email.charset", "email.contentmanager", "email.errors",
        "email.generator", "email.header", "email.headerregistry", "email.iterators",
        "email.message", "email.mime.base", "email.mime.multipart", "email.mime.text",
        "email.parser", "email.policy", "email.utils", "ftplib", "http", "http.client",
        "http.cookiejar", "http.cookies", "http.server", "imaplib", "ipaddress",
        "mailbox", "mimetypes", "poplib", "smtplib", "socket", "socketserver", "ssl",
        "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
        "urllib.robotparser", "wsgiref.handlers", "wsgiref.headers",
        "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xmlrpc.client",
        "xmlrpc.server",
    ),
    "language": (
        "abc", "ast", "bdb", "builtins", "code", "codeop", "contextlib", "dis", "doctest",
        "importlib", "importlib.abc", "importlib.machinery", "importlib.util", "inspect",
        "keyword", "linecache", "pdb", "pkgutil", "pydoc_data.topics", "symtable",
        "timeit", "token", "tokenize", "traceback", "types", "typing", "unittest",
        "unittest.mock", "warnings",
    ),
}
MIN_CHARS = 40


def _arity(obj: object) -> int | None:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    return sum(1 for p in params if p not in ("self", "cls"))


def _is_own(obj: object, modname: str) -> bool:
    # Keep what the module defines or takes from its private C twin (_heapq, _io,
    # posix); drop what it merely imports from another public module.
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str):
        return False
    return home == modname or home.rsplit(".", 1)[-1].startswith("_") or home in ("posix", "nt")


def _members(modname: str, module: object):
    """Yield (name, kind, object-for-signature, docstring) in sorted order."""
    yield modname, "module", None, module.__doc__
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _is_own(obj, modname):
            continue
        if inspect.isroutine(obj):
            yield f"{modname}.{name}", "function", obj, obj.__doc__
            continue
        yield f"{modname}.{name}", "class", None, obj.__doc__
        for attr in sorted(vars(obj)):
            member = vars(obj)[attr]
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            if inspect.isroutine(member):
                yield f"{modname}.{name}.{attr}", "method", member, member.__doc__
            elif inspect.isdatadescriptor(member):
                yield f"{modname}.{name}.{attr}", "attribute", None, getattr(member, "__doc__", None)


def _topic_chunks(text: str, target: int = 400):
    """Cut a pydoc topic at blank lines into chunks of about `target` characters."""
    chunk: list[str] = []
    for para in text.split("\n\n"):
        chunk.append(para)
        if sum(map(len, chunk)) >= target:
            yield "\n\n".join(chunk)
            chunk = []
    if chunk:
        yield "\n\n".join(chunk)


def _import(modname: str):
    try:
        return importlib.import_module(modname)
    except Exception:  # not built or not usable here (e.g. _ssl, _sqlite3, resource): skip it
        return None


def collect() -> list[dict]:
    """Every document of every domain in a fixed order; identical texts kept once."""
    seen: set[str] = set()
    docs: list[dict] = []

    def add(name: str, domain: str, module: str, kind: str, raw: object, arity=None) -> None:
        if not isinstance(raw, str):
            return
        text = inspect.cleandoc(raw).strip()
        if len(text) < MIN_CHARS or text in seen:
            return
        seen.add(text)
        docs.append(dict(name=name, domain=domain, module=module, kind=kind, text=text, arity=arity))

    for domain, modnames in MODULES.items():
        for modname in sorted(modnames):
            module = _import(modname)
            if module is None:
                continue
            if modname == "pydoc_data.topics":
                for key in sorted(module.topics):
                    for i, chunk in enumerate(_topic_chunks(module.topics[key])):
                        add(f"{modname}.{key}#{i}", domain, modname, "topic", chunk)
                continue
            for name, kind, obj, doc in _members(modname, module):
                arity = _arity(obj) if kind in ("function", "method") else None
                add(name, domain, modname, kind, doc, arity)
    return docs


if __name__ == "__main__":
    with warnings.catch_warnings():  # typing.io and friends warn when touched
        warnings.simplefilter("ignore")
        docs = collect()
    # ASCII-only JSON, so the parent reads it whatever the child's locale encoding is.
    sys.stdout.write(json.dumps(docs, ensure_ascii=True))
