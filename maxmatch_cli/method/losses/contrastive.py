"""InfoNCE over set similarities (the CON term of paper eq. 5)."""

from __future__ import annotations

import torch
from torch import Tensor

from maxmatch_cli.method import miners, reducers


def _info_nce_per_query(q: miners.Queries, temperature: float) -> Tensor:
    logits = q.scores / temperature
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.masked_fill(miners.other_positives(q), float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits[rows, q.pos_index]


def contrastive_loss(
    sims: Tensor,
    positives: Tensor | None = None,
    temperature: float = 0.05,
    *,
    direction: str = "both",
    pos_index: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE over set similarities (the CON term of eq. 5).

    Per query: ``-log(exp(S(q,p)/T) / (exp(S(q,p)/T) + sum_n exp(S(q,n)/T)))``; the other same-image
    candidates are left out of the denominator, so they are neither pushed away nor counted as positives.
    ``direction="both"`` is the symmetric loss: the mean of the two directions (CLIP's convention), unlike
    :func:`~maxmatch_cli.method.losses.triplet_loss`, which sums them as eq. 6 does.

    Args:
        sims: (Ni, Nt) similarities, image rows x caption columns.
        positives: (Ni, Nt) bool, True for same-image pairs. None: only the designated positives.
        temperature: softmax temperature T (the paper does not state it).
        direction: "i2t", "t2i" or "both"; see :mod:`maxmatch_cli.method.miners`.
        pos_index: designated positive per query along the candidate axis; default the diagonal.
        reduction: "mean", "sum" (over the queries of each direction) or "none".

    Returns:
        Scalar; with reduction "none" the per-query terms, as in
        :func:`~maxmatch_cli.method.losses.triplet_loss`.
    """
    reduce = reducers.reduction(reduction)
    terms = [_info_nce_per_query(q, temperature) for q in miners.queries(sims, positives, direction, pos_index)]
    return reducers.mean_directions(terms, reduce)
