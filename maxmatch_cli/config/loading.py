"""Recipe files: the shipped registry in ``recipes/``, loading by name or path with ``extends``, and TOML output.

A recipe file has one table per section (``[data]``, ``[model]``, ...) plus an optional ``[recipe]`` table
holding ``description`` and ``extends`` (the parent recipe whose values this one overrides: a shipped recipe's
bare name, or a ``.toml`` path relative to this recipe's folder).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from maxmatch_cli.config.schema import SECTIONS, Recipe, apply_dotted, recipe_from_dict
from maxmatch_cli.errors import MaxMatchError

RECIPE_SUFFIX = ".toml"


def recipes_dir() -> Path:
    """The folder of shipped recipes (``$MAXMATCH_RECIPES`` overrides it)."""
    env = os.environ.get("MAXMATCH_RECIPES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> dict[str, str]:
    """Shipped recipe names mapped to their one-line descriptions."""
    out = {}
    folder = recipes_dir()
    for path in sorted(folder.glob(f"*{RECIPE_SUFFIX}"), key=lambda p: p.stem):
        try:
            with path.open("rb") as fh:
                meta = tomllib.load(fh).get("recipe", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            meta = {"description": "(unreadable TOML)"}
        out[path.stem] = str(meta.get("description", "") if isinstance(meta, dict) else "(no [recipe] table)")
    return out


def _resolve_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == RECIPE_SUFFIX or os.sep in name_or_path:
        if not candidate.is_file():
            raise MaxMatchError(f"recipe file {candidate} does not exist",
                                hint="give a shipped recipe name (see `maxmatch recipes`) or a path to a .toml file")
        return candidate
    path = recipes_dir() / f"{name_or_path}{RECIPE_SUFFIX}"
    if not path.is_file():
        names = list(list_recipes())
        near = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"shipped recipes: {', '.join(names) or '(none)'}"
        raise MaxMatchError(f"unknown recipe '{name_or_path}'", hint=hint)
    return path


def _resolve_parent(parent: Any, child: Path) -> Path:
    """The file ``extends = parent`` of recipe ``child`` names: a bare name (no slash, no extension) is a shipped
    recipe; anything else must be a ``.toml`` path, taken relative to the folder of ``child`` (not the current
    folder), so a recipe and the one it extends can move together."""
    where = f"recipe {child} extends"
    if not isinstance(parent, str) or not parent.strip():
        raise MaxMatchError(f"{where} {parent!r}, which is not a recipe name or path",
                            hint='write extends = "NAME" (a shipped recipe) or extends = "base.toml" (beside it)')
    if "/" not in parent and os.sep not in parent and not Path(parent).suffix:
        path = recipes_dir() / f"{parent}{RECIPE_SUFFIX}"
        if not path.is_file():
            near = difflib.get_close_matches(parent, list(list_recipes()), n=1)
            raise MaxMatchError(f"{where} '{parent}', which is not a shipped recipe (tried {path})",
                                hint=(f"did you mean '{near[0]}'? " if near else "") + "a bare name is a shipped "
                                     "recipe (`maxmatch recipes` lists them); a file beside it is extends = "
                                     f'"{parent}{RECIPE_SUFFIX}"')
        return path
    if not parent.endswith(RECIPE_SUFFIX):
        raise MaxMatchError(f"{where} '{parent}', which is not a {RECIPE_SUFFIX} file",
                            hint=f"extends names a shipped recipe or a {RECIPE_SUFFIX} recipe file")
    path = Path(parent).expanduser()
    path = path if path.is_absolute() else child.parent / path
    if not path.is_file():
        raise MaxMatchError(f"{where} '{parent}', but {path} does not exist",
                            hint=f"a relative path is taken from the folder of {child.name} ({child.parent})")
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    """A recipe file parsed, with one message for every way it can be unreadable."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise MaxMatchError(f"recipe {path} is not valid TOML: {exc}", hint="fix the syntax at that line") from None
    except UnicodeDecodeError as exc:
        raise MaxMatchError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                            hint="save the recipe as UTF-8 (TOML files are UTF-8)") from None
    except OSError as exc:
        raise MaxMatchError(f"cannot read recipe {path}: {exc.strerror or exc}",
                            hint="check the path and its permissions") from None


def _load_raw(name_or_path: str, seen: tuple[str, ...] = (), path: Path | None = None) -> dict[str, Any]:
    path = path or _resolve_path(name_or_path)
    key = str(path.resolve())
    if key in seen:
        raise MaxMatchError(f"recipe {path} extends itself (cycle: {' -> '.join(seen + (key,))})")
    raw = _read_toml(path)
    meta = raw.get("recipe") or {}
    if not isinstance(meta, dict):
        raise MaxMatchError(f"recipe section [recipe] in {path} must be a table, got {meta!r}",
                            hint='write [recipe] on its own line, then description = "..." below it')
    parent = meta.get("extends")
    if parent not in (None, ""):
        parent_path = _resolve_parent(parent, path)
        base = _load_raw(str(parent_path), seen + (key,), parent_path)
        for section, values in raw.items():
            if section == "recipe":
                base.setdefault("recipe", {}).update({k: v for k, v in values.items() if k != "extends"})
            elif isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section] = {**base[section], **values}
            else:
                base[section] = values
        return base
    return raw


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a shipped recipe by name (``recipes/<name>.toml``) or a TOML path, then apply dotted overrides."""
    raw = _load_raw(name_or_path)
    raw.get("recipe", {}).pop("extends", None)
    name = Path(name_or_path).stem
    raw = apply_dotted(raw, overrides or {})
    return recipe_from_dict(raw, name=name, source=str(_resolve_path(name_or_path)))


def to_toml(recipe: Recipe) -> str:
    """Render a resolved recipe as TOML (round-trips through :func:`recipe_from_dict`)."""
    lines = ["[recipe]", f"description = {_toml_value(recipe.description)}", ""]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(recipe, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
