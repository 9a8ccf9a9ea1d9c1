"""No-grad scoring for evaluation: one GEMM per block, laid out so that every set reduction reads whole slabs.

The text sets of a block are stored element-major, ``(K', bt, D)`` flattened (:class:`Gallery`), so the GEMM
``(bi*K, D) @ (D, K'*bt)`` of a block of ``bi`` image sets lands as ``g: (bi, K, K', bt)``: ``g[:, k, l, :]`` is
the ``(bi, bt)`` slab of entry ``(k, l)`` for every pair of the block, with contiguous rows (the kernels take it
in column chunks, views of the same buffer). A reduction over set
elements -- a max, a sum of exponentials, a running best over matchings -- is then a handful of elementwise
operations between slabs, vectorised across pairs, with no copy of the GEMM output; each kind's
``slab_score`` does this (``score`` on a permuted view of ``g`` is the fallback). Blocks are sized so that ``g``
stays in cache, and one buffer holds it for every block: memory is the output plus one block, whatever the
gallery size (and, as on the autograd path, one unit-norm copy of the inputs).

The autograd path (:func:`~maxmatch_cli.method.similarity.base.blockwise`) is untouched: training computes
exactly what it did, and this path is taken only when no gradient is needed. Both agree up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maxmatch_cli.method.similarity.base import SimilarityKind

Tensor = torch.Tensor

#: GEMM columns (``K' * bt``) per text block: one GEMM call per (image block, text block), few enough calls that
#: a busy machine does not stall in each call's thread barrier (benchmarks/RESULTS.md, "Evaluation scoring").
SLAB_COLUMNS = {"cpu": 2048, "cuda": 8192}

#: Cosine entries per GEMM block: 8 MiB in float32 on a CPU (256 x 512 sets at K = K' = 4); a GPU takes far
#: larger blocks to amortise launches.
SLAB_ENTRIES = {"cpu": 1 << 21, "cuda": 1 << 26}

#: Pairs per kernel call: the kernels walk a block in column chunks of at most this many (image, text) pairs. On a
#: CPU a whole block (256 x 512 sets) is one call, so each elementwise op is large enough to use every core: on the
#: quiet 2-core development machine chunks of 2^15 pairs (one thread per op) left MaxMatch at 1.41x the element
#: GEMM and 2^19 at 1.11x (benchmarks/RESULTS.md, "Evaluation scoring"). On a GPU the whole block is one call.
KERNEL_PAIRS = {"cpu": 1 << 19, "cuda": 1 << 62}

#: Dtypes the slab kernels run in; others take the autograd path's kernels.
SLAB_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Gallery:
    """Text sets prepared once for repeated no-grad scoring against many image blocks.

    Attributes:
        blocks: unit-norm text sets, element-major per block: ``(K' * bt, D)`` with row ``l * bt + j`` holding
            element ``l`` of set ``j`` of the block.
        k: ``K'``, elements per text set.
        size: ``Bt``, the number of text sets.
    """

    blocks: tuple[Tensor, ...]
    k: int
    size: int

    @property
    def block_sets(self) -> int:
        """Text sets per block (the last block may hold fewer)."""
        return self.blocks[0].shape[0] // self.k


def _device_key(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def prepare_gallery(txt: Tensor, block_size: int | None = None) -> Gallery:
    """L2-normalise text sets and store them element-major in blocks of ``block_size`` sets.

    Args:
        txt: ``(Bt, K', D)`` text sets (any scale), already checked.
        block_size: text sets per block (default: ``SLAB_COLUMNS / K'``).
    """
    count, k_txt, dim = txt.shape
    bt = block_size or max(1, SLAB_COLUMNS[_device_key(txt.device)] // k_txt)
    return Gallery(tuple(_element_major(block) for block in txt.split(bt)), k_txt, count)


def _element_major(block: Tensor) -> Tensor:
    """``(bt, K', D) -> (K' * bt, D)`` unit-norm, element-major: F.normalize's arithmetic, with the division
    writing straight into the transposed layout (one pass instead of a normalised copy and then a transpose)."""
    bt, k_txt, dim = block.shape
    norms = torch.linalg.vector_norm(block, dim=-1, keepdim=True).clamp_min_(1e-12)
    out = torch.empty(k_txt, bt, dim, dtype=block.dtype, device=block.device)
    torch.div(block.transpose(0, 1), norms.transpose(0, 1), out=out)
    return out.view(k_txt * bt, dim)


def image_block(k_img: int, gallery: Gallery, block_size: int | None = None) -> int:
    """Image sets per block so that one cosine block holds at most ``SLAB_ENTRIES`` entries."""
    if block_size:
        return block_size
    entries = SLAB_ENTRIES[_device_key(gallery.blocks[0].device)]
    return max(1, entries // (k_img * gallery.k * max(1, gallery.block_sets)))


def gallery_scores(img: Tensor, gallery: Gallery, spec: SimilarityKind, options: dict[str, object],
                   block_size: int | None = None) -> Tensor:
    """``spec``'s similarity of every image set to every set of ``gallery``, without autograd.

    Args:
        img: ``(Bi, K, D)`` image sets (any scale), already checked, same device and dtype as the gallery.
        gallery: from :func:`prepare_gallery`.
        spec, options: the kind and its checked options.
        block_size: image sets per block (default: see :func:`image_block`).

    Returns:
        ``(Bi, Bt)`` scores.
    """
    count, k_img, dim = img.shape
    bi = image_block(k_img, gallery, block_size)
    out = torch.empty(count, gallery.size, dtype=img.dtype, device=img.device)
    if gallery.size == 0:
        return out
    buffer = torch.empty(min(bi, count) * k_img * gallery.blocks[0].shape[0], dtype=img.dtype, device=img.device)
    chunk = max(1, KERNEL_PAIRS[_device_key(img.device)] // min(bi, max(count, 1)))
    with torch.no_grad():
        for start in range(0, count, bi):
            rows = F.normalize(img[start: start + bi], dim=-1).reshape(-1, dim)
            n_img = rows.shape[0] // k_img
            col = 0
            for block in gallery.blocks:
                n_txt = block.shape[0] // gallery.k
                g = buffer[: rows.shape[0] * block.shape[0]].view(rows.shape[0], block.shape[0])
                torch.mm(rows, block.T, out=g)
                g = g.view(n_img, k_img, gallery.k, n_txt)
                for sub in g.split(chunk, dim=3):
                    out[start: start + n_img, col: col + sub.shape[3]] = _block_scores(spec, sub, options)
                    col += sub.shape[3]
    return out


def _block_scores(spec: SimilarityKind, g: Tensor, options: dict[str, object]) -> Tensor:
    """``(bi, K, K', bt) -> (bi, bt)``: the kind's slab kernel, or its score function on a permuted view."""
    scores = spec.slab_score(g, **options) if spec.slab_score is not None else None
    return spec.score(g.permute(0, 3, 1, 2), **options) if scores is None else scores
