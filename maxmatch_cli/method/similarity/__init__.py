"""Set-to-set similarities between image and text embedding sets, one module per member.

Every similarity is a pure function of the cosine matrices ``c`` of shape ``(..., K, K')`` (entry ``[k, l]`` is
the cosine between element ``k`` of the image set and element ``l`` of the text set) and returns one score per
matrix. :func:`set_similarity` computes all ``Bi x Bt`` pairs of two batches of sets blockwise, with one GEMM per
block; :func:`paired_similarity` scores row-aligned pairs. Kinds are looked up by name in :data:`SIMILARITIES`:

=========  ==============================================================================================
maxmatch   eq. 2-4: exact one-to-one assignment maximising the trace, score ``mean_k(exp(c[k, pi*(k)]) - 1)``
chamfer    eq. 1: smooth-Chamfer with temperature ``alpha`` (SetDiv: 16)
mil        max over the ``K x K'`` entries (PVSE)
topk       inference variant: mean of ``exp(x) - 1`` over the ``k`` largest entries, no matching
sinkhorn   extension: entropic-OT soft assignment; tends to ``maxmatch`` as ``tau -> 0``
=========  ==============================================================================================

Sets of different sizes (``K != K'``) are allowed: ``maxmatch`` then matches ``min(K, K')`` pairs (a rectangular
assignment) and averages over them; ``sinkhorn`` uses uniform marginals ``1/K`` and ``1/K'``.

Layout (the shape of pytorch-metric-learning's ``distances/``: shared machinery in a base, one file a member):

* ``base.py`` -- :class:`SimilarityKind` (the member interface), the option checks, and the cosine machinery
  (L2-normalise, one GEMM per block of pairs, stitch the blocks);
* ``maxmatch.py``, ``chamfer.py``, ``mil.py``, ``topk.py``, ``sinkhorn.py`` -- one member each: its score
  function ``(c: (..., K, K'), **options) -> (...)`` and ``KIND``, its :class:`SimilarityKind`;
* ``registry.py`` -- :data:`SIMILARITIES`, the name-keyed table, and the lookup that checks options;
* ``batched.py`` -- the entry points :func:`set_similarity`, :func:`paired_similarity`, :func:`cosine_matrices`,
  :func:`maxmatch_assignment`, and :func:`text_gallery` + :func:`gallery_similarity` (a gallery prepared once
  and scored block by block, as evaluation does);
* ``slabs.py`` -- the no-grad path ``set_similarity`` takes when no gradient is needed: one GEMM per block laid
  out element-major, and each kind's optional ``slab_score`` kernel on it (evaluation speed; training keeps the
  autograd path).

Adding a similarity is one file plus one table entry:

1. ``similarity/<name>.py`` with ``<name>_score(c, **options)`` (shapes in its docstring) and
   ``KIND = SimilarityKind("<name>", "<one line>", <name>_score, defaults={...}, checks={...})``, one default
   and one check (from ``base.py``, or your own ``(name, value) -> value``) per option;
2. ``<name>.KIND`` in the tuple that builds :data:`SIMILARITIES` in ``registry.py``;
3. optionally, for evaluation speed, ``slab_score=<name>_slabs``: the same score as elementwise operations on
   the ``(bi, K, K', bt)`` cosine slabs of ``slabs.py`` (without it, evaluation runs ``score`` on a view of them),
   with a test against the score function in ``tests/method/test_similarity_slabs.py``.

``set_similarity(kind="<name>", ...)``, the retrieval API and ``maxmatch similarities`` then know it, and
``tests/method/test_similarity_registry.py`` fails until its name is added to the member list there (put a
brute-force test of the score in ``test_similarity.py``). Recipes are checked in the config stage, which cannot
import this one: a recipe can name the kind once ``config/sections.py`` lists it (the same test fails until
then), and a kind with options gets them from the recipe through ``evaluation/encoding.py``.
"""

from maxmatch_cli.method.similarity.base import BLOCK_ENTRIES, SimilarityKind
from maxmatch_cli.method.similarity.batched import (
    cosine_matrices,
    gallery_similarity,
    maxmatch_assignment,
    paired_similarity,
    set_similarity,
    text_gallery,
)
from maxmatch_cli.method.similarity.chamfer import chamfer_score
from maxmatch_cli.method.similarity.maxmatch import maxmatch_score
from maxmatch_cli.method.similarity.mil import mil_score
from maxmatch_cli.method.similarity.registry import SIMILARITIES, _resolve, check_similarity, list_similarities
from maxmatch_cli.method.similarity.sinkhorn import sinkhorn_score
from maxmatch_cli.method.similarity.topk import topk_score

# _resolve is exported for retrieval.index, which scores pre-gathered cosines with a kind's checked options.
__all__ = [
    "BLOCK_ENTRIES",
    "SIMILARITIES",
    "SimilarityKind",
    "_resolve",
    "chamfer_score",
    "check_similarity",
    "cosine_matrices",
    "gallery_similarity",
    "list_similarities",
    "maxmatch_assignment",
    "maxmatch_score",
    "mil_score",
    "paired_similarity",
    "set_similarity",
    "sinkhorn_score",
    "text_gallery",
    "topk_score",
]
