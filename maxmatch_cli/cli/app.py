"""The ``maxmatch`` Typer app, assembled from the command groups; no command is defined here.

Groups (each a module of :mod:`maxmatch_cli.cli`, whose commands are added to the app as they are):
:mod:`~maxmatch_cli.cli.features` (extract-features, features info/merge), :mod:`~maxmatch_cli.cli.train`,
:mod:`~maxmatch_cli.cli.evaluate` (evaluate, ensemble), :mod:`~maxmatch_cli.cli.analyze` (analyze-collapse,
similarities), :mod:`~maxmatch_cli.cli.index` (index, query) and :mod:`~maxmatch_cli.cli.report` (compare, plot,
recipes). What they share lives in :mod:`~maxmatch_cli.cli.options`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from maxmatch_cli import __version__
from maxmatch_cli.cli import analyze, evaluate, features, index, report, train
from maxmatch_cli.cli.options import command_group, console, readable_help

__all__ = ["app", "main"]

app = command_group(
    name="maxmatch",
    help="Set-based image-text retrieval with Maximal Pair Assignment Similarity (MaxMatch, ACL 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"maxmatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Set-based image-text retrieval with Maximal Pair Assignment Similarity (MaxMatch, ACL 2025)."""


# In the order of the data flow; `maxmatch --help` shows one panel per group.
for _group in (features, train, evaluate, analyze, index, report):
    app.add_typer(_group.app)
readable_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
