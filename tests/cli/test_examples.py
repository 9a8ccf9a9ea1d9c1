"""Every `maxmatch ...` command the README and `--help` show parses: its command exists and so does every option
it gives, with a value of the right type (resolved with click, not run). Those meant to run as written after
`make demo` name the demo's own paths (demo/run, demo/features.h5), never runs/demo/...."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click import Command, Context, exceptions  # typer bundles its own click: its classes, not click's

from maxmatch_cli.cli.app import app

README = Path(__file__).resolve().parents[2] / "README.md"
ROOT = typer.main.get_command(app)


def _commands(group: Command, path: tuple[str, ...] = ()):
    yield path, group
    if hasattr(group, "commands"):
        for name, sub in group.commands.items():
            yield from _commands(sub, (*path, name))


def _one_line(text: str) -> str:
    return re.sub(r"\\\s*\n\s*", " ", text)


def readme_examples() -> list[tuple[str, bool]]:
    """``(command, whole)``: whole for a code block's line (all it needs is given), not for an inline mention."""
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for row in _one_line(block).splitlines():
            row = row.split(" #")[0].strip()
            if re.match(r"(\.venv/bin/)?maxmatch ", row):
                found.append((row, True))
    for span in re.findall(r"`((?:\.venv/bin/)?maxmatch [^`]+)`", _one_line(text)):
        span = " ".join(span.split())
        if not re.search(r"[\[\]…|]|\.\.\.|\bNAME\b|\bCKPT\b|\bRUN\b|\bSTEM\b|\bIDX\b|k=v|\bI/N\b", span):
            found.append((span, False))  # placeholders (CKPT, [--opt], a|b) are a synopsis, not a command
    return found


def help_examples() -> list[tuple[str, bool]]:
    found = []
    for _, command in _commands(ROOT):
        for example in re.findall(r"\[bold\](maxmatch .*?)\[/\]", _one_line(command.help or ""), flags=re.S):
            found.append((" ".join(example.split()), True))
    return found


def _parse(example: str, whole: bool) -> None:
    words = shlex.split(example.split(" > ")[0])
    words = words[1:]  # the program name
    command, seen = ROOT, ["maxmatch"]
    while hasattr(command, "commands") and words and words[0] in command.commands:
        seen.append(words[0])
        command = command.commands[words.pop(0)]
    assert not hasattr(command, "commands") or not words or words[0].startswith("-"), \
        f"{example!r}: no command {words[0]!r} under {' '.join(seen)}"
    params = command.get_params(Context(command))
    eager = {opt for param in params if param.is_eager or param.callback is not None for opt in param.opts}
    if eager & set(words):  # --install-completion would install (callbacks run while parsing): names only
        known = {opt for param in params for opt in param.opts}
        unknown = [w for w in words if w.startswith("-") and w not in known]
        assert not unknown, f"{example!r}: no option {unknown}"
        return
    try:
        command.make_context(" ".join(seen), list(words), resilient_parsing=False)  # raises on a bad option
    except exceptions.MissingParameter:
        if whole:  # an inline mention (`maxmatch plot`) may leave out what the command needs
            raise


EXAMPLES = sorted(set(readme_examples())) + sorted(set(help_examples()))


def test_examples_are_found():
    assert len(readme_examples()) >= 10 and len(help_examples()) >= 20
    assert any(e.startswith(".venv/bin/maxmatch index demo/run") for e, _ in readme_examples())


@pytest.mark.parametrize("example, whole", EXAMPLES, ids=[e for e, _ in EXAMPLES])
def test_example_parses(example, whole):
    try:
        _parse(example, whole)
    except exceptions.ClickException as exc:
        pytest.fail(f"{example!r}: {exc.format_message()}")


def test_examples_use_the_demo_paths():
    wrong = [e for e, _ in EXAMPLES if "runs/demo/" in e]
    assert not wrong, f"the demo writes demo/run/..., not runs/demo/...: {wrong}"
    # after `make demo`, training into its run folder again is refused: no example does that
    assert not [e for e, _ in EXAMPLES if " train " in f" {e} " and "--out demo/run" in e and "--overwrite" not in e]
