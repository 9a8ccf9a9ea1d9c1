"""`--help` of every command reads well in an 80-column log, and shell completion is on."""

from __future__ import annotations

import re

import click
import pytest
import typer.main
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

WIDTH = 80


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The command paths of the app: (), ("train",), ("features", "info"), ..."""
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _commands(sub, (*path, name))
    return paths


COMMANDS = _commands(typer.main.get_command(app))


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered():
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "train", "evaluate", "compare", "analyze-collapse", "plot", "features info", "index"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "maxmatch")
def test_help_fits_80_columns(path):
    text = _help(path)
    lines = text.splitlines()
    assert "Usage: maxmatch" in text
    too_long = [line for line in lines if len(line) > WIDTH]
    assert not too_long, "\n".join(too_long)
    cut = [line for line in lines if "…" in line]  # rich cuts a word wider than its column with an ellipsis
    assert not cut, "\n".join(cut)
    # Metavars as click writes them (TEXT, INTEGER, PATH, none for a flag), arguments in capitals.
    assert not re.search(r"<(?:str|int|float|bool|path|list\[\w+\])>", text), text
    usage = next(line for line in lines if "Usage:" in line)
    assert "{" not in usage and not re.search(r"\b[a-z_]+\.\.\.", usage), usage


@pytest.mark.parametrize("path", [p for p in COMMANDS if p and p != ("features",)], ids=" ".join)
def test_every_command_shows_an_example(path):
    text = _help(path)
    assert re.search(r"^\s*Examples?:", text, re.M), text
    assert re.search(r"maxmatch [a-z]", text.split("Example", 1)[1]), text


def test_help_prose_is_reflowed_and_examples_kept():
    text = _help(("extract-features",))
    # The docstring's line break after "does" is not kept: the sentence runs on to the terminal's width.
    assert re.search(r"re-running a finished one does nothing", " ".join(text.split()))
    assert not any(line.rstrip().endswith(" does") for line in text.splitlines())
    assert "  maxmatch extract-features --synthetic demo --out demo/features.h5" in text
    for flag in ("--skip-unreadable", "--allow-missing", "--overwrite"):
        assert flag in text and f"--no-{flag[2:]}" not in text  # flags without a negative twin


@pytest.mark.parametrize("words, cword, expected", [
    ("maxmatch comp", 1, "compare"), ("maxmatch analyze-collapse --ts", 2, "--tsne"),
    ("maxmatch features me", 2, "merge"),
])
def test_shell_completion_completes_commands_and_options(words, cword, expected):
    assert "--install-completion" in _help(())
    # What the installed bash script asks the program (maxmatch --show-completion bash prints that script).
    env = {"_MAXMATCH_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = CliRunner().invoke(app, [], prog_name="maxmatch", env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.split() == [expected]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "maxmatch")
def test_examples_are_not_wrapped(path):
    """Every line of an Examples block starts a `maxmatch` command or continues one that ends in a backslash:
    an example the terminal wrapped could not be copied into a shell."""
    lines = [line.rstrip() for line in _help(path).splitlines()]
    if not any(line.strip() == "Examples:" for line in lines):
        return
    start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:") + 1
    block = []
    for line in lines[start:]:
        if not line.strip() or line.lstrip().startswith(("╭", "│")):
            break
        block.append(line.strip())
    assert block
    for before, line in zip([""] + block, block):
        assert line.startswith(("maxmatch ", "# ")) or before.endswith("\\"), f"wrapped example line: {line!r}"
