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
    n_entries = c.shape[-2] * c.shape[-1]
    k = min(c.shape[-2], c.shape[-1]) if k is None else k
    if not 1 <= k <= n_entries:
        raise MaxMatchError(
            f"topk similarity: k={k} is outside 1..{n_entries} (K x K' entries of each pair)",
            hint=f"pass k between 1 and {n_entries}, or leave it unset for k = min(K, K')",
        )
    top = c.flatten(-2).topk(k, dim=-1, sorted=False).values
    return torch.expm1(top).mean(-1)


KIND = SimilarityKind(
    "topk", "top-k inference variant: mean of exp(c)-1 over the k largest cosines, no matching",
    topk_score, defaults={"k": None}, checks={"k": optional_positive_int},
)
