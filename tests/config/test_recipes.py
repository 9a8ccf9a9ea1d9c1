"""Recipe loading, overrides, inheritance and errors."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from maxmatch_cli.config.recipes import (Recipe, list_recipes, load_recipe, parse_overrides, recipe_from_dict,
                                         recipes_dir, to_toml)
from maxmatch_cli.errors import MaxMatchError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description, f"recipe {name} needs a one-line description"
    # Round trip through TOML gives the same recipe.
    again = recipe_from_dict(tomllib.loads(to_toml(recipe)), name=name)
    assert again == recipe


def test_demo_recipe_is_shipped(monkeypatch):
    monkeypatch.delenv("MAXMATCH_RECIPES", raising=False)
    assert recipes_dir() == REPO / "recipes"  # the repository's top-level folder, wherever the loader lives
    assert "demo" in list_recipes()
    assert (recipes_dir() / "demo.toml").is_file()
    monkeypatch.setenv("MAXMATCH_RECIPES", str(REPO / "tests"))
    assert recipes_dir() == REPO / "tests" and "demo" not in list_recipes()


def test_override_types_are_coerced():
    recipe = load_recipe("demo", parse_overrides(["optim.lr=2e-4", "train.epochs=3", "train.amp=false",
                                                  "loss.similarity=chamfer"]))
    assert recipe.optim.lr == pytest.approx(2e-4)
    assert recipe.train.epochs == 3 and recipe.train.amp is False
    assert recipe.loss.similarity == "chamfer"


def test_unknown_key_suggests_nearest():
    with pytest.raises(MaxMatchError) as err:
        load_recipe("demo", {"optim.learning_rat": "1"})
    assert "optim.learning_rat" in str(err.value)
    with pytest.raises(MaxMatchError) as err:
        load_recipe("demo", {"loss.gd_wieght": "0.1"})
    assert err.value.hint == "did you mean 'loss.gd_weight'?"  # the whole dotted key, ready to paste
    with pytest.raises(MaxMatchError) as err:
        load_recipe("demo", {"optim.lrr": "1"})
    assert err.value.hint == "did you mean 'optim.lr'?"


def test_unknown_section_suggests_the_dotted_key():
    with pytest.raises(MaxMatchError, match="unknown recipe section 'optm'") as err:
        load_recipe("demo", {"optm.lr": "1"})
    assert err.value.hint == "did you mean 'optim.lr'?"
    with pytest.raises(MaxMatchError) as err:  # the nearest section has no such key: the section alone
        load_recipe("demo", {"optm.bogus": "1"})
    assert err.value.hint == "did you mean 'optim'?"


def test_unknown_section_and_malformed_override():
    with pytest.raises(MaxMatchError, match="unknown recipe section"):
        load_recipe("demo", {"optimizer.lr": "1"})
    with pytest.raises(MaxMatchError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(MaxMatchError, match="section.key"):
        load_recipe("demo", {"lr": "1"})


def test_wrong_type_names_key():
    with pytest.raises(MaxMatchError, match="train.epochs expects int"):
        load_recipe("demo", {"train.epochs": "many"})
    with pytest.raises(MaxMatchError, match="train.amp expects bool"):
        load_recipe("demo", {"train.amp": "maybe"})


def test_invalid_choice_suggests():
    with pytest.raises(MaxMatchError) as err:
        load_recipe("demo", {"loss.similarity": "maxmach"})
    assert "maxmatch" in err.value.hint


def test_unknown_recipe_name_suggests():
    with pytest.raises(MaxMatchError) as err:
        load_recipe("dmeo")
    assert "demo" in err.value.hint


def test_extends_merges_and_detects_cycles(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[recipe]\ndescription = "base"\n[optim]\nlr = 0.5\nweight_decay = 0.25\n')
    child = tmp_path / "child.toml"
    child.write_text(f'[recipe]\nextends = "{base}"\ndescription = "child"\n[optim]\nlr = 0.125\n')
    recipe = load_recipe(str(child))
    assert recipe.optim.lr == 0.125 and recipe.optim.weight_decay == 0.25
    assert recipe.description == "child"
    loop = tmp_path / "loop.toml"
    loop.write_text(f'[recipe]\nextends = "{loop}"\n')
    with pytest.raises(MaxMatchError, match="extends itself"):
        load_recipe(str(loop))


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(MaxMatchError, match="not valid TOML"):
        load_recipe(str(bad))
    with pytest.raises(MaxMatchError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.toml"))


def test_cross_field_check():
    with pytest.raises(MaxMatchError, match="warmup_epochs"):
        Recipe().replace(**{"loss.warmup_epochs": 100, "train.epochs": 2})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'lr'"):
        Recipe().optim.lr = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'optim'"):
        Recipe().optim = None  # type: ignore[misc]
