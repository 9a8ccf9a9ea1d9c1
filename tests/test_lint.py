"""Static checks over the package, tests, benchmarks and precompute scripts: pyflakes' rules through ruff.

They catch what the tests cannot see: an unused import left by a move, a name used only in an annotation and never
imported (``from __future__ import annotations`` hides it at run time), an unused variable. The rule set is the
small one that has no false positives here (F: pyflakes, E9: syntax errors); style is not checked.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["maxmatch_cli", "tests", "benchmarks", "precompute"]
RULES = "F,E9"


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401  (the wheel ships the binary; `python -m ruff` runs it)
    except ImportError:
        if shutil.which("ruff") is None:
            pytest.skip("ruff is not installed (pip install -e '.[test]', or run make)")
        return ["ruff"]
    return [sys.executable, "-m", "ruff"]


def test_pyflakes_rules_pass():
    cmd = [*_ruff(), "check", "--no-cache", "--select", RULES, "--target-version", "py310",
           "--output-format", "concise", *CHECKED]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff check --select {RULES} found:\n{result.stdout}{result.stderr}"


def test_the_check_fails_on_an_unused_import(tmp_path):
    """The same command flags a file with an unused import and an annotation-only name: it can fail."""
    bad = tmp_path / "bad.py"
    bad.write_text("from __future__ import annotations\nimport os\n\n\ndef f(x: torch.Tensor) -> None:\n"
                   "    return None\n")
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--select", RULES, "--output-format", "concise",
                             str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "F401" in result.stdout and "F821" in result.stdout
