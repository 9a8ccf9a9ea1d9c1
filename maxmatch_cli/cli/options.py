"""What every command module shares: option types, readable ``--help``, error reporting and output helpers.

The command modules (:mod:`~maxmatch_cli.cli.features`, :mod:`~maxmatch_cli.cli.train`, ...) import from here and
never from each other or from :mod:`~maxmatch_cli.cli.app`, which only assembles them.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.progress import console

__all__ = ["CacheOption", "CheckpointArgument", "CocoCaptionsOption", "CsvOption", "DataOption", "DeviceOption",
           "EvalProtocolOption", "JsonOption", "ProtocolOption", "SetOption", "SimilaritiesOption", "SimilarityOption",
           "SplitOption", "command_group", "console", "err_console", "guarded", "line", "note", "readable_help",
           "require_inputs", "wrote"]

err_console = Console(stderr=True, highlight=False)


# ------------------------------------------------------------------------------------------ readable --help
# --help that reads well in an 80-column log. Typer shows `<str>`, `<bool>`, `<list[Path]>` and `{inputs}`, and in
# rich mode keeps every line break of a docstring; these classes keep the rendering and fix those three things.


class _Option(TyperOption):
    """An option whose help shows click's metavars (TEXT, INTEGER, FLOAT, PATH; none for a flag) rather than
    typer's ``<str>``, ``<bool>`` and ``<list[str]>``."""

    _NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH"}

    def display_type_rich(self, ctx):
        if self.metavar is not None:
            return self.metavar
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        shown = (self.display_type(ctx) or "").strip("<>")
        if shown.startswith("list[") and shown.endswith("]"):  # a repeatable option: one value each time
            shown = shown[5:-1]
        return self._NAMES.get(shown, shown if "|" in shown else shown.upper()) or None


class _Argument(TyperArgument):
    """An argument named in capitals in the usage line and the help (``CHECKPOINT``, ``INPUTS...``), without a type
    column repeating it."""

    def display_type_rich(self, ctx):
        return None

    def get_usage_pieces(self, ctx):
        return [self.metavar if self.required else f"[{self.metavar}]"]


def _reflow(text: str | None) -> str | None:
    """A docstring as rich help wants it: the lines of each prose paragraph joined, so that the terminal wraps
    them (rich keeps single line breaks, which at 80 columns leave half-empty lines); paragraphs with indented
    lines (examples) kept line by line."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if any(row[:1].isspace() for row in p.splitlines()) else " ".join(p.split("\n"))
                         for p in paragraphs)


def _readable(params: list) -> list:
    """Options with click's metavars, arguments in capitals (:class:`_Option`, :class:`_Argument`)."""
    for param in params:
        if type(param) is TyperOption:
            param.__class__ = _Option  # the same object; only methods that render help differ
        elif type(param) is TyperArgument:
            param.__class__ = _Argument
            param.metavar = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
    return params


class _ReadableCommand(TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx):  # the parameters and --help, which click adds here
        return _readable(super().get_params(ctx))


class _ReadableGroup(TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx):
        return _readable(super().get_params(ctx))


def command_group(**kwargs) -> typer.Typer:
    """A Typer for one group of commands whose help renders as :func:`readable_help` describes.

    A group without a name (``app.add_typer(group)``) adds its commands to the parent as they are; one with a
    name (``add_typer(group, name="features")``) is a command with subcommands.
    """
    return typer.Typer(cls=_ReadableGroup, **kwargs)


def readable_help(t: typer.Typer) -> None:
    """Make every command registered so far on ``t`` and the groups under it a :class:`_ReadableCommand` (the
    groups themselves are :class:`_ReadableGroup` from :func:`command_group`)."""
    for info in t.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = _ReadableCommand
    for group in t.registered_groups:
        readable_help(group.typer_instance)


# ------------------------------------------------------------------------------------------ shared option types

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe value, e.g. --set optim.lr=2e-4 (repeatable).", metavar="SECTION.KEY=VALUE")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")]
CsvOption = Annotated[Optional[Path], typer.Option("--csv", help="Also write the results as CSV here.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
CacheOption = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse the split's embeddings cached next to the checkpoint (encode once).")]
CheckpointArgument = Annotated[Path, typer.Argument(
    help="A checkpoint file (or run folder) from `maxmatch train`.")]
DataOption = Annotated[Optional[str], typer.Option("--data", help="Feature cache (default: the recipe's).")]
SplitOption = Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: eval.split).")]
ProtocolOption = Annotated[Optional[str], typer.Option(
    "--protocol", help="auto, full, coco1k or coco5k (coco1k/coco5k: the 5,000-image COCO test split only; "
                       "default: eval.protocol).")]
EvalProtocolOption = Annotated[Optional[str], typer.Option(
    "--protocol", help="auto, full, coco1k, coco5k, eccv or cxc (coco1k/coco5k: the 5,000-image COCO test split only; "
                       "eccv/cxc: coco5k plus the ECCV Caption or CxC metrics, extra 'eccv'; default: eval.protocol).")]
CocoCaptionsOption = Annotated[Optional[Path], typer.Option(
    "--coco-captions", metavar="JSON", help="COCO caption annotations (captions_val2014.json) giving --protocol "
                                            "eccv/cxc the caption annotation ids, matched by image id and text.")]
SimilarityOption = Annotated[Optional[str], typer.Option(
    "--similarity", help="Set similarity at test time (default: the recipe's eval.similarity, else its training one).")]
SimilaritiesOption = Annotated[Optional[str], typer.Option(
    "--similarity", metavar="NAME,...",
    help="Set similarity at test time (default: the recipe's eval.similarity, else its training one); a comma list "
         "(topk,maxmatch) scores one encoding with each, one row group per similarity.")]


# ------------------------------------------------------------------------------------------ errors and output


def guarded(func):
    """Turn user errors into one clear message and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (MaxMatchError, OSError) as exc:
            if os.environ.get("MAXMATCH_DEBUG") == "1":
                raise
            _report(exc)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM where a command made it an interrupt: 143
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(getattr(exc, "exit_status", 130)) from None

    return wrapper


def _report(exc: Exception) -> None:
    """One message naming the input and the fix.

    Printed as it is: no rich markup taken from it (paths may hold brackets), and never hard-wrapped at the
    console width (off a terminal rich would break lines at 80 columns, splitting paths and messages).
    """
    if isinstance(exc, MaxMatchError):
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        return
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    err_console.print(f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}", soft_wrap=True)
    err_console.print("[yellow]hint:[/] check the path, its permissions and the free disk space", soft_wrap=True)


def require_inputs(**given) -> None:
    """Refuse, before anything is loaded, an input path that does not exist: ``--data`` given as ``data=PATH`` (a
    list checks each; ``None`` is an option left out)."""
    for name, value in given.items():
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if path is not None and not Path(path).exists():
                flag = "--" + name.replace("_", "-")
                raise MaxMatchError(f"{flag} {path} does not exist", hint=f"check the path given to {flag}")


def line(text: str) -> None:
    """Print one line of plain text (paths included) that is never wrapped or read as markup."""
    console.print(escape(text), soft_wrap=True)


def wrote(*paths) -> None:
    """Announce each file a command wrote, one ``wrote PATH`` line each."""
    for path in paths:
        line(f"wrote {path}")


def note(text: str) -> None:
    """Print a ``note:`` line (something the user should know; not an error), never wrapped or read as markup."""
    console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)
