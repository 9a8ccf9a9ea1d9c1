"""The pooled single-vector head (VSE++, Faghri et al. 2018): one unit vector per item, cosine scoring, training.

References are computed independently here: the image embedding by hand from the projection's weights, the
similarities as a plain cosine matrix, and VSE++'s hinge with hardest negatives by a loop over the queries.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as nnf

from maxmatch_cli.config.recipes import ModelConfig, load_recipe
from maxmatch_cli.data.images import build_image_source
from maxmatch_cli.data.tokenizers import build_tokenizer
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.method.similarity import set_similarity
from maxmatch_cli.models import PooledHead, build_model
from maxmatch_cli.training.trainer import build_train_dataset, loss_on_batch

D, F = 16, 12
VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass"]
# The demo comparison's VSE++ row (benchmarks/demo_comparison.py), on the tiny store's 32-d features.
VSEPP = {"model.set_head": "pooled", "model.num_embeds": "1", "model.image_pool": "mean", "model.image_mlp": "false",
         "loss.similarity": "mil", "loss.margin": "0.2", "loss.gd_weight": "0", "loss.isd_weight": "0",
         "loss.mmd_weight": "0", "loss.div_weight": "0", "loss.warmup_epochs": "0"}


def pooled_cfg(**kw) -> ModelConfig:
    base = dict(embed_dim=D, num_embeds=1, image_feature_dim=F, word_dim=8, set_head="pooled", image_pool="mean",
                image_mlp=False, image_dropout=0.0, text_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_one_unit_vector_per_item_a_linear_map_of_the_mean_pooled_regions():
    torch.manual_seed(0)
    model = build_model(pooled_cfg(), VOCAB).eval()
    feats = torch.randn(3, 5, F)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = model.encode_images(feats, mask)
    assert out.sets.shape == (3, 1, D)
    torch.testing.assert_close(out.sets.norm(dim=-1), torch.ones(3, 1))
    fc = model.image_encoder.project.fc
    for i in range(3):  # VSE++: fc(mean of the real regions), L2-normalised
        pooled = feats[i, mask[i]].mean(0)
        expected = fc.weight @ pooled + fc.bias
        torch.testing.assert_close(out.sets[i, 0], expected / expected.norm(), atol=1e-5, rtol=1e-5)
    tokens = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 4, 5, 6, 7, 2]])
    txt = model.encode_texts(tokens, tokens != 0)
    assert txt.sets.shape == (2, 1, D)
    torch.testing.assert_close(txt.sets[:, 0], nnf.normalize(txt.global_, dim=-1))
    assert sum(p.numel() for p in model.image_head.parameters()) == 0  # no weights beyond VSE++'s


def test_pooled_head_needs_one_element_and_image_pool_is_checked():
    with pytest.raises(MaxMatchError, match="model.num_embeds"):
        pooled_cfg(num_embeds=4)
    with pytest.raises(MaxMatchError, match="model.image_pool"):
        pooled_cfg(image_pool="median")
    # The region encoder's default global stays the max over regions (paper §3.1).
    model = build_model(pooled_cfg(image_pool=""), VOCAB).eval()
    feats = torch.randn(2, 4, F)
    f = model.image_encoder(feats, None)
    torch.testing.assert_close(f.global_, f.local.amax(1))


def test_with_one_element_every_set_similarity_is_a_function_of_the_cosine():
    torch.manual_seed(1)
    img, txt = torch.randn(4, 1, D), torch.randn(6, 1, D)
    cos = nnf.normalize(img[:, 0], dim=-1) @ nnf.normalize(txt[:, 0], dim=-1).T
    torch.testing.assert_close(set_similarity(img, txt, kind="mil"), cos)  # MIL with K = 1 is exactly cosine
    torch.testing.assert_close(set_similarity(img, txt, kind="chamfer", alpha=16.0), cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(set_similarity(img, txt, kind="maxmatch"), torch.exp(cos) - 1)
    torch.testing.assert_close(set_similarity(img, txt, kind="topk"), torch.exp(cos) - 1)


def test_head_output_scores_as_the_cosine_of_the_globals():
    head = PooledHead()
    glob_i, glob_t = torch.randn(3, D), torch.randn(5, D)
    mask = torch.ones(3, 2, dtype=torch.bool)
    a, b = head(torch.randn(3, 2, D), glob_i, mask), head(torch.randn(5, 2, D), glob_t, mask[:1].expand(5, 2))
    expected = nnf.cosine_similarity(glob_i[:, None], glob_t[None], dim=-1)
    torch.testing.assert_close(set_similarity(a.sets, b.sets, kind="mil"), expected, atol=1e-6, rtol=1e-6)


def _vsepp_hinge(sims: torch.Tensor, owner: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++'s loss by a loop: per query the hardest negative's hinge; mean over each direction's queries, summed.

    Every caption is a query in both directions (its image asks for it among the batch's captions, and it asks
    for its image among the batch's images), as reading 1 of recipes/README.md and DivE's image-centric batches."""
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        pos = [sims[i, j] for j in range(n_cap) if owner[j] == i]
        neg = max(sims[i, j] for j in range(n_cap) if owner[j] != i)
        i2t += [torch.clamp(margin + neg - p, min=0) for p in pos]
    t2i = []
    for j in range(n_cap):
        neg = max(sims[i, j] for i in range(n_img) if owner[j] != i)
        t2i.append(torch.clamp(margin + neg - sims[owner[j], j], min=0))
    return torch.stack(i2t).mean() + torch.stack(t2i).mean()


def test_training_step_is_vsepp_hardest_negative_hinge_and_learns(tiny_h5):
    torch.manual_seed(0)
    recipe = load_recipe("demo", {**VSEPP, "data.path": str(tiny_h5), "model.image_feature_dim": "32",
                                  "model.embed_dim": "32", "model.word_dim": "16", "data.vocab_min_count": "1",
                                  "data.num_workers": "0", "train.batch_size": "6"})
    store = open_store(recipe.data.path)
    _, caps = store.split(recipe.data.train_split)
    tokenizer = build_tokenizer("bigru", captions=store.captions_text(caps), min_count=1)
    model = build_model(recipe.model, tokenizer.words)
    data = build_train_dataset(store, recipe, tokenizer, build_image_source(store, recipe, train=True))
    batch = data.collate([data[i] for i in range(6)])
    owner = batch.caption_owner if batch.caption_owner is not None else torch.arange(len(batch.tokens))
    model.eval()
    with torch.no_grad():
        loss_eval, _ = loss_on_batch(model, batch, recipe, hardest=True)
        img, txt = model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)
        cos = img.sets[:, 0] @ txt.sets[:, 0].T
    torch.testing.assert_close(loss_eval, _vsepp_hinge(cos, owner, 0.2), atol=1e-5, rtol=1e-5)
    # A few optimiser steps on the batch lower the loss (measured in eval mode: no dropout, so the values compare).
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1.0, 1.0, 1.0, 0.0), lr=1e-3)
    for _ in range(8):
        loss, _ = loss_on_batch(model, batch, recipe, hardest=True)
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert loss_on_batch(model, batch, recipe, hardest=True)[0] < loss_eval
