"""MIL (PVSE): a pair of sets is as similar as its most similar pair of elements."""

from __future__ import annotations

import torch

from maxmatch_cli.method.similarity.base import SimilarityKind, entries_first

Tensor = torch.Tensor


def mil_score(c: Tensor) -> Tensor:
    """MIL similarity (PVSE): the largest of the ``K x K'`` cosines.

    Args:
        c: ``(..., K, K')`` cosine matrices.

    Returns:
        ``(...)`` scores.
    """
    return entries_first(c).amax(dim=(0, 1)).reshape(c.shape[:-2])


def mil_slabs(g: Tensor) -> Tensor:
    """No-grad kernel (:mod:`~maxmatch_cli.method.similarity.slabs`): ``(bi, K, K', bt) -> (bi, bt)``, the max
    over the ``K*K'`` slabs (exact: the same cosines, the same max)."""
    return g.flatten(1, 2).amax(1)


KIND = SimilarityKind("mil", "MIL (PVSE): the largest element-to-element cosine", mil_score, slab_score=mil_slabs)
