"""Top-k (paper §3.4, inference): MaxMatch's scaling over the k largest cosines, without the matching."""

from __future__ import annotations

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity.base import SimilarityKind, optional_positive_int

Tensor = torch.Tensor


def topk_score(c: Tensor, k: int | None = None) -> Tensor:
    """Inference variant (paper §3.4): mean of ``exp(x) - 1`` over the ``k`` largest of the ``K x K'`` entries.

    Unlike MaxMatch, no one-to-one constraint: one element may take part in several of the ``k`` entries.

    Args:
        c: ``(..., K, K')`` cosine matrices.
        k: how many entries, ``1 <= k <= K*K'``; default ``min(K, K')`` (as many as MaxMatch matches).

    Returns:
        ``(...)`` scores.

    Raises:
        MaxMatchError: ``k`` above ``K*K'`` (the option check only knows ``k >= 1``).
    """
    k = _entries(k, c.shape[-2], c.shape[-1])
    top = c.flatten(-2).topk(k, dim=-1, sorted=False).values
    return torch.expm1(top).mean(-1)


#: Largest ``k * K * K'`` the slab kernel's insertion network takes; beyond it torch.topk is cheaper.
SLAB_MAX_WORK = 256


def topk_slabs(g: Tensor, k: int | None = None) -> Tensor | None:
    """No-grad kernel (:mod:`~maxmatch_cli.method.similarity.slabs`): ``(bi, K, K', bt) -> (bi, bt)``.

    The ``k`` largest entries are kept in a sorted list of slabs, each entry inserted with elementwise
    max/min (an insertion network), then ``mean(exp(x) - 1)``; the same values as torch.topk, so the result
    differs from :func:`topk_score` by float rounding only. ``None`` when the network would be too long.
    """
    k_img, k_txt = g.shape[1:3]
    k = _entries(k, k_img, k_txt)
    if k * k_img * k_txt > SLAB_MAX_WORK:
        return None
    tops: list[Tensor] = []
    for entry in range(k_img * k_txt):
        value = g[:, entry // k_txt, entry % k_txt]
        for j, top in enumerate(tops):
            if j == k - 1:  # the smaller one would fall off the list
                tops[j] = torch.maximum(top, value)
                break
            tops[j], value = torch.maximum(top, value), torch.minimum(top, value)
        else:
            tops.append(value)
    total = torch.exp(tops[0]).sub_(1.0)
    for top in tops[1:]:
        total.add_(torch.exp(top).sub_(1.0))
    return total.div_(k)


def _entries(k: int | None, k_img: int, k_txt: int) -> int:
    """``k``, defaulting to ``min(K, K')``; refuses values above ``K*K'``."""
    n_entries = k_img * k_txt
    k = min(k_img, k_txt) if k is None else k
    if not 1 <= k <= n_entries:
        raise MaxMatchError(
            f"topk similarity: k={k} is outside 1..{n_entries} (K x K' entries of each pair)",
            hint=f"pass k between 1 and {n_entries}, or leave it unset for k = min(K, K')",
        )
    return k


KIND = SimilarityKind(
    "topk", "top-k inference variant: mean of exp(c)-1 over the k largest cosines, no matching",
    topk_score, defaults={"k": None}, checks={"k": optional_positive_int}, slab_score=topk_slabs,
)
