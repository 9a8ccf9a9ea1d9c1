"""Rough edges a newcomer walkthrough found: hints that name the current commands, ids that exist, full dotted
keys, a `wrote` line for every file `train` writes, and every similarity of an evaluation shown by `compare`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import maxmatch_cli

PACKAGE = Path(maxmatch_cli.__file__).parent
README = PACKAGE.parent / "README.md"
# `extract-features --synthetic X` / `--images DIR` / `--from-precomp` / `--kind ...`: the hidden spelling of
# earlier versions (only `--help` is a visible option of the group); --synthetic, --from-precomp and
# --from-butd-tsv are options of no command now (--images is one of analyze-collapse and query).
OLD_FORM = re.compile(r"extract-features\s*\(?\s*--(?!help\b)|--(synthetic|from-precomp|from-butd-tsv)\b")
OPTION_NAME = re.compile(r"--[\w-]+")  # a literal that is only an option's name declares it or echoes it


def _strings(path: Path):
    """(line, text) of every string literal of a module, its docstring included, but not the module docstring
    of cli/features.py, which documents the old spelling on purpose."""
    tree = ast.parse(path.read_text())
    skip = tree.body[0].value if path.name == "features.py" and path.parent.name == "cli" else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node is not skip \
                and not OPTION_NAME.fullmatch(node.value):
            yield node.lineno, node.value


def old_forms(path: Path) -> list[str]:
    if path.suffix == ".md":
        lines = path.read_text().splitlines()
        return [f"{path.name}:{i}" for i, text in enumerate(lines, 1) if OLD_FORM.search(text)]
    # adjacent literals are one string to ast: a hint split over two lines is checked whole
    return [f"{path.name}:{line}" for line, text in _strings(path) if OLD_FORM.search(text)]


def test_old_form_detector_catches_the_old_text(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('hint = ("index the images with `maxmatch extract-features --images DIR "\n'
                      '        "--kind pixels`")\nother = "extract-features (--from-precomp, --images)"\n'
                      'fine = "maxmatch extract-features images DIR --kind pixels; see extract-features --help"\n'
                      'option = _hidden("--from-precomp")\nhint = "pass one or more --from-butd-tsv FILE"\n')
    assert old_forms(module) == ["m.py:1", "m.py:3", "m.py:6"]


def test_no_message_names_the_hidden_old_form():
    found = [f"{path.parent.name}/{hit}" for path in sorted(PACKAGE.rglob("*.py")) for hit in old_forms(path)]
    found += old_forms(README)
    assert not found, f"old `extract-features --SOURCE` spelling in: {found}"
