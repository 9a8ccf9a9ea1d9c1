"""Batched entry points: a similarity over all pairs of two batches of sets, over row-aligned pairs, and the
cosines and MaxMatch matchings behind them (for analysis tools)."""

from __future__ import annotations

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.assignment import max_trace_assignment
from maxmatch_cli.method.similarity.base import (
    blockwise,
    check_sets,
    cosine_block,
    default_block,
    normalised_sets,
    optional_positive_int,
)
from maxmatch_cli.method.similarity.maxmatch import solver_name
from maxmatch_cli.method.similarity.registry import _resolve
from maxmatch_cli.method.similarity.slabs import SLAB_DTYPES, Gallery, gallery_scores, prepare_gallery

Tensor = torch.Tensor


def set_similarity(img: Tensor, txt: Tensor, kind: str = "maxmatch", **options: object) -> Tensor:
    """Similarity of every image set to every text set.

    Args:
        img: ``(Bi, K, D)`` image embedding sets, any scale (elements are L2-normalised inside).
        txt: ``(Bt, K', D)`` text embedding sets, any scale.
        kind: a name from :data:`~maxmatch_cli.method.similarity.SIMILARITIES` (``maxmatch``, ``chamfer``,
            ``mil``, ``topk``, ``sinkhorn``).
        **options: the kind's options (``alpha`` for chamfer, ``k`` for topk, ``tau``/``iters`` for sinkhorn,
            ``solver`` for maxmatch) and, for every kind, ``block_size``: sets per block on each side (default:
            a block holds at most ``BLOCK_ENTRIES`` cosines). Blocking bounds memory and leaves results
            unchanged.

    Returns:
        ``(Bi, Bt)`` scores, differentiable with respect to ``img`` and ``txt``. Under ``torch.no_grad()`` the
        no-grad kernels of :mod:`~maxmatch_cli.method.similarity.slabs` compute them: the same scores up to
        float rounding, in less time and memory.

    Raises:
        MaxMatchError: unknown kind or option, invalid option value, or malformed inputs.

    Example:
        >>> img, txt = torch.randn(3, 4, 8), torch.randn(5, 4, 8)
        >>> set_similarity(img, txt, "chamfer", alpha=16).shape
        torch.Size([3, 5])
    """
    spec, opts, block = _resolve(kind, options)
    if _slab_path(img, txt):
        check_sets(img, txt, paired=False)
        return gallery_scores(img, prepare_gallery(txt, block), spec, opts, block)
    img, txt = normalised_sets(img, txt, paired=False)
    block = block or default_block(img.shape[1], txt.shape[1])
    return blockwise(img, txt, block, lambda c: spec.score(c, **opts))


def gallery_similarity(img: Tensor, gallery: Gallery, kind: str = "maxmatch", **options: object) -> Tensor:
    """No-grad similarity of image sets to a gallery of text sets prepared once (:func:`text_gallery`), for
    scoring a large gallery block of queries by block without preparing it again.

    Args:
        img: ``(Bi, K, D)`` image sets (any scale), on the gallery's device and dtype.
        gallery: from :func:`text_gallery`.
        kind, **options: as for :func:`set_similarity` (``block_size``: image sets per block).

    Returns:
        ``(Bi, Bt)`` scores, equal to ``set_similarity(img, txt, kind)`` under ``torch.no_grad()``.
    """
    spec, opts, block = _resolve(kind, options)
    if gallery.blocks[0].dtype != img.dtype or gallery.blocks[0].shape[1] != img.shape[-1]:
        raise MaxMatchError(f"image sets {tuple(img.shape)} {img.dtype} do not fit the gallery's "
                            f"D={gallery.blocks[0].shape[1]} {gallery.blocks[0].dtype}",
                            hint="encode both with the same model and dtype")
    return gallery_scores(img, gallery, spec, opts, block)


def text_gallery(txt: Tensor, block_size: int | None = None) -> Gallery:
    """Text sets ``(Bt, K', D)`` (any scale, float32 or float64) prepared for :func:`gallery_similarity`:
    unit-norm, element-major blocks of ``block_size`` sets (default: sized for the device)."""
    check_sets(txt, txt, paired=False)
    if txt.dtype not in SLAB_DTYPES:
        raise MaxMatchError(f"a gallery needs float32 or float64 sets, got {txt.dtype}", hint="call .float() first")
    return prepare_gallery(txt, optional_positive_int("block_size", block_size))


def _slab_path(img: Tensor, txt: Tensor) -> bool:
    """Whether set_similarity may use the no-grad kernels: gradients off (``torch.no_grad()``, as evaluation and
    retrieval run) and a dtype they run in. With gradients on, even for detached inputs, the autograd path runs,
    so that whatever training computes stays bit for bit what it was."""
    if torch.is_grad_enabled() or not (isinstance(img, Tensor) and isinstance(txt, Tensor)):
        return False  # (check_sets on the autograd path names a non-tensor)
    return img.dtype == txt.dtype and img.dtype in SLAB_DTYPES


def paired_similarity(img: Tensor, txt: Tensor, kind: str = "maxmatch", **options: object) -> Tensor:
    """Similarity of row-aligned pairs: ``out[b] = set_similarity(img[b:b+1], txt[b:b+1])``.

    Args:
        img: ``(B, K, D)`` image sets; txt: ``(B, K', D)`` text sets (any scale).
        kind, **options: as for :func:`set_similarity` (``block_size`` = pairs per chunk here).

    Returns:
        ``(B,)`` scores, equal (up to float rounding) to the diagonal of ``set_similarity(img, txt, kind)``.
    """
    spec, opts, block = _resolve(kind, options)
    img, txt = normalised_sets(img, txt, paired=True)
    block = block or default_block(1, 1)
    out = [spec.score(a @ b.transpose(1, 2), **opts) for a, b in zip(img.split(block), txt.split(block))]
    return out[0] if len(out) == 1 else torch.cat(out)


def cosine_matrices(img: Tensor, txt: Tensor) -> Tensor:
    """All element-to-element cosines, ``(Bi, K, D) x (Bt, K', D) -> (Bi, Bt, K, K')`` (for analysis; memory
    grows as ``Bi*Bt*K*K'``)."""
    img, txt = normalised_sets(img, txt, paired=False)
    return cosine_block(img, txt).contiguous()


@torch.no_grad()
def maxmatch_assignment(img: Tensor, txt: Tensor, solver: str = "auto", block_size: int | None = None) -> Tensor:
    """The MaxMatch matching of every image set to every text set (for analysis tools).

    Args:
        img: ``(Bi, K, D)``; txt: ``(Bt, K', D)`` (any scale).
        solver: assignment solver (see :func:`maxmatch_cli.method.assignment.max_trace_assignment`).
        block_size: sets per block on each side.

    Returns:
        ``(Bi, Bt, K)`` long: ``out[i, j, k]`` is the text element matched to image element ``k`` of pair
        ``(i, j)``; ``-1`` when ``K > K'`` leaves element ``k`` unmatched.
    """
    solver_name("solver", solver)
    block = optional_positive_int("block_size", block_size)
    img, txt = normalised_sets(img, txt, paired=False)
    block = block or default_block(img.shape[1], txt.shape[1])
    return blockwise(img, txt, block, lambda c: max_trace_assignment(c, solver=solver))
