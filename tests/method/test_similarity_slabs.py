"""The no-grad evaluation kernels (similarity/slabs.py and each member's ``slab_score``) against brute force
(itertools.permutations, scipy's linear_sum_assignment, sorted entries) and against the autograd path, which
training keeps using unchanged."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity import (
    SIMILARITIES,
    chamfer_score,
    gallery_similarity,
    maxmatch_score,
    set_similarity,
    text_gallery,
    topk_score,
)
from maxmatch_cli.method.similarity.base import cosine_block, normalised_sets
from maxmatch_cli.method.similarity.chamfer import chamfer_slabs
from maxmatch_cli.method.similarity.maxmatch import maxmatch_slabs
from maxmatch_cli.method.similarity.topk import topk_slabs

KINDS = ["maxmatch", "chamfer", "mil", "topk", "sinkhorn"]
SHAPES = [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (3, 3), (4, 4), (3, 5), (5, 3), (2, 6)]


def sets(n: int, k: int, d: int = 8, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, k, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def as_slabs(c: torch.Tensor) -> torch.Tensor:
    """Cosine matrices ``(bi, bt, K, K')`` in the slab layout ``(bi, K, K', bt)`` the kernels read."""
    return c.permute(0, 2, 3, 1).contiguous()


def autograd_path(img, txt, kind, **options):
    """set_similarity as training computes it (gradients on)."""
    with torch.enable_grad():
        return set_similarity(img.clone().requires_grad_(), txt, kind, **options).detach()


def brute_maxmatch(c: list[list[float]]) -> float:
    """Lexicographically first best injective map of the smaller side (the enumeration's tie rule)."""
    k, kp = len(c), len(c[0])
    if k > kp:
        c, k, kp = [list(col) for col in zip(*c)], kp, k
    best = max(itertools.permutations(range(kp), k), key=lambda p: sum(c[r][p[r]] for r in range(k)))
    return sum(math.expm1(c[r][best[r]]) for r in range(k)) / k


# ----------------------------------------------------------------------------------------- maxmatch


@pytest.mark.parametrize("k_img,k_txt", SHAPES)
def test_maxmatch_slabs_equal_brute_force_and_scipy(k_img, k_txt):
    img, txt = sets(5, k_img, seed=k_img), sets(7, k_txt, seed=10 + k_txt)
    with torch.no_grad():
        got = set_similarity(img, txt, "maxmatch")  # the slab kernel
    c = cosine_block(*normalised_sets(img, txt, paired=False))
    for i, j in itertools.product(range(5), range(7)):
        assert math.isclose(got[i, j].item(), brute_maxmatch(c[i, j].tolist()), rel_tol=1e-12, abs_tol=1e-12)
        rows, cols = linear_sum_assignment(c[i, j].numpy(), maximize=True)
        matched = c[i, j][rows, cols]
        # the optimum's score: same trace as scipy's (no ties in random data, so the same matching)
        assert math.isclose(got[i, j].item(), torch.expm1(matched).mean().item(), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("k_img,k_txt", [(2, 2), (3, 3), (4, 4), (2, 4), (4, 3)])
def test_maxmatch_slabs_break_ties_like_the_enumeration(k_img, k_txt):
    # entries from {0, 0.25, 0.5}: many maps share the best total exactly, and their scores differ
    g = torch.Generator().manual_seed(40 + k_img * k_txt)
    c = torch.randint(0, 3, (6, 5, k_img, k_txt), generator=g, dtype=torch.float64) / 4
    got = maxmatch_slabs(as_slabs(c))
    want = torch.tensor([[brute_maxmatch(c[i, j].tolist()) for j in range(5)] for i in range(6)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, maxmatch_score(c), rtol=1e-12, atol=1e-12)  # today's autograd-path score
    # a hand-made tie: identity and swap both total 1.0; the first map in lexicographic order (identity) wins
    tie = torch.tensor([[[[0.5, 0.25], [0.75, 0.5]]]], dtype=torch.float64)
    torch.testing.assert_close(maxmatch_slabs(as_slabs(tie)), torch.expm1(torch.tensor([[0.5]], dtype=torch.float64)))


def test_maxmatch_slabs_leave_large_or_other_solvers_to_the_solver_path():
    assert maxmatch_slabs(torch.zeros(2, 5, 5, 3)) is None  # 120 maps > ENUMERATION_MAX_MAPS
    assert maxmatch_slabs(torch.zeros(2, 3, 3, 3), solver="scipy") is None
    img, txt = sets(3, 6, seed=1), sets(4, 6, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(set_similarity(img, txt, "maxmatch"), autograd_path(img, txt, "maxmatch"))


# ----------------------------------------------------------------------------------------- other kinds


@pytest.mark.parametrize("k_img,k_txt", SHAPES)
def test_topk_slabs_equal_sorted_entries(k_img, k_txt):
    c = torch.rand(4, 6, k_img, k_txt, generator=torch.Generator().manual_seed(k_img * 7 + k_txt),
                   dtype=torch.float64) * 2 - 1
    for k in sorted({1, min(k_img, k_txt), k_img * k_txt}):
        want = torch.expm1(c.flatten(-2).sort(-1, descending=True).values[..., :k]).mean(-1)
        torch.testing.assert_close(topk_slabs(as_slabs(c), k=k), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(MaxMatchError, match="outside 1.."):
        topk_slabs(as_slabs(c), k=k_img * k_txt + 1)


def test_topk_slabs_with_ties_and_long_networks():
    c = torch.randint(0, 3, (3, 4, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 2
    torch.testing.assert_close(topk_slabs(as_slabs(c), k=5), topk_score(c, k=5), rtol=1e-12, atol=1e-12)
    assert topk_slabs(torch.zeros(2, 8, 8, 3), k=8) is None  # 8 x 64 steps: torch.topk instead


def test_chamfer_slabs_and_their_alpha_limit():
    c = torch.rand(3, 4, 4, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float32) * 2 - 1
    for alpha in (1.0, 16.0, 60.0):
        torch.testing.assert_close(chamfer_slabs(as_slabs(c), alpha=alpha), chamfer_score(c, alpha=alpha))
    assert chamfer_slabs(as_slabs(c), alpha=200.0) is None  # exp(200) overflows float32: the stable path
    img, txt = sets(3, 4, seed=7, dtype=torch.float32), sets(5, 3, seed=8, dtype=torch.float32)
    with torch.no_grad():
        got = set_similarity(img, txt, "chamfer", alpha=200.0)
    torch.testing.assert_close(got, autograd_path(img, txt, "chamfer", alpha=200.0))


# ----------------------------------------------------------------------------------------- the path itself


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_img,k_txt", [(4, 4), (3, 5), (5, 2)])
@pytest.mark.parametrize("block_size", [None, 1, 3])
def test_no_grad_path_equals_training_path(kind, k_img, k_txt, block_size):
    img, txt = sets(7, k_img, d=16, seed=20, dtype=torch.float32), sets(11, k_txt, d=16, seed=21,
                                                                         dtype=torch.float32)
    want = autograd_path(img, txt, kind)
    with torch.no_grad():
        got = set_similarity(img * 3.0, txt, kind, block_size=block_size)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    gallery = text_gallery(txt, block_size=block_size)
    torch.testing.assert_close(gallery_similarity(img, gallery, kind, block_size=block_size), want,
                               rtol=1e-6, atol=1e-6)


def test_training_path_is_the_autograd_path():
    """With gradients on, set_similarity computes exactly what the score functions give on the GEMM, for inputs
    that require a gradient and for detached ones alike."""
    img, txt = sets(5, 4, seed=30, dtype=torch.float32), sets(6, 4, seed=31, dtype=torch.float32)
    a, b = normalised_sets(img, txt, paired=False)
    for kind in KINDS:
        want = SIMILARITIES[kind].score(cosine_block(a, b))
        got = set_similarity(img.clone().requires_grad_(), txt, kind)
        assert got.requires_grad and torch.equal(got.detach(), want)
        assert torch.equal(set_similarity(img, txt, kind), want)


def test_mil_slab_path_is_exact():
    img, txt = sets(6, 4, seed=32, dtype=torch.float32), sets(9, 4, seed=33, dtype=torch.float32)
    c = cosine_block(*normalised_sets(img, txt, paired=False))
    with torch.no_grad():
        assert torch.equal(set_similarity(img, txt, "mil"), c.amax((-2, -1)))


def test_empty_batches():
    with torch.no_grad():
        assert set_similarity(sets(0, 4), sets(3, 4)).shape == (0, 3)
        assert set_similarity(sets(2, 4), sets(0, 4), "topk").shape == (2, 0)


def test_gallery_refuses_what_it_cannot_score():
    with pytest.raises(MaxMatchError, match="float32 or float64"):
        text_gallery(sets(3, 4, dtype=torch.float16))
    gallery = text_gallery(sets(3, 4, d=8))
    with pytest.raises(MaxMatchError, match="do not fit the gallery"):
        gallery_similarity(sets(2, 4, d=6), gallery)
    with pytest.raises(MaxMatchError, match="unknown similarity"):
        gallery_similarity(sets(2, 4, d=8), gallery, "maxmatchh")
