"""Hinge triplet loss over set similarities (paper eq. 6; VSE++): a similarity's scores, a miner, a reducer.

In-batch training uses the square matrix and ``direction="both"``. Under data parallelism each rank mines its
*local* queries against the *gathered global* candidates, so the two directions need two matrices::

    n, off = local_batch, rank * local_batch
    s_i2t = set_similarity(img_local, txt_global)          # (n, N)  local images x global captions
    s_t2i = set_similarity(img_global, txt_local)          # (N, n)  global images x local captions
    same = ids_global[:, None] == ids_global[None, :]      # (N, N)
    local = torch.arange(n) + off
    tri = (triplet_loss(s_i2t, same[off:off + n], direction="i2t", pos_index=local)
           + triplet_loss(s_t2i, same[:, off:off + n], direction="t2i", pos_index=local))

The per-query terms equal the corresponding rows/columns of the single-process computation on the
concatenated batch. :func:`~maxmatch_cli.method.losses.total_loss` does this when given ``sims_t2i``,
``all_image_ids`` and ``offset``.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from maxmatch_cli.method import miners, reducers


def _triplet_per_query(q: miners.Queries, margin: float, mine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    cost = (margin + q.scores - miners.positive_scores(q).unsqueeze(1)).clamp(min=0)
    return mine(cost, miners.not_negative(q))


def triplet_loss(
    sims: Tensor,
    positives: Tensor | None = None,
    margin: float = 0.2,
    hardest: bool = True,
    reduction: str = "sum",
    *,
    direction: str = "both",
    pos_index: Tensor | None = None,
    average_negatives: bool = False,
) -> Tensor:
    """Hinge triplet loss over set similarities (paper eq. 6; VSE++).

    For every query q with designated positive p: ``max_n [margin + S(q, n) - S(q, p)]_+`` over the negatives n
    (``hardest=True``), or over all negatives (``hardest=False``, the warm-up): their sum (VSE++, VSE-infinity's
    warm-up) or, with ``average_negatives``, their mean (with reduction "mean" that is DivE's mean over all
    triplets). Negatives are candidates not marked in ``positives`` and not the designated positive.

    Args:
        sims: (Ni, Nt) similarities, image rows x caption columns.
        positives: (Ni, Nt) bool, True for same-image pairs (never negatives). None: only the designated
            positives are excluded.
        margin: delta_1.
        hardest: hardest negative per query; False sums over all negatives.
        reduction: "sum" (eq. 6), "mean" (over the queries of each direction, then summed over directions) or
            "none".
        direction: "i2t", "t2i" or "both" (eq. 6: the two directions summed); see
            :mod:`maxmatch_cli.method.miners`.
        pos_index: designated positive per query along the candidate axis (see :mod:`maxmatch_cli.method.miners`);
            default the diagonal.
        average_negatives: with ``hardest=False``, average the hinge over each query's negatives instead of
            summing it.

    Returns:
        Scalar; with reduction "none" the per-query terms, (Ni,) for "i2t", (Nt,) for "t2i", and (2, N)
        (row 0 image queries, row 1 caption queries) for "both".
    """
    reduce = reducers.reduction(reduction)
    mine = miners.negative_miner(hardest, average_negatives)
    terms = [_triplet_per_query(q, margin, mine) for q in miners.queries(sims, positives, direction, pos_index)]
    return reducers.sum_directions(terms, reduce)
