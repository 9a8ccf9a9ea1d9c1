"""What every set similarity shares: the member interface, option checks and the blockwise cosine machinery.

A similarity is a pure function of cosine matrices ``c: (..., K, K')`` (entry ``[k, l]`` is the cosine between
element ``k`` of an image set and element ``l`` of a text set) returning one score per matrix, ``(...)``. The
batched entry points (:mod:`maxmatch_cli.method.similarity.batched`) L2-normalise the sets, build ``c`` for a block
of pairs with one GEMM (:func:`cosine_block`) and call the score function on it (:func:`blockwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

Tensor = torch.Tensor

#: One block of pairs holds at most this many cosine entries (64 MiB in float32); the default ``block_size``
#: follows from it: 1024 sets a side at K = 4, 512 at K = 8, 256 at K = 16.
BLOCK_ENTRIES = 1 << 24

#: An option check: ``(option name, value) -> the value to use``; raises :class:`MaxMatchError` when invalid.
OptionCheck = Callable[[str, object], object]


@dataclass(frozen=True)
class SimilarityKind:
    """A named similarity: a score function of cosine matrices and the options it accepts.

    Attributes:
        name: the key in :data:`~maxmatch_cli.method.similarity.registry.SIMILARITIES` (``kind=`` argument).
        description: one line, shown by ``maxmatch similarities``.
        score: ``(c: (..., K, K'), **options) -> (...)``.
        defaults: every option ``score`` takes, with its default.
        checks: for every option in ``defaults``, the check its values pass before ``score`` sees them.
        slab_score: optional no-grad evaluation kernel ``(g: (bi, K, K', bt), **options) -> (bi, bt) | None``
            on the element-major cosine block of :mod:`~maxmatch_cli.method.similarity.slabs` (``g[:, k, l, :]``
            is the ``(bi, bt)`` slab of entry ``(k, l)``); it may overwrite ``g``, and returns ``None``, before
            touching ``g``, for shapes or options it does not handle (``score`` then runs on ``g``). Its results
            equal ``score``'s up to float rounding.
    """

    name: str
    description: str
    score: Callable[..., Tensor]
    defaults: Mapping[str, object] = field(default_factory=dict)
    checks: Mapping[str, OptionCheck] = field(default_factory=dict)
    slab_score: Callable[..., Tensor | None] | None = None

    def __post_init__(self) -> None:
        # An option without a check would reach the score function unvalidated; one without a default could
        # never be named in the error that lists what a kind accepts.
        if set(self.defaults) != set(self.checks):
            raise ValueError(f"similarity {self.name!r}: options {sorted(self.defaults)} but checks "
                             f"{sorted(self.checks)}; give every option a default and a check")


# ----------------------------------------------------------------------------------------- option checks


def positive_float(name: str, value: object) -> float:
    """A finite number > 0 (bools refused), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MaxMatchError(f"option {name}={value!r} must be a positive number", hint=f"e.g. {name}=16")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """An int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MaxMatchError(f"option {name}={value!r} must be a positive integer", hint=f"e.g. {name}=8")
    return value


def optional_positive_int(name: str, value: object) -> int | None:
    """``None`` or an int >= 1."""
    return None if value is None else positive_int(name, value)


# ----------------------------------------------------------------------------------------- cosines, blockwise


def entries_first(c: Tensor) -> Tensor:
    """``(..., K, K') -> (K, K', N)`` contiguous: reductions over set elements then run over outer dimensions,
    vectorised across the ``N`` pairs, which on CPU is several times faster than reducing a 4-wide inner axis."""
    return c.movedim((-2, -1), (0, 1)).reshape(c.shape[-2], c.shape[-1], -1)


def normalised_sets(img: Tensor, txt: Tensor, *, paired: bool) -> tuple[Tensor, Tensor]:
    """Check two batches of sets (:func:`check_sets`) and L2-normalise their elements.

    Returns:
        ``(img, txt)`` with unit-norm elements.
    """
    check_sets(img, txt, paired=paired)
    # Elements are compared by cosine, so any input scale is allowed.
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def check_sets(img: Tensor, txt: Tensor, *, paired: bool) -> None:
    """Refuse malformed batches of sets.

    Args:
        img: ``(Bi, K, D)`` floating point; txt: ``(Bt, K', D)`` on the same device.
        paired: require ``Bi == Bt`` (row-aligned pairs).

    Raises:
        MaxMatchError: wrong rank, dtype, empty set or dimension, differing ``D`` or device, unequal batches.
    """
    for name, x in (("img", img), ("txt", txt)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise MaxMatchError(f"{name} must be a (B, K, D) tensor of embedding sets, got {shape}",
                                hint="one set of K embeddings of size D per image / caption")
        if not x.is_floating_point():
            raise MaxMatchError(f"{name} must be floating point, got {x.dtype}", hint="call .float() first")
        if 0 in x.shape[1:]:
            raise MaxMatchError(f"{name} has an empty set or embedding dimension: {tuple(x.shape)}",
                                hint="K and D must be at least 1")
    if img.shape[-1] != txt.shape[-1]:
        raise MaxMatchError(f"embedding sizes differ: img D={img.shape[-1]}, txt D={txt.shape[-1]}",
                            hint="both modalities must be projected to the same D")
    if paired and img.shape[0] != txt.shape[0]:
        raise MaxMatchError(f"paired_similarity needs as many images as texts, got {img.shape[0]} and {txt.shape[0]}",
                            hint="use set_similarity for all pairs of two batches")
    if img.device != txt.device:
        raise MaxMatchError(f"img is on {img.device} but txt on {txt.device}", hint="move both to one device")


def default_block(k_img: int, k_txt: int) -> int:
    """Sets per block on each side so that one block holds at most :data:`BLOCK_ENTRIES` cosines."""
    return max(1, math.isqrt(BLOCK_ENTRIES // (k_img * k_txt)))


def cosine_block(img: Tensor, txt: Tensor) -> Tensor:
    """``(bi, K, D) x (bt, K', D) -> (bi, bt, K, K')``: one GEMM, returned as a permuted view (no copy)."""
    (bi, k_img, dim), (bt, k_txt, _) = img.shape, txt.shape
    flat = img.reshape(bi * k_img, dim) @ txt.reshape(bt * k_txt, dim).T
    return flat.view(bi, k_img, bt, k_txt).permute(0, 2, 1, 3)


def blockwise(img: Tensor, txt: Tensor, block: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to the cosine matrices of every (image block, text block) and stitch the results.

    Args:
        img: ``(Bi, K, D)``, txt: ``(Bt, K', D)`` unit-norm sets.
        block: sets per block on each side.
        fn: ``(bi, bt, K, K') -> (bi, bt, ...)``.

    Returns:
        ``(Bi, Bt, ...)``.
    """
    # split() rather than slicing: one backward node per input that concatenates the block gradients, instead
    # of one full-size zero tensor per slice (with a single block it is a no-op view either way).
    txt_blocks = txt.split(block) if txt.shape[0] > block else (txt,)
    rows = []
    for img_block in img.split(block) if img.shape[0] > block else (img,):
        cols = [fn(cosine_block(img_block, txt_block)) for txt_block in txt_blocks]
        rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
