"""The package's shape: imports flow one way between stages, no import circle, functions a screen or so.

Imports are read from the source (every ``import`` and ``from ... import``, at module level or inside a
function), so a lazy import that goes against the flow counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "maxmatch_cli"

# Stages from the bottom up: a module may import its own stage or any stage below it, never one above.
# errors/fileio/progress/devices/locks and the recipe schema are used by everything; models sit under features because
# feature extraction runs the same CNN trunks the end-to-end encoder trains.
LAYERS = [
    {"errors", "fileio", "progress", "devices", "config", "locks", "__init__"},
    {"models"},
    {"features"},
    {"data"},
    {"method"},
    {"evaluation"},
    {"training"},
    {"retrieval"},
    {"reporting"},
    {"cli", "__main__"},
]
RANK = {stage: i for i, layer in enumerate(LAYERS) for stage in layer}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules that ``path`` imports (``from pkg import mod`` resolves to the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "maxmatch_cli":
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_stage():
    unknown = sorted({_stage(m) for m in _modules()} - set(RANK))
    assert not unknown, f"modules outside the staged layout: {unknown} (add the stage to LAYERS in this test)"


def test_imports_flow_down_the_stages():
    upward = [f"{mod} -> {dep}" for mod, deps in _graph().items() for dep in sorted(deps)
              if RANK[_stage(dep)] > RANK[_stage(mod)]]
    assert not upward, "imports against the flow:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle():
    # The check above must be able to fail: a three-module loop and a self-contained pair.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": set()}) == [["a", "b", "c"]]


def test_plots_take_plain_arrays_and_records():
    # Figures are drawn from numbers, not from other stages' classes.
    graph = _graph()
    plots = [m for m in graph if m.startswith("maxmatch_cli.reporting.plots")]
    assert plots
    for mod in plots:
        foreign = sorted(d for d in graph[mod] if RANK[_stage(d)] != 0)
        assert not foreign, f"{mod} imports {foreign}"


MAX_LINES = 100


def _long_functions(stage: str) -> list[str]:
    long = []
    for path in sorted((PKG / stage).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    return long


@pytest.mark.parametrize("stage", ["training", "method"])
def test_training_and_the_method_have_no_function_over_a_screen_or_two(stage):
    assert not _long_functions(stage)
