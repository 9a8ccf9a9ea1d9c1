"""Eq. 5 (losses/total.py): the weighted sum of the components, the table, the data-parallel mode."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses import (
    LOSS_COMPONENTS,
    LossWeights,
    contrastive_loss,
    diversity_loss,
    global_discriminative_loss,
    intra_set_divergence_loss,
    mmd_loss,
    same_image_mask,
    total_loss,
    triplet_loss,
)

# Batches iterate over captions: image 1 and image 3 appear twice.
IMAGE_IDS = torch.tensor([0, 1, 1, 2, 3, 3, 4])


def _batch(b=len(IMAGE_IDS), k=3, d=6, seed=10):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    img_slots, txt_slots = r(b, k, d), r(b, k, d)
    img_global, txt_global = r(b, d), r(b, d)
    img_sets = F.normalize(img_slots + img_global.unsqueeze(1), dim=-1)
    txt_sets = F.normalize(txt_slots + txt_global.unsqueeze(1), dim=-1)
    # A stand-in set similarity (mean of the element cosines); total_loss only needs a matrix.
    sims = torch.einsum("ikd,tld->it", img_sets, txt_sets) / k**2
    return dict(
        sims=sims, img_sets=img_sets, txt_sets=txt_sets, img_global=img_global, txt_global=txt_global,
        img_slots=img_slots, txt_slots=txt_slots,
    )  # fmt: skip


def test_total_loss_is_weighted_sum_of_components():
    x = _batch()
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    w = dict(tri_weight=1.0, gd_weight=0.1, isd_weight=0.2, mmd_weight=0.3, div_weight=0.4,
             contrastive_weight=0.5, margin=0.25, contrastive_temperature=0.2)  # fmt: skip
    total, log = total_loss(**x, image_ids=IMAGE_IDS, **w)
    parts = {
        "tri": triplet_loss(x["sims"], pos, margin=0.25, reduction="mean"),
        "gd": 0.5 * (global_discriminative_loss(x["img_sets"], x["img_global"]) + global_discriminative_loss(x["txt_sets"], x["txt_global"])),
        "isd": intra_set_divergence_loss(x["img_sets"]) + intra_set_divergence_loss(x["txt_sets"]),
        "mmd": mmd_loss(x["img_sets"].flatten(0, 1), x["txt_sets"].flatten(0, 1)),  # _batch's sets are unit
        "div": diversity_loss(x["img_slots"]) + diversity_loss(x["txt_slots"]),
        "con": contrastive_loss(x["sims"], pos, temperature=0.2),
    }
    assert set(log) == set(LOSS_COMPONENTS) | {"total"}
    for name, value in parts.items():
        torch.testing.assert_close(log[name], value)
        assert not log[name].requires_grad
    expected = sum(w[LOSS_COMPONENTS[name].weight] * value for name, value in parts.items())
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(log["total"], expected)


def test_total_loss_without_ids_uses_diagonal_positives():
    x = _batch()
    _, log = total_loss(**x, mmd_weight=0, div_weight=0, gd_weight=0, isd_weight=0)
    torch.testing.assert_close(log["tri"], triplet_loss(x["sims"], None, reduction="mean"))
    _, log = total_loss(**x, mmd_weight=0, div_weight=0, gd_weight=0, isd_weight=0, triplet_reduction="sum")
    torch.testing.assert_close(log["tri"], triplet_loss(x["sims"], None))


def test_total_loss_skips_zero_weights():
    x = _batch()
    calls = []
    original = LOSS_COMPONENTS["mmd"]
    try:
        LOSS_COMPONENTS["mmd"] = original.__class__(original.weight, lambda *a: calls.append(1), original.help)
        _, log = total_loss(**{**x, "img_slots": None, "txt_slots": None}, mmd_weight=0.0, div_weight=0.0)
    finally:
        LOSS_COMPONENTS["mmd"] = original
    assert calls == []
    assert set(log) == {"tri", "gd", "isd", "total"}  # contrastive defaults to 0


def test_total_loss_div_needs_slots():
    x = _batch()
    with pytest.raises(MaxMatchError, match="slots"):
        total_loss(**{**x, "img_slots": None}, div_weight=0.01)


def test_total_loss_data_parallel_mode_matches_full_batch():
    x = _batch()
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    w = dict(gd_weight=0, isd_weight=0, mmd_weight=0, div_weight=0, contrastive_weight=0.5, triplet_reduction="sum")
    full_tri = triplet_loss(x["sims"], pos, reduction="none")
    full_con = contrastive_loss(x["sims"], pos, reduction="none")
    tri_sum = 0.0
    for lo, hi in [(0, 3), (3, 7)]:
        local = {k: v[lo:hi] for k, v in x.items() if k != "sims"}
        _, log = total_loss(
            x["sims"][lo:hi], **local, image_ids=IMAGE_IDS[lo:hi],
            sims_t2i=x["sims"][:, lo:hi], all_image_ids=IMAGE_IDS, offset=lo, **w,
        )  # fmt: skip
        tri_sum += log["tri"]
        torch.testing.assert_close(log["con"], 0.5 * full_con[:, lo:hi].mean(1).sum())
    torch.testing.assert_close(tri_sum, full_tri.sum())
    # One process, offset 0: the data-parallel path gives the in-batch values.
    _, one = total_loss(**x, image_ids=IMAGE_IDS, sims_t2i=x["sims"], all_image_ids=IMAGE_IDS, **w)
    _, square = total_loss(**x, image_ids=IMAGE_IDS, **w)
    for name in one:
        torch.testing.assert_close(one[name], square[name])


def test_loss_weights_validation():
    with pytest.raises(MaxMatchError, match="gd_weight"):
        LossWeights(gd_weight=-1)
    with pytest.raises(MaxMatchError, match="temperature"):
        LossWeights(contrastive_temperature=0)
    with pytest.raises(MaxMatchError, match="did you mean 'gd_weight'"):
        total_loss(**_batch(), gd_wieght=0.1)
    assert math.isclose(LossWeights().margin, 0.2)


# The components documented in losses/__init__.py and paper eq. 5, in the order total_loss adds them. Adding a
# component without its table entry (or an entry without updating this list and the docs) fails here.
DOCUMENTED_COMPONENTS = ["tri", "gd", "isd", "mmd", "div", "con"]


def test_the_component_table_lists_exactly_the_documented_components():
    assert list(LOSS_COMPONENTS) == DOCUMENTED_COMPONENTS
    weight_fields = {f.name for f in fields(LossWeights)}
    for name, component in LOSS_COMPONENTS.items():
        assert component.weight in weight_fields, f"{name}: {component.weight} is no LossWeights field"
        assert component.help and callable(component.fn)
    assert len({c.weight for c in LOSS_COMPONENTS.values()}) == len(LOSS_COMPONENTS)


def test_every_loss_module_is_documented_in_the_package():
    import maxmatch_cli.method.losses as losses

    modules = sorted(p.stem for p in Path(losses.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert modules == ["base", "contrastive", "diversity", "global_discriminative", "intra_set_divergence", "mmd",
                       "total", "triplet"]
    for module in modules:
        assert f"``{module}.py``" in losses.__doc__
