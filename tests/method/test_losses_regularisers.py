"""Set regularisers (losses/global_discriminative.py, intra_set_divergence.py, diversity.py, mmd.py) against
brute-force Python loops on tiny seeded tensors, forward and backward."""

from __future__ import annotations

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses import (
    diversity_loss,
    global_discriminative_loss,
    intra_set_divergence_loss,
    mmd_loss,
)


def _cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


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
