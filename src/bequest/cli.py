"""The `bequest` command: one verb per method, each generated from its recipe model.

`bequest VERB --recipe r.yaml` and `bequest VERB --flag value` fill the same pydantic recipe, so the
YAML keys and the flags are the same names and carry the same help text. User errors exit with 2.
"""

from __future__ import annotations

import copy
import errno
import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Callable

import typer
from pydantic import BaseModel

from bequest.errors import BequestError
from bequest.recipe import resolve

# Verbs as data: (group, name, module, recipe class, run function, positional arguments). A verb's
# module is imported only when that verb runs, so `bequest grow` never pays for Trainer, peft or datasets.
VERBS = [
    (None, "pretrain", "bequest.pretrain", "PretrainRecipe", "pretrain", ("out",)),
    (None, "grow", "bequest.grow.command", "GrowRecipe", "grow_command", ("src", "out")),
    (None, "inherit", "bequest.inherit", "InheritRecipe", "inherit", ("out",)),
    (None, "lifelong", "bequest.lifelong", "LifelongRecipe", "lifelong", ("out",)),
    (None, "learn", "bequest.continual", "LearnRecipe", "learn", ("out",)),
    (None, "finetune", "bequest.finetune", "FinetuneRecipe", "finetune", ("out",)),
    (None, "continue-pretrain", "bequest.recycle", "ContinueRecipe", "continue_pretrain", ("out",)),
    (None, "recycle", "bequest.recycle", "RecycleRecipe", "recycle", ("out",)),
    (None, "analyze", "bequest.analyze", "AnalyzeRecipe", "analyze", ("kind", "out")),
    (None, "port", "bequest.port.command", "PortRecipe", "port", ("out",)),
    (None, "export", "bequest.export", "ExportRecipe", "export", ("adapter", "out")),
    (None, "upgrade", "bequest.upgrade", "UpgradeRecipe", "upgrade", ("sources", "out")),
    (None, "lineage", "bequest.lineage.command", "LineageRecipe", "lineage", ("dirs",)),
    (None, "report", "bequest.report.command", "ReportRecipe", "report", ("dir",)),
    (None, "demo", "bequest.demo", "DemoRecipe", "demo", ("out",)),
    ("study", "port", "bequest.port.study", "StudyRecipe", "study", ()),
]
# The machine's, not bequest's: a full or read-only disk is the user's to fix, so one line, not a traceback.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
GROUPS = {"study": "Grid studies of a method: hosts x types x seeds."}


def _fail(e: Exception) -> typing.NoReturn:
    # On a terminal a progress bar may have left the cursor mid-line: start the error on a line of its own.
    typer.echo(f"\nerror: {e}" if sys.stderr.isatty() else f"error: {e}", err=True)
    raise typer.Exit(2)


def _cli_type(annotation):
    """The plain type typer should parse; pydantic validates the rest (Literal, ranges)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _cli_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0])
    if typing.get_origin(annotation) is list:  # a repeated option, or a positional taking several values
        return list[str]
    return annotation if annotation in (int, float, str, bool) else str


def _help(info, flag: str) -> str:
    """A setting's help: its description, its choices and its default (unless the description tells it)."""
    text = info.description or ""
    if typing.get_origin(info.annotation) is typing.Literal:
        text += " — one of: " + ", ".join(map(str, typing.get_args(info.annotation)))
    value = info.get_default(call_default_factory=True)
    if info.is_required() or "(default" in text or value in (None, [], {}):
        return text
    if isinstance(value, bool):
        value = flag if value else f"--no-{flag[2:]}"
    elif isinstance(value, list):
        value = ",".join(map(str, value))
    return text + f" (default: {value})"


class _Verb(typer.core.TyperCommand):
    """A verb's command. Its help marks the settings its recipe requires; the parser leaves them to the
    recipe, which reports a missing one in one line, because a --recipe file may hold them."""

    required: frozenset[str] = frozenset()

    def format_help(self, ctx, formatter):
        params = self.params
        self.params = [_marked(p) if p.name in self.required else p for p in params]
        try:
            super().format_help(ctx, formatter)
        finally:
            self.params = params


def _marked(param):
    param = copy.copy(param)
    param.required = True
    return param


def verb(group: typer.Typer, name: str, recipe_cls: type[BaseModel], run: Callable,
         arguments: tuple[str, ...] = ("out",)):
    """Register `bequest NAME` (or `bequest GROUP NAME`): positional `arguments`, an option per other
    recipe field, --recipe."""
    inherited = {f for base in recipe_cls.__mro__[1:] for f in getattr(base, "model_fields", {})}
    fields = sorted(recipe_cls.model_fields.items(), key=lambda kv: kv[0] in inherited)  # own settings first
    params = []
    for field, info in fields:
        kind = _cli_type(info.annotation)
        flag = "--" + field.rstrip("_").replace("_", "-")  # from_ (a Python keyword) is --from
        if field in arguments:
            default = typer.Argument(None, metavar=field.upper(), help=_help(info, flag), show_default=False)
        elif kind is bool:
            default = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=_help(info, flag), show_default=False)
        else:
            default = typer.Option(None, flag, help=_help(info, flag), show_default=False)
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind | None))
    old_names = getattr(recipe_cls, "old_names", dict)()
    for old, new in old_names.items():  # renamed flags keep their old spelling for a release, unlisted
        hidden = typer.Option(None, "--" + old.replace("_", "-"), hidden=True, help=f"old name of --{new.replace('_', '-')}")
        kind = _cli_type(recipe_cls.model_fields[new].annotation)
        params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=hidden, annotation=kind | None))
    params.append(
        inspect.Parameter(
            "recipe",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, help="YAML recipe; flags given on the command line override it"),
            annotation=Path | None,
        )
    )

    # Settings the recipe reads from text itself ('lora,ia3', '4x128,8x256', YAML): a list option given
    # once reaches it as the word given, as a recipe file's string does.
    from_text = {f for v in recipe_cls.__pydantic_decorators__.field_validators.values() if v.info.mode == "before"
                 for f in v.info.fields}

    def command(**kwargs):
        # A list argument given no words is not given (the recipe file may hold it).
        kwargs = {k: None if v in ((), []) else v for k, v in kwargs.items()}
        kwargs.update({k: kwargs[k][0] for k in from_text & kwargs.keys()
                       if isinstance(kwargs[k], list) and len(kwargs[k]) == 1})
        try:
            run(resolve(recipe_cls, kwargs.pop("recipe"), **kwargs))
        except BequestError as e:
            _fail(e)
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            _fail(f"writing {e.filename or 'the output'} failed ({e.strerror}); free space or choose another OUT")

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = run.__doc__
    required = frozenset(f for f, info in recipe_cls.model_fields.items() if info.is_required())
    group.command(name, cls=type("Verb", (_Verb,), {"required": required}))(command)


def info(model: str = typer.Argument(..., help="a model folder, or the id of a model in the local Hugging Face cache")):
    """Print a model's family, shape, parameter count, anatomy and lineage."""
    from bequest.info import describe

    try:
        typer.echo(describe(model))
    except BequestError as e:
        _fail(e)


def build(argv: list[str] | None = None) -> typer.Typer:
    """The command line app. Given the arguments, it registers only the verb they name (when they
    name one), importing nothing else; otherwise every verb, for --help and tests."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
    app.command("info")(info)
    groups = {g: typer.Typer(add_completion=False, no_args_is_help=True, help=h) for g, h in GROUPS.items()}
    for g, sub in groups.items():
        app.add_typer(sub, name=g)
    words = list(argv or [])
    named = [v for v in VERBS if words[: 2 if v[0] else 1] == [w for w in v[:2] if w]]  # ["grow"], ["study", "port"]
    for group, name, module, recipe, run, arguments in named or VERBS:
        mod = importlib.import_module(module)
        verb(groups[group] if group else app, name, getattr(mod, recipe), getattr(mod, run), arguments)
    return app


def __getattr__(name: str):
    if name == "app":  # `from bequest.cli import app`: the full app, built on first use
        globals()["app"] = build()
        return globals()["app"]
    raise AttributeError(name)


def main() -> None:
    try:
        build(sys.argv[1:])()
    except BequestError as e:  # raised outside a verb, e.g. while importing a recipe
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
