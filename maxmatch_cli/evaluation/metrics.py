"""Image-text retrieval metrics: Recall@K, median and mean rank, RSUM (SCAN / VSE++ protocol).

Layout: ``sims`` is (n_images, n_images * captions_per_image) and caption j describes image
``j // captions_per_image``.

Ranks are 0-based counts of the candidates that beat the query's positive; a query's rank is the number of
*non-positive* candidates scoring **greater than or equal to** its best positive. Ties therefore count against
the query (pessimistic): a collapsed model whose similarities are all equal gets the worst rank, not perfect
recall. With continuous scores ties do not occur and the ranks equal those of a full argsort.

The matrix is read in row blocks, and each block is compared against one threshold per query, so time is
O(n_images * n_captions) with no sort and memory is bounded by ``chunk_size`` rows (5,000 x 25,000 in well
under a second of compute and ~100 MB of scratch).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError

__all__ = ["METRIC_KEYS", "coco_1k_folds", "retrieval_metrics", "validate_sims"]

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)  # fmt: skip
"""Keys of every metrics dict, in reporting order."""

_RECALL_AT = (1, 5, 10)
_BLOCK_ELEMENTS = 1 << 24  # default scratch per block: 16M scores


def validate_sims(sims, captions_per_image: int = 5) -> torch.Tensor:
    """Check a similarity matrix against the retrieval layout and return it as a tensor (no copy if possible).

    Args:
        sims: (n_images, n_images * captions_per_image) torch tensor or numpy array, floating point.
        captions_per_image: captions per image, >= 1.

    Returns:
        The same data as a torch tensor.

    Raises:
        MaxMatchError: wrong type, rank, dtype or shape, or NaN entries.
    """
    if isinstance(sims, np.ndarray):
        sims = torch.from_numpy(sims)
    if not isinstance(sims, torch.Tensor):
        raise MaxMatchError(
            f"similarities must be a torch tensor or numpy array, got {type(sims).__name__}",
            "pass the (n_images, n_captions) score matrix",
        )
    if not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise MaxMatchError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    if sims.dim() != 2 or not sims.is_floating_point():
        raise MaxMatchError(
            f"similarities must be a 2-D floating-point matrix, got {sims.dtype} of shape {tuple(sims.shape)}"
        )
    n_images, n_captions = sims.shape
    if n_images == 0 or n_captions != n_images * captions_per_image:
        hint = f"expected (n_images, n_images * {captions_per_image}) with image rows and caption columns"
        if n_images == n_captions * captions_per_image and n_captions:
            hint = "the matrix looks transposed: pass images as rows, captions as columns"
        raise MaxMatchError(
            f"similarity matrix of shape {tuple(sims.shape)} does not fit {captions_per_image} captions per image",
            hint,
        )
    if torch.isnan(sims).any():
        raise MaxMatchError("similarity matrix contains NaN", "check the model outputs (NaN loss?) before evaluating")
    return sims


def _ranks(sims: torch.Tensor, cpi: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based i2t ranks (n_images,) and t2i ranks (n_captions,), pessimistic ties."""
    n_images, n_captions = sims.shape
    device = sims.device
    rows = chunk_size or max(1, _BLOCK_ELEMENTS // n_captions)
    caption_ids = torch.arange(n_captions, device=device)
    t2i_positive = sims[caption_ids // cpi, caption_ids].float()  # (n_captions,)
    t2i_at_least = torch.zeros(n_captions, dtype=torch.long, device=device)
    i2t = torch.empty(n_images, dtype=torch.long, device=device)
    for start in range(0, n_images, rows):
        block = sims[start : start + rows].float()  # (r, n_captions)
        r = block.shape[0]
        local = torch.arange(r, device=device)
        own = block.reshape(r, n_images, cpi)[local, start + local]  # (r, cpi) scores of each row's captions
        best = own.max(dim=1, keepdim=True).values
        i2t[start : start + r] = (block >= best).sum(1) - (own >= best).sum(1)
        t2i_at_least += (block >= t2i_positive).sum(0)
    return i2t, t2i_at_least - 1  # the positive itself is counted once


def _summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.cpu().numpy()
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(r < k)) for k in _RECALL_AT}
    out[f"{prefix}_medr"] = float(math.floor(np.median(r)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(r) + 1)
    return out


def retrieval_metrics(sims, captions_per_image: int = 5, *, chunk_size: int | None = None) -> dict[str, float]:
    """Recall@{1,5,10}, median and mean rank in both directions, and RSUM.

    Image-to-text: an image's rank is the best among its captions. Text-to-image: a caption's rank is that of
    its image. medr = floor(median of 0-based ranks) + 1 and meanr = mean of 0-based ranks + 1 (1-based, as in
    SCAN / VSE++). See the module docstring for tie handling.

    Args:
        sims: (n_images, n_images * captions_per_image) torch tensor (any device) or numpy array.
        captions_per_image: caption j belongs to image j // captions_per_image.
        chunk_size: image rows per block; default keeps a block near 16M scores.

    Returns:
        Dict with the keys of :data:`METRIC_KEYS`; recalls in percent.
    """
    sims = validate_sims(sims, captions_per_image)
    if chunk_size is not None and chunk_size < 1:
        raise MaxMatchError(f"chunk_size must be >= 1, got {chunk_size}")
    i2t, t2i = _ranks(sims, captions_per_image, chunk_size)
    out = {**_summary(i2t, "i2t"), **_summary(t2i, "t2i")}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in _RECALL_AT)
    return {key: out[key] for key in METRIC_KEYS}


def coco_1k_folds(
    sims, captions_per_image: int = 5, n_folds: int = 5, *, chunk_size: int | None = None
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """COCO 1K protocol: metrics on ``n_folds`` folds of consecutive images (and their captions), averaged.

    For the 5K test split the folds are images 0-999, 1000-1999, ... with their 5,000 captions each. Every key,
    medr and rsum included, is the mean of the per-fold values (as SCAN reports it).

    Args:
        sims: (n_images, n_images * captions_per_image), n_images divisible by n_folds.
        captions_per_image: captions per image.
        n_folds: number of folds.
        chunk_size: passed to :func:`retrieval_metrics`.

    Returns:
        (mean metrics, per-fold metrics list).
    """
    sims = validate_sims(sims, captions_per_image)
    n_images = sims.shape[0]
    if not isinstance(n_folds, int) or n_folds < 1 or n_images % n_folds:
        raise MaxMatchError(
            f"{n_images} images cannot be split into {n_folds} equal folds",
            "COCO 1K needs the 5,000-image test split (5 folds of 1,000)",
        )
    size = n_images // n_folds
    folds = [
        retrieval_metrics(
            sims[f * size : (f + 1) * size, f * size * captions_per_image : (f + 1) * size * captions_per_image],
            captions_per_image,
            chunk_size=chunk_size,
        )
        for f in range(n_folds)
    ]
    mean = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    return mean, folds
