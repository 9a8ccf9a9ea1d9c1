"""Smooth-Chamfer (paper eq. 1, SetDiv): a log-sum-exp soft maximum over each row and each column."""

from __future__ import annotations

import math

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


def chamfer_slabs(g: Tensor, alpha: float = 16.0) -> Tensor | None:
    """No-grad kernel (:mod:`~maxmatch_cli.method.similarity.slabs`): eq. 1 on ``g: (bi, K, K', bt)`` of unit-norm
    cosines, overwriting ``g``; ``(bi, bt)``, or ``None`` when ``alpha`` is too large for the unshifted form.

    Cosines lie in ``[-1, 1]``, so ``exp(alpha * c)`` needs no max shift while ``K * e^alpha`` and ``e^-alpha``
    stay within the dtype's normal range: one exp over the block, then sums over slabs and a log per row and
    column.
    """
    k_img, k_txt = g.shape[1:3]
    if alpha + math.log(max(k_img, k_txt)) + 1.0 >= -math.log(torch.finfo(g.dtype).tiny):
        return None
    x = g.mul_(alpha).exp_()
    rows = x.sum(2).log_().sum(1)  # (bi, K, bt) row sums -> their logs summed over k
    cols = x.sum(1).log_().sum(1)
    return rows.div_(k_img).add_(cols, alpha=1.0 / k_txt).div_(2.0 * alpha)


KIND = SimilarityKind(
    "chamfer", "smooth-Chamfer (eq. 1, SetDiv): log-sum-exp with temperature alpha",
    chamfer_score, defaults={"alpha": 16.0}, checks={"alpha": positive_float}, slab_score=chamfer_slabs,
)
