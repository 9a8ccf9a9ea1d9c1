"""Sinkhorn (an extension beyond the paper): entropic optimal transport as a soft, differentiable MaxMatch."""

from __future__ import annotations

import math

import torch

from maxmatch_cli.method.similarity.base import SimilarityKind, entries_first, positive_float, positive_int

Tensor = torch.Tensor


def sinkhorn_score(c: Tensor, tau: float = 0.05, iters: int = 10) -> Tensor:
    """Differentiable soft assignment by entropic optimal transport (an extension beyond the paper).

    ``P = argmax_P <P, c> + tau H(P)`` over plans with uniform marginals (rows ``1/K``, columns ``1/K'``),
    approximated by ``iters`` log-domain Sinkhorn iterations (the last one fits the columns exactly). The score is
    ``sum_kl P_kl (exp(c_kl) - 1)``, i.e. ``(1/K) sum_kl Q_kl (exp(c_kl) - 1)`` with ``Q = K P`` doubly
    stochastic for ``K = K'``. For a permutation plan this is exactly the MaxMatch score, and as ``tau -> 0``
    (with enough iterations) ``P`` tends to the optimal matching, so the score tends to MaxMatch. Unlike MaxMatch,
    every entry receives gradient, through the unrolled iterations.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        tau: entropy temperature (> 0); smaller is sharper and needs more iterations.
        iters: Sinkhorn iterations (>= 1).

    Returns:
        ``(...)`` scores.
    """
    rows, cols = c.shape[-2], c.shape[-1]
    x = entries_first(c)
    logits = x / tau
    log_a, log_b = -math.log(rows), -math.log(cols)
    g = torch.zeros(1, cols, x.shape[-1], dtype=c.dtype, device=c.device)
    for _ in range(iters):
        f = log_a - torch.logsumexp(logits + g, dim=1, keepdim=True)
        g = log_b - torch.logsumexp(logits + f, dim=0, keepdim=True)
    plan = torch.exp(logits + f + g)
    return (plan * torch.expm1(x)).sum(dim=(0, 1)).reshape(c.shape[:-2])


KIND = SimilarityKind(
    "sinkhorn", "entropic-OT soft matching (extension; tends to maxmatch as tau -> 0)",
    sinkhorn_score, defaults={"tau": 0.05, "iters": 10}, checks={"tau": positive_float, "iters": positive_int},
)
