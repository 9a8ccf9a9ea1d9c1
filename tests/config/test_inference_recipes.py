"""Which similarity each shipped recipe validates and tests with (paper §3.4: "During inference, we select the
top-k most similar embeddings from the predicted sets without applying the one-to-one matching")."""

import pytest

from maxmatch_cli.config.loading import list_recipes
from maxmatch_cli.config.recipes import load_recipe

PAPER_RECIPES = [name for name in list_recipes() if name != "demo"]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_infer_as_the_paper_says(name):
    """A set model trained with MaxMatch scores with top-k, k = K (our reading); a baseline trained with another
    similarity scores with its own, also where it extends a MaxMatch recipe."""
    recipe = load_recipe(name)
    used = recipe.eval.similarity or recipe.loss.similarity
    if recipe.loss.similarity == "maxmatch" and recipe.model.num_embeds > 1:
        assert used == "topk"
        assert recipe.loss.topk_k in (0, recipe.model.num_embeds)  # 0 = K
    else:
        assert used == recipe.loss.similarity


def test_every_headline_maxmatch_recipe_is_covered():
    topk = {name for name in PAPER_RECIPES if load_recipe(name).eval.similarity == "topk"}
    assert {"coco-butd-bert", "f30k-butd-bert", "coco-butd-bigru", "f30k-butd-bigru", "coco-resnet152-bigru",
            "f30k-resnet152-bigru", "f30k-resnet152-bigru-pvse", "coco-resnext-bert", "f30k-resnext-bert"} <= topk


def test_demo_keeps_exact_matching():
    """The demo is no paper recipe: it validates and tests with its training similarity (CI checks its numbers)."""
    recipe = load_recipe("demo")
    assert recipe.eval.similarity == "" and recipe.loss.similarity == "maxmatch"
