"""Set similarities (similarity/<member>.py, batched.py) against brute-force Python loops: forward, gradients,
blocking, scale, input errors. The table and option checks: test_similarity_registry.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity import (
    chamfer_score,
    cosine_matrices,
    maxmatch_assignment,
    maxmatch_score,
    paired_similarity,
    set_similarity,
    sinkhorn_score,
)

KINDS = ["maxmatch", "chamfer", "mil", "topk", "sinkhorn"]


def sets(n: int, k: int, d: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, d, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------- references


def ref_cosines(x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """K x K' cosines of one pair, entry by entry (differentiable torch scalars)."""
    return [[torch.dot(a, b) / (a.norm() * b.norm()) for b in y] for a in x]


def ref_maxmatch(c, perm=None):
    k, kp = len(c), len(c[0])
    if perm is None:  # best injective map of the smaller side, by brute force
        if k <= kp:
            candidates = [list(zip(range(k), p)) for p in itertools.permutations(range(kp), k)]
        else:
            candidates = [list(zip(p, range(kp))) for p in itertools.permutations(range(k), kp)]
        perm = max(candidates, key=lambda pairs: sum(c[r][col].item() for r, col in pairs))
    return sum(torch.expm1(c[r][col]) for r, col in perm) / len(perm), perm


def ref_chamfer(c, alpha=16.0):
    k, kp = len(c), len(c[0])
    rows = sum(torch.log(sum(torch.exp(alpha * c[r][l]) for l in range(kp))) for r in range(k)) / k
    cols = sum(torch.log(sum(torch.exp(alpha * c[r][l]) for r in range(k))) for l in range(kp)) / kp
    return (rows + cols) / (2 * alpha)


def ref_mil(c):
    return max((v for row in c for v in row), key=torch.Tensor.item)


def ref_topk(c, k=None):
    entries = sorted((v for row in c for v in row), key=torch.Tensor.item, reverse=True)
    k = min(len(c), len(c[0])) if k is None else k
    return sum(torch.expm1(v) for v in entries[:k]) / k


def ref_sinkhorn(c, tau=0.05, iters=10):
    k, kp = len(c), len(c[0])
    g = [0.0] * kp
    for _ in range(iters):
        f = [-math.log(k) - torch.logsumexp(torch.stack([c[r][l] / tau + g[l] for l in range(kp)]), 0)
             for r in range(k)]
        g = [-math.log(kp) - torch.logsumexp(torch.stack([c[r][l] / tau + f[r] for r in range(k)]), 0)
             for l in range(kp)]
    return sum(torch.exp(c[r][l] / tau + f[r] + g[l]) * torch.expm1(c[r][l]) for r in range(k) for l in range(kp))


REFERENCES = {
    "maxmatch": lambda c, **o: ref_maxmatch(c)[0],
    "chamfer": ref_chamfer,
    "mil": lambda c, **o: ref_mil(c),
    "topk": ref_topk,
    "sinkhorn": ref_sinkhorn,
}


def ref_set_similarity(img, txt, kind, **options):
    return torch.stack([torch.stack([REFERENCES[kind](ref_cosines(x, y), **options) for y in txt]) for x in img])


# ----------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_img,k_txt", [(3, 3), (1, 1), (2, 3), (3, 2)])
def test_forward_matches_brute_force(kind, k_img, k_txt):
    img, txt = sets(3, k_img, seed=1), sets(4, k_txt, seed=2)
    got = set_similarity(img, txt, kind)
    torch.testing.assert_close(got, ref_set_similarity(img, txt, kind), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,options", [("chamfer", {"alpha": 3.0}), ("topk", {"k": 5}), ("topk", {"k": 1}),
                                          ("sinkhorn", {"tau": 0.3, "iters": 4})])
def test_forward_with_options(kind, options):
    img, txt = sets(2, 3, seed=3), sets(3, 3, seed=4)
    torch.testing.assert_close(set_similarity(img, txt, kind, **options),
                               ref_set_similarity(img, txt, kind, **options), rtol=1e-10, atol=1e-10)


def test_maxmatch_k4_float32_and_large_k():
    img, txt = sets(3, 4, d=16, seed=5, dtype=torch.float32), sets(4, 4, d=16, seed=6, dtype=torch.float32)
    torch.testing.assert_close(set_similarity(img, txt), ref_set_similarity(img.double(), txt.double(),
                                                                            "maxmatch").float())
    img, txt = sets(2, 7, d=8, seed=7), sets(2, 7, d=8, seed=8)  # K = 7: compiled-solver path
    torch.testing.assert_close(set_similarity(img, txt), ref_set_similarity(img, txt, "maxmatch"))


def test_mil_and_topk_relations():
    img, txt = sets(3, 4, seed=9), sets(5, 4, seed=10)
    c = cosine_matrices(img, txt)
    assert c.shape == (3, 5, 4, 4)
    torch.testing.assert_close(set_similarity(img, txt, "mil"), c.amax((-2, -1)))
    torch.testing.assert_close(set_similarity(img, txt, "topk", k=1), torch.expm1(c.amax((-2, -1))))
    # one-to-one matching can only lose against the unconstrained top-K entries
    assert (set_similarity(img, txt, "maxmatch") <= set_similarity(img, txt, "topk") + 1e-12).all()


def test_sinkhorn_tends_to_maxmatch():
    # text sets = shuffled, noisy copies of the image sets: every pair has a clear best matching
    img = sets(3, 4, seed=11)
    txt = img[:, torch.randperm(4, generator=torch.Generator().manual_seed(0))] + 0.3 * sets(3, 4, seed=12)
    exact = paired_similarity(img, txt, "maxmatch")
    errors = [(paired_similarity(img, txt, "sinkhorn", tau=tau, iters=300) - exact).abs().max()
              for tau in (0.5, 0.05, 0.005)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-2  # soft, and sharper as tau falls
    assert errors[2] < 1e-6


def test_chamfer_is_stable_for_large_alpha():
    img, txt = sets(2, 3, seed=13, dtype=torch.float32), sets(2, 3, seed=14, dtype=torch.float32)
    s = set_similarity(img, txt, "chamfer", alpha=1e4)
    assert torch.isfinite(s).all()
    c = cosine_matrices(img, txt)
    torch.testing.assert_close(s, (c.amax(-1).mean(-1) + c.amax(-2).mean(-1)) / 2, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind,options", [("chamfer", {"alpha": 4.0}), ("mil", {}), ("topk", {}),
                                          ("topk", {"k": 3}), ("sinkhorn", {"tau": 0.2, "iters": 5}),
                                          ("maxmatch", {})])
def test_gradcheck(kind, options):
    img = sets(2, 3, d=4, seed=15).requires_grad_()
    txt = sets(3, 2, d=4, seed=16).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: set_similarity(a, b, kind, **options), (img, txt))
    assert torch.autograd.gradcheck(lambda a, b: paired_similarity(a, b[:2], kind, **options), (img, txt))


@pytest.mark.parametrize("k_img,k_txt,solver", [(4, 4, "auto"), (3, 4, "auto"), (4, 3, "auto"), (7, 7, "auto"),
                                                (4, 4, "scipy")])
def test_maxmatch_gradient_equals_brute_force_with_same_assignment(k_img, k_txt, solver):
    img, txt = sets(3, k_img, seed=17).requires_grad_(), sets(2, k_txt, seed=18).requires_grad_()
    weights = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    (set_similarity(img, txt, "maxmatch", solver=solver) * weights).sum().backward()
    got = img.grad.clone(), txt.grad.clone()
    img.grad = txt.grad = None
    (ref_set_similarity(img, txt, "maxmatch") * weights).sum().backward()
    torch.testing.assert_close(got, (img.grad, txt.grad), rtol=1e-10, atol=1e-12)


def test_maxmatch_score_gradient_on_expanded_input():
    base = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    maxmatch_score(base.expand(3, 4, 4)).sum().backward()
    expanded_grad = base.grad.clone()
    base.grad = None
    maxmatch_score(base).sum().backward()
    torch.testing.assert_close(expanded_grad, 3 * base.grad)


def test_maxmatch_gradient_only_on_matched_entries():
    c = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    maxmatch_score(c).sum().backward()
    assert ((c.grad != 0).sum((-2, -1)) == 3).all()
    perm = c.grad.ne(0).float().argmax(-1)
    assert torch.equal(perm.sort(-1).values, torch.arange(3).expand(5, 3))


# ----------------------------------------------------------------------------------------- blocking, scale, pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [1, 2, 3, 64])
def test_blockwise_equals_unblocked(kind, block_size):
    img = sets(5, 3, seed=20, dtype=torch.float32).requires_grad_()
    txt = sets(7, 3, seed=21, dtype=torch.float32).requires_grad_()
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(22))
    whole = set_similarity(img, txt, kind)
    (whole * weights).sum().backward()
    grads = img.grad.clone(), txt.grad.clone()
    img.grad = txt.grad = None
    blocked = set_similarity(img, txt, kind, block_size=block_size)
    (blocked * weights).sum().backward()
    torch.testing.assert_close(blocked, whole)
    torch.testing.assert_close((img.grad, txt.grad), grads)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_invariance(kind):
    img, txt = sets(3, 4, seed=23), sets(4, 4, seed=24)
    g = torch.Generator().manual_seed(25)
    scaled_img = img * (0.01 + 50 * torch.rand(3, 4, 1, generator=g, dtype=torch.float64))
    torch.testing.assert_close(set_similarity(scaled_img, txt * 1e3, kind), set_similarity(img, txt, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_paired_equals_diagonal(kind):
    img, txt = sets(6, 4, seed=26, dtype=torch.float32), sets(6, 4, seed=27, dtype=torch.float32)
    full = set_similarity(img, txt, kind)
    torch.testing.assert_close(paired_similarity(img, txt, kind), full.diagonal())
    torch.testing.assert_close(paired_similarity(img, txt, kind, block_size=4), full.diagonal())


def test_no_grad_path_matches():
    img, txt = sets(4, 4, seed=28).requires_grad_(), sets(5, 4, seed=29)
    with_grad = set_similarity(img, txt)
    with torch.no_grad():
        torch.testing.assert_close(set_similarity(img, txt), with_grad.detach())


def test_maxmatch_assignment():
    img, txt = sets(3, 4, seed=30), sets(2, 4, seed=31)
    perm = maxmatch_assignment(img, txt, block_size=2)
    assert perm.shape == (3, 2, 4)
    for i, j in itertools.product(range(3), range(2)):
        c = ref_cosines(img[i], txt[j])
        _, best = ref_maxmatch(c)
        assert math.isclose(sum(float(c[r][perm[i, j, r]]) for r in range(4)),
                            sum(float(c[r][col]) for r, col in best), rel_tol=1e-12)
    uneven = maxmatch_assignment(sets(2, 4, seed=32), sets(2, 2, seed=33))
    assert ((uneven >= 0).sum(-1) == 2).all() and ((uneven == -1).sum(-1) == 2).all()


def test_score_functions_on_cosines_directly():
    c = torch.tensor([[[0.9, 0.8], [0.85, 0.1]]], dtype=torch.float64)
    torch.testing.assert_close(maxmatch_score(c), (torch.expm1(torch.tensor([0.8, 0.85]))).mean().reshape(1).double())
    torch.testing.assert_close(chamfer_score(c, alpha=1.0), ref_chamfer(c[0], alpha=1.0).reshape(1))
    assert sinkhorn_score(c).shape == (1,)


# ----------------------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("img,txt,match", [
    (torch.randn(2, 3), torch.randn(2, 3, 4), r"img must be a \(B, K, D\) tensor"),
    (torch.randn(2, 3, 4), torch.randn(2, 3, 5), "embedding sizes differ"),
    (torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long), "txt must be floating point"),
    (torch.randn(2, 0, 4), torch.randn(2, 3, 4), "empty set"),
    ([[1.0]], torch.randn(2, 3, 4), "got list"),
])
def test_input_errors(img, txt, match):
    with pytest.raises(MaxMatchError, match=match):
        set_similarity(img, txt)


def test_paired_needs_equal_batches():
    with pytest.raises(MaxMatchError, match="as many images as texts"):
        paired_similarity(torch.randn(2, 3, 4), torch.randn(3, 3, 4))
