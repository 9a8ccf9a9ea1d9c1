"""Training objectives of MaxMatch (paper eq. 5-8) as pure functions of tensors.

Conventions shared by the ranking losses (:func:`triplet_loss`, :func:`contrastive_loss`):

* ``sims`` is always laid out **image rows x caption columns**, whatever the direction being trained.
* ``positives`` (same shape, bool) marks every (image, caption) pair that shows the same underlying image.
  Batches iterate over captions, so one image can occupy several rows; its other captions are positives of
  each of those rows and must never be used as negatives.
* Each query has one *designated* positive, named by ``pos_index`` along the query's candidate axis:

  - ``"i2t"``: queries are the rows (Ni); ``pos_index`` (Ni,) gives the column of row i's caption.
  - ``"t2i"``: queries are the columns (Nt); ``pos_index`` (Nt,) gives the row of column j's image.
  - ``"both"``: square matrix only; ``pos_index`` (N,) is a permutation, row i <-> column p[i]; the i2t and
    t2i terms are both computed.

  ``pos_index`` defaults to ``arange`` (the diagonal).

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
concatenated batch. :func:`total_loss` does this when given ``sims_t2i``, ``all_image_ids`` and ``offset``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError

__all__ = [
    "LOSS_COMPONENTS",
    "LossComponent",
    "LossInputs",
    "LossWeights",
    "contrastive_loss",
    "diversity_loss",
    "global_discriminative_loss",
    "intra_set_divergence_loss",
    "mmd_loss",
    "same_image_mask",
    "set_mmd",
    "total_loss",
    "triplet_loss",
]


# --------------------------------------------------------------------------------------------------------------
# Ranking losses: shared plumbing


class _Queries(NamedTuple):
    scores: Tensor  # (Nq, Nc) rows are queries
    pos_index: Tensor  # (Nq,) designated positive column per query
    positives: Tensor | None  # (Nq, Nc) bool, or None


def same_image_mask(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Positives mask from image ids.

    Args:
        row_ids: (Ni,) image id of each similarity row.
        col_ids: (Nt,) image id of the image each caption column describes.

    Returns:
        (Ni, Nt) bool, True where row and column show the same image.
    """
    return row_ids.reshape(-1, 1) == col_ids.reshape(1, -1)


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


def _i2t(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[_Queries]:
    idx = _index_or_arange(pos_index, sims.shape[0], sims.shape[1], sims.device)
    return [_Queries(sims, idx, positives)]


def _t2i(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[_Queries]:
    idx = _index_or_arange(pos_index, sims.shape[1], sims.shape[0], sims.device)
    return [_Queries(sims.t(), idx, None if positives is None else positives.t())]


def _both(sims: Tensor, positives: Tensor | None, pos_index: Tensor | None) -> list[_Queries]:
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


_DIRECTIONS: dict[str, Callable[[Tensor, Tensor | None, Tensor | None], list[_Queries]]] = {
    "i2t": _i2t,
    "t2i": _t2i,
    "both": _both,
}

_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": torch.sum,
    "mean": torch.mean,
    "none": lambda t: t,
}


def _lookup(table: dict, key: str, what: str):
    try:
        return table[key]
    except KeyError:
        raise MaxMatchError(f"unknown {what} {key!r}", f"choose one of: {', '.join(table)}") from None


def _queries(sims, positives, direction, pos_index) -> list[_Queries]:
    _check_ranking_inputs(sims, positives)
    return _lookup(_DIRECTIONS, direction, "direction")(sims, positives, pos_index)


def _not_negative(q: _Queries) -> Tensor:
    """(Nq, Nc) bool: the designated positive plus every other same-image candidate."""
    rows = torch.arange(q.scores.shape[0], device=q.scores.device)
    mask = torch.zeros_like(q.scores, dtype=torch.bool)
    mask[rows, q.pos_index] = True
    return mask if q.positives is None else mask | q.positives


def _positive_scores(q: _Queries) -> Tensor:
    rows = torch.arange(q.scores.shape[0], device=q.scores.device)
    return q.scores[rows, q.pos_index]


# --------------------------------------------------------------------------------------------------------------
# Triplet (eq. 6) and contrastive


def _triplet_per_query(q: _Queries, margin: float, hardest: bool, mean_negatives: bool = False) -> Tensor:
    cost = (margin + q.scores - _positive_scores(q).unsqueeze(1)).clamp(min=0)
    # Hinge costs are >= 0, so zeroing non-negatives leaves max/sum over negatives only; a query with no
    # negative at all contributes 0.
    excluded = _not_negative(q)
    cost = cost.masked_fill(excluded, 0.0)
    if hardest:
        return cost.max(dim=1).values
    if mean_negatives:
        return cost.sum(dim=1) / (~excluded).sum(dim=1).clamp_min(1)
    return cost.sum(dim=1)  # VSE++'s sum over negatives


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
        direction: "i2t", "t2i" or "both" (eq. 6: the two directions summed); see the module docstring.
        pos_index: designated positive per query along the candidate axis (see module docstring); default
            the diagonal.
        average_negatives: with ``hardest=False``, average the hinge over each query's negatives instead of
            summing it.

    Returns:
        Scalar; with reduction "none" the per-query terms, (Ni,) for "i2t", (Nt,) for "t2i", and (2, N)
        (row 0 image queries, row 1 caption queries) for "both".
    """
    reduce = _lookup(_REDUCTIONS, reduction, "reduction")
    terms = [_triplet_per_query(q, margin, hardest, average_negatives)
             for q in _queries(sims, positives, direction, pos_index)]
    if reduction == "none":
        return terms[0] if len(terms) == 1 else torch.stack(terms)
    return sum(reduce(t) for t in terms)


def _info_nce_per_query(q: _Queries, temperature: float) -> Tensor:
    logits = q.scores / temperature
    others = _not_negative(q)
    rows = torch.arange(logits.shape[0], device=logits.device)
    others[rows, q.pos_index] = False
    logits = logits.masked_fill(others, float("-inf"))
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
    :func:`triplet_loss`, which sums them as eq. 6 does.

    Args:
        sims: (Ni, Nt) similarities, image rows x caption columns.
        positives: (Ni, Nt) bool, True for same-image pairs. None: only the designated positives.
        temperature: softmax temperature T (the paper does not state it).
        direction: "i2t", "t2i" or "both"; see the module docstring.
        pos_index: designated positive per query along the candidate axis; default the diagonal.
        reduction: "mean", "sum" (over the queries of each direction) or "none".

    Returns:
        Scalar; with reduction "none" the per-query terms, as in :func:`triplet_loss`.
    """
    reduce = _lookup(_REDUCTIONS, reduction, "reduction")
    terms = [_info_nce_per_query(q, temperature) for q in _queries(sims, positives, direction, pos_index)]
    if reduction == "none":
        return terms[0] if len(terms) == 1 else torch.stack(terms)
    return sum(reduce(t) for t in terms) / len(terms)


# --------------------------------------------------------------------------------------------------------------
# Set regularisers (eq. 7, 8; SetDiv's MMD and diversity)


def _check_sets(sets: Tensor, name: str) -> None:
    if sets.dim() != 3:
        raise MaxMatchError(f"{name} must have shape (B, K, D), got {tuple(sets.shape)}")


def _upper_pairs(k: int, device) -> Tensor:
    return torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)


def global_discriminative_loss(sets: Tensor, global_: Tensor, margin: float = 0.6, scale: float = 0.5) -> Tensor:
    """Global Discriminative loss for one modality (one half of paper eq. 7).

    ``mean_{b,k} exp(scale * (cos(sets[b, k], global_[b]) - margin))``. The total GD term of eq. 7 is the mean
    of the image and the text terms.

    Args:
        sets: (B, K, D) set elements (any scale; cosines are taken).
        global_: (B, D) global embedding of each sample.
        margin: delta_2.
        scale: s.

    Returns:
        Scalar.
    """
    _check_sets(sets, "sets")
    if global_.shape != (sets.shape[0], sets.shape[2]):
        raise MaxMatchError(f"global_ must have shape {(sets.shape[0], sets.shape[2])}, got {tuple(global_.shape)}")
    cos = torch.einsum("bkd,bd->bk", F.normalize(sets, dim=-1), F.normalize(global_, dim=-1))
    return torch.exp(scale * (cos - margin)).mean()


def intra_set_divergence_loss(sets: Tensor, margin: float = 0.6, scale: float = 0.5) -> Tensor:
    """Intra-Set Divergence loss for one modality (one half of paper eq. 8).

    ``2 / (K (K - 1)) * sum_{j<k} exp(scale * (cos(sets[b, j], sets[b, k]) - margin))``, averaged over the batch.
    Eq. 8 adds the image and the text terms.

    Args:
        sets: (B, K, D) set elements (any scale; cosines are taken), K >= 2.
        margin: delta_3.
        scale: s.

    Returns:
        Scalar.
    """
    _check_sets(sets, "sets")
    if sets.shape[1] < 2:
        raise MaxMatchError("intra-set divergence needs at least 2 elements per set", "set its weight to 0 for K=1")
    unit = F.normalize(sets, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    pairs = cos[:, _upper_pairs(sets.shape[1], sets.device)]  # (B, K(K-1)/2)
    return torch.exp(scale * (pairs - margin)).mean()


def _safe_sqrt(x: Tensor) -> Tensor:
    # d/dx sqrt(x) is infinite at 0; the inner where keeps the unused branch finite so no NaN leaks into the
    # gradient, and the outer one gives distance 0 a zero (sub)gradient.
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _pairwise_distance(a: Tensor, b: Tensor | None) -> Tensor:
    """Euclidean distances (Na, Nb) by one matmul; b=None means a against itself with an exact zero diagonal."""
    other = a if b is None else b
    sq = (a * a).sum(-1, keepdim=True) + (other * other).sum(-1).unsqueeze(0) - 2.0 * a @ other.t()
    sq = sq.clamp(min=0)
    if b is None:
        sq = sq.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), 0.0)
    return _safe_sqrt(sq)


def mmd_loss(x: Tensor, y: Tensor, gamma: float = 0.5) -> Tensor:
    """Biased MMD estimate between two point clouds with SetDiv's kernel ``k(u, v) = exp(-gamma * ||u - v||)``.

    ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``; the gradient at zero distance is zero, never NaN.
    Distances come from one matmul per block (memory O(N M), not O(N M D)); self-distances are exactly zero,
    while cross distances below ~sqrt(machine eps) * ||x|| carry that much rounding error.

    Args:
        x: (N, D) all image set elements of the batch (e.g. ``img_sets.flatten(0, 1)``).
        y: (M, D) all text set elements.
        gamma: kernel rate (SetDiv: 0.5).

    Returns:
        Scalar.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise MaxMatchError(f"mmd_loss needs (N, D) and (M, D) inputs, got {tuple(x.shape)} and {tuple(y.shape)}")

    def kernel_mean(a: Tensor, b: Tensor | None) -> Tensor:
        return torch.exp(-gamma * _pairwise_distance(a, b)).mean()

    return kernel_mean(x, None) + kernel_mean(y, None) - 2.0 * kernel_mean(x, None if y is x else y)


def diversity_loss(slots: Tensor) -> Tensor:
    """PVSE/SetDiv diversity regulariser on the slots before the global is added.

    On L2-normalised slots: ``sum_{i<j} exp(-2 ||s_i - s_j||^2) / (K (K - 1) / 2)``, averaged over the batch.

    Args:
        slots: (B, K, D), K >= 2.

    Returns:
        Scalar.
    """
    _check_sets(slots, "slots")
    if slots.shape[1] < 2:
        raise MaxMatchError("diversity loss needs at least 2 slots per set", "set its weight to 0 for K=1")
    unit = F.normalize(slots, dim=-1)
    # For unit vectors ||a - b||^2 = 2 - 2 cos(a, b).
    sq = (2.0 - 2.0 * (unit @ unit.transpose(1, 2))).clamp(min=0)
    pairs = sq[:, _upper_pairs(slots.shape[1], slots.device)]
    return torch.exp(-2.0 * pairs).mean()


# --------------------------------------------------------------------------------------------------------------
# Eq. 5: the weighted sum, assembled from a name-keyed table


@dataclass(frozen=True)
class LossWeights:
    """The flat keyword arguments of :func:`total_loss`: lambdas of eq. 5 and each term's margin/scale.

    Field names follow ``recipes.LossConfig``. Defaults: paper App. B (Faster R-CNN configurations differ in
    margin and contrastive weight).
    """

    tri_weight: float = 1.0
    """Weight of the triplet loss (eq. 5 fixes it to 1)."""
    gd_weight: float = 0.1
    """lambda_GD, Global Discriminative loss."""
    isd_weight: float = 0.1
    """lambda_ISD, Intra-Set Divergence loss."""
    mmd_weight: float = 0.01
    """lambda_MMD, MMD between image and text set elements."""
    div_weight: float = 0.01
    """lambda_Div, diversity of the pre-global slots."""
    contrastive_weight: float = 0.0
    """lambda_CON, contrastive loss (0.001 for the Faster R-CNN configurations)."""
    margin: float = 0.2
    """delta_1, triplet margin."""
    triplet_reduction: str = "mean"
    """'mean' over each direction's queries, the two directions summed (DivE, VSE-infinity's averaged variant),
    or 'sum' over queries (eq. 6 as printed, VSE++)."""
    hardest: bool = True
    """Hardest negative per query; False takes every negative (warm-up), see ``warmup_negatives``."""
    warmup_negatives: str = "sum"
    """Without hardest negatives: 'sum' the hinge over a query's negatives (VSE++ / VSE-infinity warm-up) or
    'mean' it (DivE tri_mean_to_max)."""
    gd_margin: float = 0.6
    """delta_2."""
    isd_margin: float = 0.6
    """delta_3."""
    scale: float = 0.5
    """s, shared by GD and ISD."""
    mmd_gamma: float = 0.5
    """Rate of the MMD kernel exp(-gamma * ||x - y||) (SetDiv)."""
    contrastive_temperature: float = 0.05
    """Contrastive temperature (not given in the paper)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float | int) and not isinstance(value, bool) and value < 0:
                raise MaxMatchError(f"loss.{f.name} must be >= 0, got {value}")
        if self.triplet_reduction not in ("mean", "sum"):
            raise MaxMatchError(f"loss.triplet_reduction must be 'mean' or 'sum', got {self.triplet_reduction!r}")
        if self.warmup_negatives not in ("mean", "sum"):
            raise MaxMatchError(f"loss.warmup_negatives must be 'mean' or 'sum', got {self.warmup_negatives!r}")
        if self.contrastive_temperature <= 0:
            raise MaxMatchError(f"loss.contrastive_temperature must be > 0, got {self.contrastive_temperature}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LossWeights":
        """Build from keyword arguments; an unknown name is an error naming the closest valid one."""
        names = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise MaxMatchError(
                    f"unknown loss argument {key!r}",
                    f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(names)}",
                )
        return cls(**kwargs)


@dataclass(frozen=True)
class LossInputs:
    """Everything the components of eq. 5 read; built by :func:`total_loss` (see there for shapes)."""

    sims: Tensor
    img_sets: Tensor
    txt_sets: Tensor
    img_global: Tensor
    txt_global: Tensor
    img_slots: Tensor | None
    txt_slots: Tensor | None
    image_ids: Tensor | None
    caption_owner: Tensor | None
    sims_t2i: Tensor | None
    all_image_ids: Tensor | None
    all_caption_ids: Tensor | None
    offset: int
    caption_offset: int | None

    def ranking_calls(self) -> list[dict]:
        """Keyword arguments of the two ranking-loss calls, image queries (i2t) and caption queries (t2i).

        Every caption is one query in each direction. i2t: the caption's image asks for it against every other
        caption of the (global) batch, one row of the i2t matrix per caption, so an image with five captions
        is five queries sharing one hardest negative (DivE/VSE-infinity's image-centric batches). t2i: the
        caption asks for its image against every other image. With one caption per image and distinct images
        this is VSE++'s square-matrix loss.
        """
        n_img, n_cap = self.sims.shape[0], self.txt_sets.shape[0]
        device = self.sims.device
        owner = self.caption_owner
        if owner is None:
            if n_img != n_cap:
                raise MaxMatchError(
                    f"{n_img} images but {n_cap} captions and no caption_owner",
                    "pass caption_owner (the local row of each caption's image)",
                )
            owner = torch.arange(n_cap, device=device)
        owner = owner.to(device=device, dtype=torch.long)
        image_ids = self.image_ids
        if image_ids is None:  # every image row is its own image
            image_ids = torch.arange(n_img, device=device) + self.offset
        caption_ids = image_ids[owner]
        all_image_ids = image_ids if self.all_image_ids is None else self.all_image_ids
        all_caption_ids = self.all_caption_ids
        if all_caption_ids is None:  # one caption per image row (pairs): the gathered rows name the captions too
            all_caption_ids = all_image_ids if self.caption_owner is None else caption_ids
        sims_t2i = self.sims if self.sims_t2i is None else self.sims_t2i
        cap_offset = self.caption_offset
        if cap_offset is None:
            cap_offset = self.offset * n_cap // max(n_img, 1)
        local_captions = torch.arange(n_cap, device=device)
        return [
            dict(sims=self.sims[owner], positives=same_image_mask(caption_ids, all_caption_ids), direction="i2t",
                 pos_index=local_captions + cap_offset),
            dict(sims=sims_t2i, positives=same_image_mask(all_image_ids, caption_ids), direction="t2i",
                 pos_index=owner + self.offset),
        ]


def _tri(x: LossInputs, w: LossWeights) -> Tensor:
    return sum(triplet_loss(margin=w.margin, hardest=w.hardest, reduction=w.triplet_reduction,
                            average_negatives=w.warmup_negatives == "mean", **kw)
               for kw in x.ranking_calls())


def _con(x: LossInputs, w: LossWeights) -> Tensor:
    calls = x.ranking_calls()
    return sum(contrastive_loss(temperature=w.contrastive_temperature, **kw) for kw in calls) / len(calls)


def _gd(x: LossInputs, w: LossWeights) -> Tensor:
    img = global_discriminative_loss(x.img_sets, x.img_global, w.gd_margin, w.scale)
    txt = global_discriminative_loss(x.txt_sets, x.txt_global, w.gd_margin, w.scale)
    return 0.5 * (img + txt)


def _isd(x: LossInputs, w: LossWeights) -> Tensor:
    # Eq. 8 adds the two modalities (no 1/2, unlike eq. 7).
    return intra_set_divergence_loss(x.img_sets, w.isd_margin, w.scale) + intra_set_divergence_loss(
        x.txt_sets, w.isd_margin, w.scale
    )


def set_mmd(img_sets: Tensor, txt_sets: Tensor, gamma: float = 0.5) -> Tensor:
    """MMD between all image and all text set elements, each L2-normalised first (DivE ``loss.py``).

    Unnormalised LN(E) + LN(global) elements have norm ~sqrt(2 D) (45 at D = 1024): the kernel
    exp(-gamma ||x - y||) is then ~0 between any two distinct elements, the loss a constant and its gradient
    ~0. On the unit sphere distances lie in [0, 2] and the kernel in [exp(-2 gamma), 1].

    Args:
        img_sets: (Bi, K, D) image sets (any scale).
        txt_sets: (Bt, K, D) text sets (any scale).
        gamma: kernel rate.

    Returns:
        Scalar.
    """
    return mmd_loss(F.normalize(img_sets.flatten(0, 1), dim=-1), F.normalize(txt_sets.flatten(0, 1), dim=-1), gamma)


def _mmd(x: LossInputs, w: LossWeights) -> Tensor:
    return set_mmd(x.img_sets, x.txt_sets, w.mmd_gamma)


def _div(x: LossInputs, w: LossWeights) -> Tensor:
    if x.img_slots is None or x.txt_slots is None:
        raise MaxMatchError(
            "the diversity loss needs the pre-global slots (img_slots, txt_slots)",
            "pass them to total_loss, or set loss.div_weight = 0",
        )
    # DivE adds the image and the text terms (loss.py, its 'uniformity' term on the normalised slots).
    return diversity_loss(x.img_slots) + diversity_loss(x.txt_slots)


@dataclass(frozen=True)
class LossComponent:
    """One term of eq. 5: its weight field in :class:`LossWeights`, its function, a one-line description."""

    weight: str
    fn: Callable[[LossInputs, LossWeights], Tensor]
    help: str


LOSS_COMPONENTS: dict[str, LossComponent] = {
    "tri": LossComponent("tri_weight", _tri, "hinge triplet, hardest (or all) negatives, both directions (eq. 6)"),
    "gd": LossComponent("gd_weight", _gd, "set elements vs their global, mean of image and text (eq. 7)"),
    "isd": LossComponent("isd_weight", _isd, "pairwise element cosines within each set, image + text (eq. 8)"),
    "mmd": LossComponent("mmd_weight", _mmd, "MMD between all image and all text set elements (SetDiv)"),
    "div": LossComponent("div_weight", _div, "PVSE/SetDiv slot diversity, image + text (DivE)"),
    "con": LossComponent("contrastive_weight", _con, "symmetric InfoNCE over the set similarity"),
}


def total_loss(
    sims: Tensor,
    img_sets: Tensor,
    txt_sets: Tensor,
    img_global: Tensor,
    txt_global: Tensor,
    img_slots: Tensor | None = None,
    txt_slots: Tensor | None = None,
    *,
    image_ids: Tensor | None = None,
    caption_owner: Tensor | None = None,
    sims_t2i: Tensor | None = None,
    all_image_ids: Tensor | None = None,
    all_caption_ids: Tensor | None = None,
    offset: int = 0,
    caption_offset: int | None = None,
    **weights,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5: ``TRI + l_GD GD + l_ISD ISD + l_MMD MMD + l_Div Div + l_CON CON``.

    Components whose weight is 0 are not computed. A batch holds Bi images and Bt captions; ``caption_owner``
    names each caption's image row (image-centric batches: Bt = 5 Bi, caption j of image j // 5). Every caption
    is one query in each direction (see :meth:`LossInputs.ranking_calls`). The ranking terms (TRI, CON) run in
    one of two modes:

    * in-batch: ``sims`` is the (Bi, Bt) matrix of the batch;
    * data-parallel (``sims_t2i`` given): ``sims`` is (Bi, Nt) local images x gathered captions, ``sims_t2i`` is
      (Ni, Bt) gathered images x local captions (still image rows); local image i is global image
      ``offset + i`` and local caption j global caption ``caption_offset + j``. The means (TRI with
      ``triplet_reduction="mean"``, CON) are then over the local queries, which DDP's gradient averaging turns
      into the global mean; with ``"sum"`` TRI is this process's share of the global sum.

    The set regularisers always use the local tensors.

    Args:
        sims: see above; image rows x caption columns.
        img_sets: (Bi, K, D) final image sets.
        txt_sets: (Bt, K, D) final text sets.
        img_global: (Bi, D) image global embeddings (GD reference).
        txt_global: (Bt, D) text global embeddings.
        img_slots: (Bi, K, D) image slots before the global is added; needed when div_weight > 0.
        txt_slots: (Bt, K, D) text slots before the global is added.
        image_ids: (Bi,) image id of each local image row; rows sharing an id (caption-centric batches) are
            the same image, whose captions are positives, never negatives. None: every row its own image.
        caption_owner: (Bt,) local row of each caption's image. None: caption j belongs to row j (Bi = Bt).
        sims_t2i: data-parallel only, see above.
        all_image_ids: data-parallel only, (Ni,) ids of the gathered images.
        all_caption_ids: data-parallel only, (Nt,) image id of each gathered caption.
        offset: data-parallel only, global index of local image 0 (rank * Bi).
        caption_offset: data-parallel only, global index of local caption 0; default ``offset * Bt // Bi``.
        **weights: any :class:`LossWeights` field (``margin``, ``hardest``, ``gd_weight``, ...); the rest keep
            their defaults.

    Returns:
        (total, log): the scalar loss and, for each computed component, its unweighted detached value (a
        0-d tensor, so logging needs no device sync until read), plus "total".
    """
    w = LossWeights.from_kwargs(**weights)
    inputs = LossInputs(
        sims, img_sets, txt_sets, img_global, txt_global, img_slots, txt_slots,
        image_ids, caption_owner, sims_t2i, all_image_ids, all_caption_ids, offset, caption_offset,
    )  # fmt: skip
    total = sims.new_zeros(())
    log: dict[str, Tensor] = {}
    for name, component in LOSS_COMPONENTS.items():
        weight = getattr(w, component.weight)
        if weight == 0:
            continue
        value = component.fn(inputs, w)
        total = total + weight * value
        log[name] = value.detach()
    log["total"] = total.detach()
    return total, log
