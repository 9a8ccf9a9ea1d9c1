"""The recipe behind a result: read from a run folder's recipe.toml, a checkpoint's header or a demo command line,
resolved against the shipped recipes and flattened to dotted keys (``loss.similarity`` ...)."""

from __future__ import annotations

import json
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from maxmatch_cli.errors import MaxMatchError


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """Nested recipe sections as dotted keys (name and description left out)."""
    return {f"{section}.{key}": value for section, values in recipe.items() if isinstance(values, dict)
            and section != "recipe" for key, value in values.items()}


def _resolved(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe dict with every default filled in; as it is when this version cannot read it."""
    from maxmatch_cli.config.recipes import recipe_from_dict

    try:
        return _flat(recipe_from_dict(raw).to_dict())
    except MaxMatchError:
        return _flat(raw)


def _checkpoint_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe stored in a checkpoint's header (name included), read without loading the tensors."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            return json.loads((fh.metadata() or {})["recipe"])
    except Exception:  # not a checkpoint, truncated, another format: the recipe is simply unknown
        return None


@lru_cache(maxsize=None)
def _shipped() -> dict[str, str]:
    from maxmatch_cli.config.recipes import list_recipes

    return list_recipes()


@lru_cache(maxsize=None)
def _shipped_recipe(name: str) -> dict[str, Any] | None:
    """A shipped recipe, resolved, as dotted keys (None when there is none of that name)."""
    from maxmatch_cli.config.recipes import load_recipe

    if name not in _shipped():
        return None
    try:
        return _flat(load_recipe(name).to_dict())
    except MaxMatchError:
        return None


def _run_recipe(folder: Path) -> tuple[str, dict[str, Any] | None]:
    """A run folder's recipe name and resolved recipe (recipe.toml, else the checkpoint's header)."""
    header = next((r for name in ("best.safetensors", "last.safetensors") if (folder / name).is_file()
                   for r in [_checkpoint_recipe(folder / name)] if r), None)
    recipe = None
    if (folder / "recipe.toml").is_file():
        try:
            with (folder / "recipe.toml").open("rb") as fh:
                recipe = _resolved(tomllib.load(fh))
        except tomllib.TOMLDecodeError:
            recipe = None
    if recipe is None and header:
        recipe = _resolved({k: v for k, v in header.items() if k not in ("name", "description")})
    name = header.get("name") if header else None
    if not name and (folder / "recipe.toml").is_file():  # recipe.toml holds the description, not the name
        try:
            with (folder / "recipe.toml").open("rb") as fh:
                description = (tomllib.load(fh).get("recipe") or {}).get("description")
        except tomllib.TOMLDecodeError:
            description = None
        name = next((n for n, d in _shipped().items() if description and d == description), None)
    return name or folder.name, recipe



def _demo_recipe(command: Any) -> dict[str, Any] | None:
    """The resolved recipe of a demo_results.json command line (``maxmatch train --recipe R --set k=v ...``)."""
    from maxmatch_cli.config.recipes import load_recipe, parse_overrides

    if not isinstance(command, str):
        return None
    words = command.split()
    if "--recipe" not in words or words.index("--recipe") + 1 >= len(words):
        return None
    sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
    try:
        return _flat(load_recipe(words[words.index("--recipe") + 1], parse_overrides(sets)).to_dict())
    except MaxMatchError:
        return None
