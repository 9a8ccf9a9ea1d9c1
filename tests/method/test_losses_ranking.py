"""Ranking losses (losses/triplet.py, losses/contrastive.py) against brute-force Python loops on tiny seeded
tensors, forward and backward; the in-batch and the data-parallel (sliced) forms agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses import contrastive_loss, same_image_mask, triplet_loss

# Batches iterate over captions: image 1 and image 3 appear twice.
IMAGE_IDS = torch.tensor([0, 1, 1, 2, 3, 3, 4])


def _sims(n=len(IMAGE_IDS), m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m or n, generator=g, dtype=torch.float64).requires_grad_()


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
