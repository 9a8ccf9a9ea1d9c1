"""Smooth-Chamfer (paper eq. 1, SetDiv): a log-sum-exp soft maximum over each row and each column."""

from __future__ import annotations

import torch

from maxmatch_cli.method.similarity.base import SimilarityKind, entries_first, positive_float

Tensor = torch.Tensor


def chamfer_score(c: Tensor, alpha: float = 16.0) -> Tensor:
    """Smooth-Chamfer similarity (eq. 1, SetDiv) with a stable log-sum-exp.

    ``S = 1/(2 alpha K) sum_k log sum_l e^(alpha c_kl) + 1/(2 alpha K') sum_l log sum_k e^(alpha c_kl)``.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        alpha: inverse temperature (> 0); large values approach the mean of row and column maxima.

    Returns:
        ``(...)`` scores.
    """
    x = entries_first(c) * alpha
    # Stable log-sum-exp with the max detached: the gradient of log sum exp(x - m) + m is the softmax for any m.
    row_max = x.detach().amax(1, keepdim=True)
    col_max = x.detach().amax(0, keepdim=True)
    rows = (x - row_max).exp().sum(1).log().add(row_max.squeeze(1)).mean(0)
    cols = (x - col_max).exp().sum(0).log().add(col_max.squeeze(0)).mean(0)
    return ((rows + cols) / (2.0 * alpha)).reshape(c.shape[:-2])


KIND = SimilarityKind(
    "chamfer", "smooth-Chamfer (eq. 1, SetDiv): log-sum-exp with temperature alpha",
    chamfer_score, defaults={"alpha": 16.0}, checks={"alpha": positive_float},
)
