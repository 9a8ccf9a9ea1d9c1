"""Losses against brute-force Python loops on tiny seeded tensors, forward and backward."""

from __future__ import annotations

import math

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


def _sims(n=len(IMAGE_IDS), m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m or n, generator=g, dtype=torch.float64).requires_grad_()


def _cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


# ---------------------------------------------------------------- brute-force references


def ref_triplet(sims, ids, margin, hardest):
    """Eq. 6 over the diagonal pairs, image->caption and caption->image, sum over queries."""
    n = sims.shape[0]
    total = sims.new_zeros(())
    for i in range(n):  # image query i, positive caption i
        costs = [torch.clamp(margin + sims[i, j] - sims[i, i], min=0) for j in range(n) if ids[j] != ids[i]]
        if costs:
            total = total + (max(costs, key=lambda c: c.detach().item()) if hardest else sum(costs))
    for j in range(n):  # caption query j, positive image j
        costs = [torch.clamp(margin + sims[i, j] - sims[j, j], min=0) for i in range(n) if ids[i] != ids[j]]
        if costs:
            total = total + (max(costs, key=lambda c: c.detach().item()) if hardest else sum(costs))
    return total


def ref_info_nce(sims, ids, t):
    n = sims.shape[0]
    i2t = [
        -sims[i, i] / t + torch.logsumexp(torch.stack([sims[i, i] / t] + [sims[i, j] / t for j in range(n) if ids[j] != ids[i]]), 0)
        for i in range(n)
    ]
    t2i = [
        -sims[j, j] / t + torch.logsumexp(torch.stack([sims[j, j] / t] + [sims[i, j] / t for i in range(n) if ids[i] != ids[j]]), 0)
        for j in range(n)
    ]
    return 0.5 * (sum(i2t) / n + sum(t2i) / n)


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_matches_loop_with_duplicate_images(hardest):
    sims = _sims()
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    out, g = _grad(lambda s: triplet_loss(s, pos, margin=0.3, hardest=hardest), sims)
    ref, g_ref = _grad(lambda s: ref_triplet(s, IMAGE_IDS.tolist(), 0.3, hardest), sims)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_triplet_duplicates_are_not_negatives():
    ids = torch.tensor([0, 0, 1])
    sims = torch.tensor([[1.0, 5.0, 0.0], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # Without the mask, the other caption of image 0 (score 5) would be the hardest negative.
    assert triplet_loss(sims, same_image_mask(ids, ids), margin=0.2) == 0
    assert triplet_loss(sims, None, margin=0.2) > 0


def test_hardest_vs_all_negatives():
    sims = torch.tensor([[0.5, 0.6, 0.4], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    per = triplet_loss(sims, margin=0.2, direction="i2t", reduction="none")
    torch.testing.assert_close(per, torch.tensor([0.3, 0.0, 0.0]))
    per_all = triplet_loss(sims, margin=0.2, hardest=False, direction="i2t", reduction="none")
    torch.testing.assert_close(per_all, torch.tensor([0.3 + 0.1, 0.0, 0.0]))


def test_triplet_both_is_sum_of_directions_and_reductions():
    sims = _sims(seed=1)
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    both = triplet_loss(sims, pos, reduction="none")
    assert both.shape == (2, len(IMAGE_IDS))
    torch.testing.assert_close(both[0], triplet_loss(sims, pos, direction="i2t", reduction="none"))
    torch.testing.assert_close(both[1], triplet_loss(sims, pos, direction="t2i", reduction="none"))
    torch.testing.assert_close(triplet_loss(sims, pos), both.sum())
    torch.testing.assert_close(triplet_loss(sims, pos, reduction="mean"), both.mean(1).sum())


def test_triplet_permuted_columns_equal_diagonal():
    sims = _sims(seed=2)
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    perm = torch.randperm(len(IMAGE_IDS), generator=torch.Generator().manual_seed(0))
    # Column perm[i] now holds caption i: its positive is row i.
    out = triplet_loss(sims[:, perm], pos[:, perm], pos_index=torch.argsort(perm))
    torch.testing.assert_close(out, triplet_loss(sims, pos))


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_distributed_slices_equal_full_batch(hardest, loss):
    """Local rows vs global columns (and global rows vs local columns) reproduce the full-batch terms."""
    fn = {
        "triplet": lambda *a, **k: triplet_loss(*a, margin=0.2, hardest=hardest, **k),
        "contrastive": lambda *a, **k: contrastive_loss(*a, temperature=0.5, **k),
    }[loss]
    sims = _sims(seed=3).detach()
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    full = fn(sims, pos, reduction="none")  # (2, N)
    n = len(IMAGE_IDS)
    for lo, hi in [(0, 3), (3, 5), (5, 7)]:  # uneven "ranks"
        local = torch.arange(hi - lo) + lo
        i2t = fn(sims[lo:hi], pos[lo:hi], direction="i2t", pos_index=local, reduction="none")
        t2i = fn(sims[:, lo:hi], pos[:, lo:hi], direction="t2i", pos_index=local, reduction="none")
        torch.testing.assert_close(i2t, full[0, lo:hi])
        torch.testing.assert_close(t2i, full[1, lo:hi])
    assert n == 7


def test_distributed_gradients_sum_to_full_batch():
    sims = _sims(seed=4)
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    _, g_full = _grad(lambda s: triplet_loss(s, pos), sims)

    def sharded(s):
        total = s.new_zeros(())
        for lo, hi in [(0, 4), (4, 7)]:
            local = torch.arange(hi - lo) + lo
            total = total + triplet_loss(s[lo:hi], pos[lo:hi], direction="i2t", pos_index=local)
            total = total + triplet_loss(s[:, lo:hi], pos[:, lo:hi], direction="t2i", pos_index=local)
        return total

    _, g_sharded = _grad(sharded, sims)
    torch.testing.assert_close(g_sharded, g_full)


def test_query_without_negatives_contributes_zero():
    sims = _sims(3, seed=5)
    ids = torch.tensor([0, 0, 0])
    out, g = _grad(lambda s: triplet_loss(s, same_image_mask(ids, ids)), sims)
    assert out == 0 and torch.all(g == 0)
    out, g = _grad(lambda s: contrastive_loss(s, same_image_mask(ids, ids)), sims)
    assert out == 0 and torch.isfinite(g).all()


def test_ranking_input_errors():
    sims = torch.zeros(3, 4)
    with pytest.raises(MaxMatchError, match="square"):
        triplet_loss(sims)
    with pytest.raises(MaxMatchError, match="direction"):
        triplet_loss(torch.zeros(3, 3), direction="up")
    with pytest.raises(MaxMatchError, match="reduction"):
        triplet_loss(torch.zeros(3, 3), reduction="max")
    with pytest.raises(MaxMatchError, match="positives"):
        triplet_loss(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(MaxMatchError, match="permutation"):
        triplet_loss(torch.zeros(3, 3), pos_index=torch.tensor([0, 0, 1]))
    with pytest.raises(MaxMatchError, match="pos_index"):
        triplet_loss(torch.zeros(4, 3), direction="i2t")


# ---------------------------------------------------------------- contrastive


def test_contrastive_matches_loop():
    sims = _sims(seed=6)
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    out, g = _grad(lambda s: contrastive_loss(s, pos, temperature=0.3), sims)
    ref, g_ref = _grad(lambda s: ref_info_nce(s, IMAGE_IDS.tolist(), 0.3), sims)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_contrastive_without_duplicates_is_clip_loss():
    sims = _sims(5, seed=7).detach()
    labels = torch.arange(5)
    ref = 0.5 * (F.cross_entropy(sims / 0.1, labels) + F.cross_entropy(sims.t() / 0.1, labels))
    torch.testing.assert_close(contrastive_loss(sims, temperature=0.1), ref)


def test_ranking_losses_gradcheck():
    pos = same_image_mask(IMAGE_IDS, IMAGE_IDS)
    sims = _sims(seed=8)
    assert torch.autograd.gradcheck(lambda s: contrastive_loss(s, pos, temperature=0.5), (sims,))
    # All-negatives hinge is piecewise linear; random sims keep every hinge away from its kink.
    assert torch.autograd.gradcheck(lambda s: triplet_loss(s, pos, margin=0.1, hardest=False), (sims,))


# ---------------------------------------------------------------- set regularisers


def _sets(b=3, k=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, d, generator=g, dtype=torch.float64)


def test_global_discriminative_matches_loop():
    sets, glob = _sets(seed=1), _sets(seed=2)[:, 0]

    def ref(sets, glob):
        terms = [
            torch.exp(0.5 * (_cos(sets[b, k], glob[b]) - 0.6))
            for b in range(sets.shape[0])
            for k in range(sets.shape[1])
        ]
        return sum(terms) / len(terms)

    sets.requires_grad_()
    glob.requires_grad_()
    out = global_discriminative_loss(sets, glob, margin=0.6, scale=0.5)
    expected = ref(sets, glob)
    torch.testing.assert_close(out, expected)
    g = torch.autograd.grad(out, (sets, glob))
    g_ref = torch.autograd.grad(expected, (sets, glob))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda s, q: global_discriminative_loss(s, q, 0.6, 0.5), (sets, glob))


def test_intra_set_divergence_matches_loop():
    sets = _sets(seed=3).requires_grad_()
    b_, k_ = sets.shape[:2]
    terms = [
        torch.exp(2.0 * (_cos(sets[b, j], sets[b, k]) - 0.8))
        for b in range(b_)
        for j in range(k_ - 1)
        for k in range(j + 1, k_)
    ]
    expected = sum(terms) / (b_ * k_ * (k_ - 1) / 2)
    out = intra_set_divergence_loss(sets, margin=0.8, scale=2.0)
    torch.testing.assert_close(out, expected)
    (g,) = torch.autograd.grad(out, sets)
    (g_ref,) = torch.autograd.grad(expected, sets)
    torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(lambda s: intra_set_divergence_loss(s, 0.8, 2.0), (sets,))


def test_diversity_matches_loop():
    slots = _sets(seed=4).requires_grad_()
    b_, k_ = slots.shape[:2]
    unit = slots / slots.norm(dim=-1, keepdim=True)
    per_sample = [
        sum(torch.exp(-2 * (unit[b, i] - unit[b, j]).pow(2).sum()) for i in range(k_) for j in range(i + 1, k_))
        / (k_ * (k_ - 1) / 2)
        for b in range(b_)
    ]
    expected = sum(per_sample) / b_
    out = diversity_loss(slots)
    torch.testing.assert_close(out, expected)
    (g,) = torch.autograd.grad(out, slots)
    (g_ref,) = torch.autograd.grad(expected, slots)
    torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(diversity_loss, (slots,))


def ref_mmd(x, y, gamma=0.5):
    def k(a, b):
        return torch.exp(-gamma * (a - b).pow(2).sum().sqrt())

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


def test_mmd_matches_loop():
    x = _sets(1, 6, 5, seed=5)[0].requires_grad_()
    y = (_sets(1, 4, 5, seed=6)[0] + 0.5).requires_grad_()
    out = mmd_loss(x, y)
    expected = ref_mmd(x, y)
    torch.testing.assert_close(out, expected)
    g = torch.autograd.grad(out, (x, y))
    # The loop's sqrt has an infinite derivative at the zero self-distances; drop those terms from its graph.
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()

    def ref_off_diag(x, y, gamma=0.5):
        def k(a, b):
            return torch.exp(-gamma * (a - b).pow(2).sum().sqrt())

        kxx = (len(x) + sum(k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j)) / len(x) ** 2
        kyy = (len(y) + sum(k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j)) / len(y) ** 2
        kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
        return kxx + kyy - 2 * kxy

    g_ref = torch.autograd.grad(ref_off_diag(x2, y2), (x2, y2))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(mmd_loss, (x, y))


def test_mmd_zero_for_identical_sets_with_finite_gradient():
    x = _sets(1, 6, 5, seed=7)[0].requires_grad_()
    out = mmd_loss(x, x)
    assert out.abs() < 1e-12
    (g,) = torch.autograd.grad(out, x)
    assert torch.isfinite(g).all()
    # Distinct tensors with coinciding points (zero cross distances), in float32 as in training.
    a = x.detach().float().requires_grad_()
    b = a.detach().clone().requires_grad_()
    out = mmd_loss(a, b)
    assert out.abs() < 1e-3
    ga, gb = torch.autograd.grad(out, (a, b))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert mmd_loss(a, b + 3.0) > 0.1


def test_regulariser_shape_errors():
    with pytest.raises(MaxMatchError):
        global_discriminative_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(MaxMatchError):
        intra_set_divergence_loss(torch.zeros(2, 1, 4))
    with pytest.raises(MaxMatchError):
        diversity_loss(torch.zeros(2, 4))
    with pytest.raises(MaxMatchError):
        mmd_loss(torch.zeros(2, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------- eq. 5


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
