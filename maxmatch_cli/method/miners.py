"""Which candidates a ranking query sees as its positive and as its negatives.

Conventions shared by the ranking losses (:func:`~maxmatch_cli.method.losses.triplet_loss`,
:func:`~maxmatch_cli.method.losses.contrastive_loss`):

* ``sims`` is always laid out **image rows x caption columns**, whatever the direction being trained.
* ``positives`` (same shape, bool) marks every (image, caption) pair that shows the same underlying image
  (:func:`same_image_mask`). Batches iterate over captions, so one image can occupy several rows; its other
  captions are positives of each of those rows and must never be used as negatives.
* Each query has one *designated* positive, named by ``pos_index`` along the query's candidate axis:

  - ``"i2t"``: queries are the rows (Ni); ``pos_index`` (Ni,) gives the column of row i's caption.
  - ``"t2i"``: queries are the columns (Nt); ``pos_index`` (Nt,) gives the row of column j's image.
  - ``"both"``: square matrix only; ``pos_index`` (N,) is a permutation, row i <-> column p[i]; the i2t and
    t2i terms are both computed.

  ``pos_index`` defaults to ``arange`` (the diagonal).

:func:`queries` turns ``sims`` into one :class:`Queries` view per direction (rows are queries). The masks
(:func:`not_negative`, :func:`other_positives`) keep same-image candidates out of every negative pool, and the
negative miners (:data:`NEGATIVE_MINERS`) pool a query's hinge costs over the negatives it sees: the hardest
one, or all of them (summed, or averaged for the warm-up).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError


class Queries(NamedTuple):
    """One direction's ranking problem, queries as rows."""

    scores: Tensor
    """(Nq, Nc) similarity of each query to each candidate."""
    pos_index: Tensor
    """(Nq,) long, the designated positive candidate of each query."""
    positives: Tensor | None
    """(Nq, Nc) bool, every same-image candidate, or None (only the designated positives)."""


def same_image_mask(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Positives mask from image ids.

    Args:
        row_ids: (Ni,) image id of each similarity row.
        col_ids: (Nt,) image id of the image each caption column describes.

    Returns:
        (Ni, Nt) bool, True where row and column show the same image.
    """
    return row_ids.reshape(-1, 1) == col_ids.reshape(1, -1)


# ----------------------------------------------------------------------------------------- directions


def _check_ranking_inputs(sims: Tensor, positives: Tensor | None) -> None:
    if sims.dim() != 2:
        raise MaxMatchError(
            f"similarity matrix must be 2-D (images x captions), got shape {tuple(sims.shape)}",
            "pass set_similarity(img, txt) of shape (Ni, Nt)",
        )
    if positives is not None and (positives.shape != sims.shape or positives.dtype != torch.bool):
        raise MaxMatchError(
            f"positives must be a bool tensor of shape {tuple(sims.shape)}, "
            f"got {positives.dtype} {tuple(positives.shape)}",
            "build it with same_image_mask(row_ids, col_ids)",
        )


def _index_or_arange(pos_index: Tensor | None, n_queries: int, n_candidates: int, device) -> Tensor:
    if pos_index is None:
        if n_candidates < n_queries:
            raise MaxMatchError(
                f"{n_queries} queries but only {n_candidates} candidates: the default diagonal positives need "
                "at least as many candidates as queries",
                "pass pos_index naming each query's positive (e.g. torch.arange(n) + rank * n)",
            )
        return torch.arange(n_queries, device=device)
    pos_index = pos_index.to(device=device, dtype=torch.long).reshape(-1)
    if pos_index.numel() != n_queries:
        raise MaxMatchError(
            f"pos_index has {pos_index.numel()} entries for {n_queries} queries",
            "give one positive index per query (rows for i2t, columns for t2i)",
        )
    return pos_index


def _i2t(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[Queries]:
    idx = _index_or_arange(pos_index, sims.shape[0], sims.shape[1], sims.device)
    return [Queries(sims, idx, positives)]


def _t2i(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[Queries]:
    idx = _index_or_arange(pos_index, sims.shape[1], sims.shape[0], sims.device)
    return [Queries(sims.t(), idx, None if positives is None else positives.t())]


def _both(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[Queries]:
    n, m = sims.shape
    if n != m:
        raise MaxMatchError(
            f"direction='both' needs a square in-batch matrix, got {n} x {m}",
            "for local-vs-global matrices call direction='i2t' and direction='t2i' separately",
        )
    row_to_col = _index_or_arange(pos_index, n, m, sims.device)
    if pos_index is not None and not bool((torch.bincount(row_to_col, minlength=n) == 1).all()):
        raise MaxMatchError(
            "direction='both' needs pos_index to be a permutation (each caption the positive of one row)",
            "duplicate images get their own rows; mark their extra captions in `positives` instead",
        )
    col_to_row = torch.empty_like(row_to_col)
    col_to_row[row_to_col] = torch.arange(n, device=sims.device)
    return _i2t(sims, positives, row_to_col) + _t2i(sims, positives, col_to_row)


#: Ranking directions by name: ``(sims, positives, pos_index) -> [Queries per direction]``.
DIRECTIONS: dict[str, Callable[[Tensor, Tensor | None, Tensor | None], list[Queries]]] = {
    "i2t": _i2t,
    "t2i": _t2i,
    "both": _both,
}


def queries(sims: Tensor, positives: Tensor | None, direction: str, pos_index: Tensor | None) -> list[Queries]:
    """The ranking problems of ``direction`` (see the module docstring for the arguments).

    Returns:
        One :class:`Queries` for "i2t" or "t2i", two (image queries, then caption queries) for "both".

    Raises:
        MaxMatchError: malformed ``sims``/``positives``/``pos_index``, or an unknown direction.
    """
    _check_ranking_inputs(sims, positives)
    if direction not in DIRECTIONS:
        raise MaxMatchError(f"unknown direction {direction!r}", f"choose one of: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[direction](sims, positives, pos_index)


# ----------------------------------------------------------------------------------------- masks


def positive_scores(q: Queries) -> Tensor:
    """(Nq,) each query's score for its designated positive."""
    rows = torch.arange(q.scores.shape[0], device=q.scores.device)
    return q.scores[rows, q.pos_index]


def not_negative(q: Queries) -> Tensor:
    """(Nq, Nc) bool: the designated positive plus every other same-image candidate."""
    rows = torch.arange(q.scores.shape[0], device=q.scores.device)
    mask = torch.zeros_like(q.scores, dtype=torch.bool)
    mask[rows, q.pos_index] = True
    return mask if q.positives is None else mask | q.positives


def other_positives(q: Queries) -> Tensor:
    """(Nq, Nc) bool: same-image candidates other than the designated positive (neither positive nor negative)."""
    others = not_negative(q)
    rows = torch.arange(others.shape[0], device=others.device)
    others[rows, q.pos_index] = False
    return others


# ----------------------------------------------------------------------------------------- negative miners
# A miner pools a query's hinge costs (Nq, Nc) over the candidates that are negatives. Hinge costs are >= 0, so
# zeroing the non-negatives leaves the max/sum over negatives only; a query with no negative at all gets 0.


def hardest_negative(cost: Tensor, excluded: Tensor) -> Tensor:
    """(Nq,) the largest cost over each query's negatives (VSE++'s hardest negative).

    Args:
        cost: (Nq, Nc) hinge costs, >= 0.
        excluded: (Nq, Nc) bool, candidates that are not negatives (:func:`not_negative`).
    """
    return cost.masked_fill(excluded, 0.0).max(dim=1).values


def all_negatives(cost: Tensor, excluded: Tensor) -> Tensor:
    """(Nq,) the summed cost over each query's negatives (VSE++ / VSE-infinity warm-up); arguments as above."""
    return cost.masked_fill(excluded, 0.0).sum(dim=1)


def mean_negative(cost: Tensor, excluded: Tensor) -> Tensor:
    """(Nq,) the mean cost over each query's negatives (DivE's warm-up); arguments as above."""
    return cost.masked_fill(excluded, 0.0).sum(dim=1) / (~excluded).sum(dim=1).clamp_min(1)


#: Negative miners by name: ``(cost, excluded) -> (Nq,)``.
NEGATIVE_MINERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hardest": hardest_negative,
    "all": all_negatives,
    "mean": mean_negative,
}


def negative_miner(hardest: bool, average: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """The miner for the loss options: the hardest negative, else all negatives, averaged when ``average``."""
    return NEGATIVE_MINERS["hardest" if hardest else "mean" if average else "all"]
