"""Every docstring of a Python source file, read with `ast` (nothing is imported), as JSON-ready records.

Uses only the standard library and no bequest import, because packages.py runs this file as a script in
worker interpreters (`python -I -S docstrings.py`, jobs on stdin, one JSON line per file on stdout): a
worker started that way needs neither bequest on its path nor the caller's main module, which the
multiprocessing spawn start method would import again (and run, in a script without a main guard).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

MIN_CHARS = 40
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def file_docs(path: str, module: str) -> list[dict]:
    """The module, class and function docstrings of one file in source order: name, module, kind (module /
    class / function / method), text, arity (parameters besides self/cls, for functions and methods)."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, OSError):  # a template or a file of another Python: no documents
        return []
    out: list[dict] = []

    def visit(node, qualname: str, kind: str, arity: int | None, in_class: bool) -> None:
        text = (ast.get_docstring(node, clean=True) or "").strip() if kind else ""
        if len(text) >= MIN_CHARS and _encodable(text):
            out.append(dict(name=qualname, module=module, kind=kind, text=text, arity=arity))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}.{child.name}", "class", None, True)
            elif isinstance(child, FUNCTIONS):
                kind = "method" if in_class else "function"
                visit(child, f"{qualname}.{child.name}", kind, _arity(child.args), False)
            elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child, qualname, "", None, in_class)  # an if/try/with block: its definitions are the owner's

    visit(tree, module, "module", None, False)
    return out


def _arity(args: ast.arguments) -> int:
    """Parameters besides self/cls, as the default corpus counts them."""
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
    return sum(1 for a in every if a.arg not in ("self", "cls"))


def _encodable(text: str) -> bool:
    """False for text with lone surrogates (a string literal's escapes), which UTF-8 and tokenizers refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    for index, path, module in json.load(sys.stdin):
        # ASCII-only JSON, so the parent reads it whatever the worker's locale encoding is.
        sys.stdout.write(json.dumps([index, file_docs(path, module)], ensure_ascii=True) + "\n")
        sys.stdout.flush()  # one line per file: the parent's progress bar moves with it
