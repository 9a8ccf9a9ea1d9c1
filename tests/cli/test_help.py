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


def _is_group(path: tuple[str, ...]) -> bool:
    """Whether the command at ``path`` only gathers subcommands (the app itself, `features`)."""
    command = ROOT
    for name in path:
        command = command.commands[name]
    return hasattr(command, "commands")  # click's Group (typer may vendor its own click: no isinstance)


# Read from the app when the tests are collected, so that a command added later is checked as well.
ROOT = typer.main.get_command(app)
COMMANDS = _commands(ROOT)
LEAVES = [p for p in COMMANDS if not _is_group(p)]


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    return result.output


def _example_block(text: str) -> list[str] | None:
    """The stripped lines of a help text's Example(s) block (one on the heading's line included), or None."""
    lines = [line.rstrip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        heading = re.match(r"\s*Examples?:(.*)", line)
        if heading:
            block = [heading.group(1).strip()] if heading.group(1).strip() else []
            for line in lines[i + 1:]:
                if not line.strip() or line.lstrip().startswith(("╭", "│")):
                    break
                block.append(line.strip())
            return block
    return None


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


def test_commands_and_groups_are_told_apart():
    assert () not in LEAVES and ("features",) not in LEAVES
    assert {("train",), ("evaluate",), ("features", "info")} <= set(LEAVES)


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_every_command_shows_an_example(path):
    text = _help(path)
    block = _example_block(text)
    assert block, f"`maxmatch {' '.join(path)} --help` has no Example(s) block:\n{text}"
    assert any(re.match(r"maxmatch [a-z]", line) for line in block), text


def test_a_help_without_examples_is_caught():
    # The check above must be able to fail.
    assert _example_block("Usage: maxmatch x [OPTIONS]\n\n Does x.\n\n╭─ Options ─╮\n") is None
    assert _example_block(" Example: maxmatch x --y 1\n\n") == ["maxmatch x --y 1"]
    assert _example_block(" Examples:\n   maxmatch x \\\n     --y 1\n│ z\n") == ["maxmatch x \\", "--y 1"]


def test_help_prose_is_reflowed_and_examples_kept():
    text = _help(("extract-features",))
    # The docstring's line break after "does" is not kept: the sentence runs on to the terminal's width.
    assert re.search(r"re-running a finished one does nothing", " ".join(text.split()))
    assert not any(line.rstrip().endswith(" does") for line in text.splitlines())
    assert "  maxmatch extract-features synthetic demo --out demo/features.h5" in text
    # The spelling of earlier versions (--synthetic, --from-precomp, ...) still works but is not advertised.
    listed = text.split("─ Options", 1)[1].split("╰", 1)[0]  # the options panel only
    assert "--help" in listed and not any(f in listed for f in ("--synthetic", "--from-precomp", "--out", "--kind"))
    for source, flags in (("images", ("--skip-unreadable", "--overwrite")), ("tsv", ("--allow-missing",))):
        sub = _help(("extract-features", source))
        for flag in flags:
            assert flag in sub and f"--no-{flag[2:]}" not in sub  # flags without a negative twin


def test_each_source_shows_only_its_own_options():
    options = {source: set(re.findall(r"--[a-z][a-z-]+", _help(("extract-features", source))))
               for source in ("synthetic", "precomp", "tsv", "images")}
    assert options["synthetic"] == {"--out", "--seed", "--overwrite", "--help"}
    assert options["precomp"] == {"--out", "--dataset", "--split", "--overwrite", "--help"}
    assert options["tsv"] == {"--captions", "--out", "--allow-missing", "--overwrite", "--help"}
    assert {"--kind", "--backbone", "--num-boxes", "--skip-unreadable", "--device"} <= options["images"]
    assert not {"--seed", "--dataset", "--allow-missing"} & options["images"]


@pytest.mark.parametrize("words, cword, expected", [
    ("maxmatch comp", 1, "compare"), ("maxmatch analyze-collapse --ts", 2, "--tsne"),
    ("maxmatch features me", 2, "merge"), ("maxmatch extract-features sy", 2, "synthetic"),
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
    block = _example_block(_help(path))
    if block is None:
        assert path not in LEAVES, f"`maxmatch {' '.join(path)} --help` has no Example(s) block"
        pytest.skip("a command group: no example to check")
    assert block
    for before, line in zip([""] + block, block):
        assert line.startswith(("maxmatch ", "# ")) or before.endswith("\\"), f"wrapped example line: {line!r}"
