"""Recipes: typed, frozen configuration for every stage, loaded from TOML.

A recipe is a TOML file with one table per section (``[data]``, ``[model]``, ``[loss]``, ``[optim]``,
``[train]``, ``[eval]``) plus an optional ``[recipe]`` table holding ``description`` and ``extends`` (the name
or path of a parent recipe whose values this one overrides). Every field has a default, so a recipe only
lists what differs. Command-line overrides use dotted keys: ``--set optim.lr=2e-4``.

Unknown sections or keys, and values of the wrong type, raise :class:`~maxmatch_cli.errors.MaxMatchError`
naming the key and suggesting the nearest valid one: nothing is silently ignored.

This module is the one import path the other stages use; the code lives in
:mod:`~maxmatch_cli.config.sections` (the six section dataclasses and their checks),
:mod:`~maxmatch_cli.config.schema` (:class:`Recipe`, typing of nested dicts and ``--set`` overrides) and
:mod:`~maxmatch_cli.config.loading` (the shipped registry, files, ``extends`` and TOML output).
"""

from __future__ import annotations

from maxmatch_cli.config.loading import RECIPE_SUFFIX, list_recipes, load_recipe, recipes_dir, to_toml
from maxmatch_cli.config.schema import SECTIONS, Recipe, apply_dotted, parse_overrides, recipe_from_dict
from maxmatch_cli.config.sections import DataConfig, EvalConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = ["RECIPE_SUFFIX", "SECTIONS", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig",
           "Recipe", "TrainConfig", "apply_dotted", "list_recipes", "load_recipe", "parse_overrides",
           "recipe_from_dict", "recipes_dir", "to_toml"]
