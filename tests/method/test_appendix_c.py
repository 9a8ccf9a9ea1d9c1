"""Paper Appendix C as a test: smooth-Chamfer pulls a set's elements together, MaxMatch does not.

What the tests measure. Training raises the similarity of a positive pair, so we take gradient-*ascent* steps
on ``set_similarity(S1, S2)`` with respect to S1 and watch the spread of S1, its circular variance
``1 - ||mean of the unit elements||^2``, which for unit vectors equals ``(1/K) sum_i ||x_i - mean||^2``: the
mean squared distance to the set's mean. 0 is a collapsed set.

Why the statements follow from the math. ``set_similarity`` compares unit vectors, ``c(x, y) = x^T y / |x||y|``,
so the gradient on an element is tangent to the sphere. By eq. 13, smooth-Chamfer sends element x_i a
softmax-weighted mix of pulls towards *every* element of S2 (weights ``softmax_y(alpha c(x_i, y)) > 0`` from
the first term and ``softmax_x(alpha c(x, y))`` from the second). MaxMatch (eq. 2-4) sends x_i one pull,
``exp(c) / K`` times the tangent part of its matched partner y_pi(i), and nothing towards the others.

* Aligned pair (S2 = S1, where training drives a positive pair): the tangent part of x_i's own partner is
  zero, so the MaxMatch gradient vanishes (a stationary point with the spread intact). For Chamfer, with m the
  mean of the unit elements, c_ij = x_i^T x_j and W_ij = W_ji > 0 the two softmax weights of the pair summed,
  a step of size eta changes the spread by ``-(eta / K^2) sum_i (m^T x_i) sum_j W_ij (1 - c_ij)`` to first
  order: negative for any alpha whenever every element lies within 90 degrees of m (asserted below). At
  alpha = 16 the cross weights are ``exp(-16 (1 - c_ij))``, so the effect per step is small on a spread set but
  never zero; iterated (both sets trained, as both towers are), it keeps shrinking the set while MaxMatch keeps
  its spread; at small alpha the set collapses completely.
* Partners further out (y_i = x_i pushed away from the set's mean; checked numerically for these inputs):
  MaxMatch follows the distinct partners and the spread grows. At small alpha the Chamfer softmax is nearly
  uniform, every x_i gets nearly the same pull towards the middle of S2, and the spread shrinks. At alpha = 16
  with well separated partners the softmax is nearly one-hot, smooth-Chamfer acts as a nearest-neighbour
  matching and the spread grows too: the collapse at large alpha comes from the cross pulls that win once a
  pair is aligned (first case), not from every configuration. The test states this boundary rather than hiding it.

A remark on the appendix's Jensen argument (eq. 10-12): it shows that a convex, permutation-symmetric
function of S1 is smallest at the collapsed set with the same mean, whereas training maximises a positive
pair's similarity; and with an affine c, MaxMatch's ``max_pi sum_k exp(c(x_k, y_pi(k)))`` is convex and
symmetric as well, so that inequality alone does not separate the two similarities. The gradient structure
of eq. 13 does, and that is what these tests check.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.evaluation.collapse import circular_variance
from maxmatch_cli.method.similarity import set_similarity

K, D = 4, 8
SEEDS = [0, 1, 2, 3, 4]
CHAMFER_ALPHAS = [16.0, 1.0]


def diverse_set(seed: int, spread: float = 0.5) -> torch.Tensor:
    """K distinct unit vectors scattered around a random centre (circular variance about 0.2-0.6), float64."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    return F.normalize(centre + spread * torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)


def similarity(s1: torch.Tensor, s2: torch.Tensor, kind: str, alpha: float | None) -> torch.Tensor:
    options = {} if alpha is None else {"alpha": alpha}
    return set_similarity(s1.unsqueeze(0), s2.unsqueeze(0), kind=kind, **options)[0, 0]


def ascent_step(s1: torch.Tensor, s2: torch.Tensor, kind: str, alpha: float | None, lr: float = 0.05):
    """One gradient-ascent step on the similarity w.r.t. S1 (S2 fixed); returns (new S1, gradient)."""
    s1 = s1.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(similarity(s1, s2, kind, alpha), s1)
    return (s1 + lr * grad).detach(), grad


def spread(s: torch.Tensor) -> float:
    return float(circular_variance(s.unsqueeze(0))[0])


def is_identity_matching(s1: torch.Tensor, s2: torch.Tensor) -> bool:
    """True when the identity is the unique best one-to-one matching (each x_i has partner y_i)."""
    c = s1 @ s2.t()
    scores = {p: float(sum(c[i, j] for i, j in enumerate(p))) for p in itertools.permutations(range(K))}
    best = max(scores.values())
    return scores[tuple(range(K))] == best and sum(v > best - 1e-9 for v in scores.values()) == 1


def test_circular_variance_is_the_mean_squared_distance_to_the_mean():
    s = diverse_set(0)
    assert spread(s) == pytest.approx(float((s - s.mean(0)).pow(2).sum(-1).mean()), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_aligned_pair_maxmatch_is_stationary_and_chamfer_contracts(seed):
    s1 = diverse_set(seed)
    s2 = s1.clone()
    assert is_identity_matching(s1, s2)
    assert bool((s1 @ s1.mean(0) > 0).all())  # the condition of the first-order argument

    moved, grad = ascent_step(s1, s2, "maxmatch", None)
    assert float(grad.abs().max()) < 1e-12  # each element already sits on its partner
    assert spread(moved) == pytest.approx(spread(s1), abs=1e-12)

    for alpha in CHAMFER_ALPHAS:
        moved, grad = ascent_step(s1, s2, "chamfer", alpha)
        # Eq. 13 for both terms: x_i is pulled towards every x_j with weight W_ij / (2K) > 0.
        c = s1 @ s1.t()
        rows = torch.softmax(alpha * c, dim=1)
        weights = rows + rows.t()
        pulls = s1.unsqueeze(0) - c.unsqueeze(-1) * s1.unsqueeze(1)  # [i, j] = x_j - c_ij x_i (tangent at x_i)
        torch.testing.assert_close(grad, (weights.unsqueeze(-1) * pulls).sum(1) / (2 * K), rtol=1e-9, atol=1e-12)
        assert spread(moved) < spread(s1) - 1e-8, f"alpha={alpha}: spread did not shrink"


@pytest.mark.parametrize("seed", SEEDS)
def test_partners_further_out(seed):
    s1 = diverse_set(seed)
    s2 = F.normalize(s1 + 0.3 * (s1 - s1.mean(0)), dim=-1)  # y_i: x_i pushed away from the mean
    assert spread(s2) > spread(s1)
    assert is_identity_matching(s1, s2)
    before = spread(s1)

    assert spread(ascent_step(s1, s2, "maxmatch", None)[0]) > before + 1e-4  # follows distinct partners
    assert spread(ascent_step(s1, s2, "chamfer", 1.0)[0]) < before - 1e-4  # near-uniform softmax: to the middle
    # alpha = 16 with separated partners: nearly one-hot softmax, close to nearest-neighbour matching.
    assert spread(ascent_step(s1, s2, "chamfer", 16.0)[0]) > before


def _train_pair(s: torch.Tensor, kind: str, alpha: float | None, steps: int = 150, lr: float = 0.5):
    """Ascent on both sets of a nearly aligned positive pair (both towers train), renormalising each step."""
    g = torch.Generator().manual_seed(99)
    a = s.clone()
    b = F.normalize(s + 1e-3 * torch.randn(s.shape, generator=g, dtype=s.dtype), dim=-1)
    for _ in range(steps):
        a.requires_grad_(True)
        b.requires_grad_(True)
        ga, gb = torch.autograd.grad(similarity(a, b, kind, alpha), (a, b))
        a = F.normalize(a.detach() + lr * ga, dim=-1)
        b = F.normalize(b.detach() + lr * gb, dim=-1)
    return a, b


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_training_an_aligned_pair_collapses_chamfer_sets_only(seed):
    torch.set_num_threads(1)
    s = diverse_set(seed)
    before = spread(s)
    a, b = _train_pair(s, "maxmatch", None)
    assert float((a - b).abs().max()) < 1e-6  # the pair did align
    assert abs(spread(a) - before) < 1e-3 and abs(spread(b) - before) < 1e-3
    a, b = _train_pair(s, "chamfer", 16.0)
    assert spread(a) < before - 2e-3 and spread(b) < before - 2e-3
    a, b = _train_pair(s, "chamfer", 1.0)
    assert spread(a) < 1e-6 and spread(b) < 1e-6  # all elements identical
