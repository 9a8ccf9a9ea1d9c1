"""The full recipe and its typed construction from nested dicts (parsed TOML) and ``--set`` overrides.

Every value is checked against its field's type before a section is built: lossless conversions (``"3"`` to
an int field, ``"true"`` to a bool) are made, anything else raises :class:`~maxmatch_cli.errors.MaxMatchError`
naming the dotted key. Unknown sections and keys suggest the nearest valid one; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from maxmatch_cli.config.sections import (DataConfig, EvalConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig,
                                          _check)
from maxmatch_cli.errors import MaxMatchError


@dataclass(frozen=True)
class Recipe:
    """A full, resolved recipe."""

    name: str = "custom"
    """Recipe name (file stem)."""
    description: str = ""
    """One-line purpose, shown by `maxmatch recipes`."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.loss.isd_weight > 0 and self.model.num_embeds < 2:
            _check(False, "loss.isd_weight", "must be 0 when model.num_embeds is 1 (intra-set divergence compares "
                   "the elements of one set)")
        if self.loss.warmup_epochs >= self.train.epochs and self.loss.hardest_negatives:
            _check(False, "loss.warmup_epochs", f"({self.loss.warmup_epochs}) must be < train.epochs "
                   f"({self.train.epochs}) or hardest negatives are never used")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/TOML-serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with dotted-key overrides applied, e.g. ``replace(**{"optim.lr": 2e-4})``."""
        return recipe_from_dict(apply_dotted(self.to_dict(), overrides), name=self.name)


RECIPE_META_KEYS = ("description", "extends")
"""The keys of a recipe file's ``[recipe]`` table."""

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    """'did you mean ...?' naming the nearest valid key, with ``prefix`` (e.g. ``optim.``) so it pastes whole."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if near:
        return f"did you mean '{prefix}{near[0]}'?"
    return f"valid keys: {', '.join(prefix + v for v in sorted(valid))}"


def _suggest_section(section: str, key: str) -> str:
    """For an override's unknown section: the nearest section with ``key`` after it when that section has it."""
    near = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.5)
    if near and key in _field_types(SECTIONS[near[0]]):
        return f"did you mean '{near[0]}.{key}'?"
    return _suggest(section, list(SECTIONS))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and where lossless, convert) a TOML or command-line value to the field's type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return _coerce(value, [a for a in typing.get_args(typ) if a is not type(None)][0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise MaxMatchError(f"recipe key {key} must be a finite number, got {value!r}",
                                hint=f"e.g. --set {key}={_example(typ)}")
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise MaxMatchError(f"recipe key {key} expects {getattr(typ, '__name__', typ)}, got {value!r}",
                        hint=f"e.g. --set {key}={_example(typ)}")


def _example(typ: Any) -> str:
    return {bool: "true", int: "4", float: "0.001", str: "text"}.get(typ, "...")


def recipe_from_dict(raw: dict[str, Any], name: str = "custom", source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from nested dicts (as parsed from TOML)."""
    raw = dict(raw)
    meta = raw.pop("recipe", {}) or {}
    if not isinstance(meta, dict):
        raise MaxMatchError(f"recipe section [recipe] in {source} must be a table, got {meta!r}",
                            hint='write [recipe] on its own line, then description = "..." below it')
    for key in meta:
        if key not in RECIPE_META_KEYS:
            section = f" (a section is a table: [{key}] on its own line)" if key in SECTIONS else ""
            raise MaxMatchError(f"unknown key recipe.{key} in {source}{section}",
                                hint=f"[recipe] holds only {' and '.join(RECIPE_META_KEYS)}; keys below a [table] "
                                     "header belong to that table")
    description = meta.get("description", raw.pop("description", ""))
    raw.pop("name", None)
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise MaxMatchError(f"unknown recipe section [{section}] in {source}",
                                hint=_suggest(section, list(SECTIONS) + ["recipe"]))
        if not isinstance(values, dict):
            raise MaxMatchError(f"recipe section [{section}] in {source} must be a table, got {values!r}",
                                hint=f"write [{section}] on its own line and its keys below it")
        types_ = _field_types(SECTIONS[section])
        kwargs = {}
        for key, value in values.items():
            if key not in types_:
                raise MaxMatchError(f"unknown recipe key {section}.{key} in {source}",
                                    hint=_suggest(key, list(types_)))
            kwargs[key] = _coerce(value, types_[key], f"{section}.{key}")
        sections[section] = SECTIONS[section](**kwargs)
    return Recipe(name=name, description=str(description), **sections)


def apply_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` (nested dicts) with dotted-key overrides typed and set, e.g. ``{"optim.lr": "2e-4"}``.

    Raises:
        MaxMatchError: a key that is not ``section.key``, an unknown section or key (naming the nearest valid
            one), or a value that does not fit the field's type.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) != 2:
            raise MaxMatchError(f"override key '{dotted}' must look like section.key",
                                hint="e.g. --set optim.lr=2e-4")
        section, key = parts
        if section not in SECTIONS:
            raise MaxMatchError(f"unknown recipe section '{section}' in override '{dotted}'",
                                hint=_suggest_section(section, key))
        if not isinstance(out.get(section, {}), dict):
            raise MaxMatchError(f"recipe section [{section}] must be a table, got {out[section]!r}",
                                hint=f"write [{section}] on its own line in the recipe and its keys below it")
        types_ = _field_types(SECTIONS[section])
        if key not in types_:
            raise MaxMatchError(f"unknown recipe key {section}.{key} in override '{dotted}'",
                                hint=_suggest(key, list(types_), prefix=f"{section}."))
        out.setdefault(section, {})[key] = _coerce(value, types_[key], dotted)
    return out


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse ``["optim.lr=2e-4", ...]`` into a dict; values stay strings until typed by the schema."""
    result: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise MaxMatchError(f"override '{item}' is not of the form section.key=value",
                                hint="e.g. --set optim.lr=2e-4")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result
