"""The ``faiss`` engine: approximate candidates over the set elements, re-ranked exactly.

Optional (``pip install faiss-cpu``; an index built with ``--engine faiss``). Candidate generation is approximate
nearest-neighbour search over the set *elements* (an inverted-file index, fp16 vectors, inner product of
L2-normalised elements = cosine), then exact re-ranking. Each query element fetches its ``candidates`` nearest
gallery elements from ``nprobe`` inverted lists; the gallery sets owning them are scored exactly and the best
``k`` returned. Scores are exact; only recall is approximate (an item none of whose elements is near any query
element can be missed). ``benchmarks/index.py`` measures recall@10 against the exact engine.

The search depth: :func:`default_candidates` (it grows with the gallery) and :data:`DEFAULT_NPROBE`, capped by
:func:`search_depth`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.format import SETS_FILE
from maxmatch_cli.retrieval.index.interface import check_depth, check_nlist

ELEMENTS_FILE = "elements.faiss"
DEFAULT_CANDIDATES = 128
"""The fewest nearest gallery elements the faiss engine fetches per query element by default; the default grows
with the gallery, :func:`default_candidates`."""
CANDIDATES_PER_ITEMS = 1000
"""Gallery items per default candidate beyond :data:`DEFAULT_CANDIDATES` (:func:`default_candidates`)."""
DEFAULT_NPROBE = 32
"""Inverted lists searched per query element by the faiss engine."""
FAISS_GPU_MAX_K = 2048
"""faiss-gpu's k-selection limit: a GPU element index fetches at most this many elements per query element."""


class FaissEngine:
    """faiss candidates re-ranked exactly (a :class:`~maxmatch_cli.retrieval.index.interface.SearchEngine`)."""

    name = "faiss"
    auto_rank = 1  # --engine auto prefers it where the index has it and faiss is installed
    files = (ELEMENTS_FILE,)

    def check_build(self, nlist: int | None) -> None:
        _faiss()  # a missing package is reported before anything is encoded
        check_nlist(nlist)

    def build(self, folder: Path, nlist: int | None) -> dict[str, Any]:
        return build_element_index(np.load(folder / SETS_FILE, mmap_mode="r"), folder / ELEMENTS_FILE, nlist)

    def usable(self, index: Any) -> bool:
        return index.has_element_index and _faiss_available()

    def open(self, index: Any, device: str | torch.device) -> Any:
        if not index.has_element_index:
            raise MaxMatchError(f"index {index.path} has no faiss element index",
                                hint="rebuild it with `maxmatch index ... --engine faiss`, or use --engine exact")
        return index.element_index(device)

    def search(self, sets: Any, queries: torch.Tensor, k: int, kind: str, options: dict[str, Any], *,
               element_index: Any, candidates: int | None, nprobe: int | None, query_side: str,
               device: str | torch.device, block_size: int | None) -> Any:
        if element_index is None:
            raise MaxMatchError(f"search engine '{self.name}' needs an element index",
                                hint="use engine='exact' or 'faiss'")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. k=10")
        k = min(k, int(sets.shape[0]))  # as the exact engine: never more results than items
        pools = faiss_candidates(element_index, queries, int(sets.shape[1]), candidates, nprobe)
        return _rerank(sets, queries, pools, k, kind, options, query_side, device)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MaxMatchError("the faiss engine needs the faiss-cpu package, which is not installed",
                            hint="pip install faiss-cpu, or use --engine exact") from None
    return faiss


# ----------------------------------------------------------------------------------------------- building


def default_nlist(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors`` elements: about their square root, with at least 39 training points per
    list (faiss's minimum for a stable k-means)."""
    return max(1, min(round(math.sqrt(n_vectors)), n_vectors // 39))


def build_element_index(sets: np.ndarray, path: str | os.PathLike, nlist: int | None = None, seed: int = 0,
                        chunk: int = 1 << 16) -> dict[str, Any]:
    """Write a faiss IVF index over every element of ``sets`` (element ``k`` of item ``i`` has id ``i*K + k``).

    Vectors are stored as fp16 (``IndexIVFScalarQuantizer`` with ``QT_fp16``) under the inner product, so with
    L2-normalised elements a search returns the highest cosines. k-means is trained on at most 64 x nlist
    sampled elements and the elements are added in chunks, so the float32 copies stay bounded.

    Args:
        sets: ``(N, K, D)`` sets with L2-normalised elements (a memory-map is read chunk by chunk).
        path: the file to write.
        nlist: inverted lists (default :func:`default_nlist`).
        seed: sampling and k-means seed.
        chunk: elements converted and added at a time.

    Returns:
        The manifest's ``element_index`` record.
    """
    faiss = _faiss()
    n, k, d = sets.shape
    n_vectors = n * k
    check_nlist(nlist, n_vectors)
    nlist = default_nlist(n_vectors) if nlist is None else nlist
    flat = sets.reshape(n_vectors, d)
    rng = np.random.default_rng(seed)
    n_train = min(n_vectors, 64 * nlist)
    sample = np.sort(rng.choice(n_vectors, size=n_train, replace=False))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(flat[sample], dtype=np.float32))
    for start in range(0, n_vectors, chunk):
        index.add(np.ascontiguousarray(flat[start: start + chunk], dtype=np.float32))
    faiss.write_index(index, str(path))
    return {"kind": "faiss-ivf", "file": Path(path).name, "nlist": nlist, "vectors": "fp16",
            "metric": "inner_product", "n_elements": n_vectors, "train_size": n_train, "seed": seed,
            "faiss_version": faiss.__version__}


def read_element_index(path: str | os.PathLike):
    """Open a faiss element index memory-mapped (``IO_FLAG_MMAP``): the inverted lists stay in the file and the
    operating system pages in only the lists a search probes, so opening costs no memory per element.

    Raises:
        MaxMatchError: faiss is missing, or the file is not a readable faiss index.
    """
    faiss = _faiss()
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError as exc:
        raise MaxMatchError(f"cannot read the faiss element index {path} ({str(exc).splitlines()[0]})",
                            hint="the index is damaged; rebuild it (build it with `maxmatch index CKPT --data F.h5 "
                                 "--split test --out INDEX --engine faiss`)") from None


# ----------------------------------------------------------------------------------------------- searching


def default_candidates(n_items: int) -> int:
    """Nearest elements fetched per query element when none are asked for, for a gallery (or shard) of ``n_items``.

    The power of two at or above one per :data:`CANDIDATES_PER_ITEMS` items, at least :data:`DEFAULT_CANDIDATES`:
    128 up to 128K items, 1,024 at 1M. The two points it passes through are measured (benchmarks/RESULTS.md,
    "Index search", nprobe 32): recall@10 against exact search 0.97 with 128 at 100K items and 1.00 with 1,024 at
    1M, where 128 gave 0.49. A gallery's near-ties grow with its size (more items share each concept), so a fixed
    depth loses recall as the gallery grows; the cost grows with it (64 queries/s at 1M on 2 cores, still 15x the
    exhaustive engine).
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be a non-negative integer, got {n_items!r}")
    wanted = -(-n_items // CANDIDATES_PER_ITEMS)  # ceil
    return max(DEFAULT_CANDIDATES, 1 << max(0, wanted - 1).bit_length())


def search_depth(element_index: Any, gallery_k: int, candidates: int | None = None,
                 nprobe: int | None = None) -> tuple[int, int]:
    """``(elements fetched, lists probed)`` per query element, as :func:`faiss_candidates` searches
    ``element_index``: the defaults (:func:`default_candidates` of its items, :data:`DEFAULT_NPROBE`) or the values
    given, capped by its element and list counts and, on a faiss-gpu index, :data:`FAISS_GPU_MAX_K`.

    Raises:
        MaxMatchError: ``candidates`` or ``nprobe`` is not a positive integer.
    """
    n_elements = int(element_index.ntotal)
    if candidates is None:
        candidates = default_candidates(n_elements // max(int(gallery_k), 1))
    nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
    check_depth(candidates, nprobe)
    nlist = getattr(element_index, "nlist", None) or element_index.getNumLists()  # CPU / faiss-gpu index
    fetch = min(candidates, n_elements)
    if type(element_index).__name__.startswith("Gpu"):
        fetch = min(fetch, FAISS_GPU_MAX_K)
    return fetch, min(nprobe, int(nlist))


def faiss_candidates(element_index: Any, queries: torch.Tensor, gallery_k: int, candidates: int | None = None,
                     nprobe: int | None = None) -> list[np.ndarray]:
    """Gallery rows owning the nearest elements of each query element, per query (sorted, unique).

    Args:
        element_index: from :func:`build_element_index`.
        queries: ``(Q, K', D)`` query sets (normalised here).
        gallery_k: K of the gallery sets (element id // K is the row).
        candidates: nearest elements fetched per query element (default: :func:`default_candidates` of the
            index's items).
        nprobe: inverted lists searched (default :data:`DEFAULT_NPROBE`, capped at nlist).

    The depth applied is :func:`search_depth`'s.
    """
    fetch, element_index.nprobe = search_depth(element_index, gallery_k, candidates, nprobe)
    q, kq, d = queries.shape
    if d != element_index.d:
        raise MaxMatchError(f"query elements have D={d}, the element index D={element_index.d}",
                            hint="query with the checkpoint the index was built with")
    flat = F.normalize(queries.float(), dim=-1).reshape(q * kq, d).numpy()
    _, ids = element_index.search(np.ascontiguousarray(flat), fetch)
    ids = ids.reshape(q, -1)
    return [np.unique(row[row >= 0] // gallery_k) for row in ids]


def _rerank(sets, queries: torch.Tensor, pools: list[np.ndarray], k: int, kind: str, options: dict[str, Any],
            query_side: str, device: str | torch.device, max_pairs: int = 8192):
    """Exact top-k of each query among its candidate rows (ascending), ties to the lower row.

    Queries are scored in groups: the candidates of a group are padded to one length P and gathered into a
    ``(Q, P, K, D)`` block, each query's cosines come from one GEMM ``(P*K, D) x (D, K')`` and the similarity's
    score function runs once over the ``(Q, P, K, K')`` matrices. One call per query, or one tiny matmul per
    pair (:func:`~maxmatch_cli.method.similarity.paired_similarity`), is several times slower at these sizes.
    """
    from maxmatch_cli.retrieval.api import Ranking, _as_float_tensor
    from maxmatch_cli.method.similarity import _resolve  # the kind's score function, options checked as set_similarity does

    spec, opts, _ = _resolve(kind, options)
    device = torch.device(device)
    rows = torch.full((len(pools), k), -1, dtype=torch.long)
    scores = torch.full((len(pools), k), float("-inf"))
    queries = F.normalize(queries.float(), dim=-1)
    start = 0
    while start < len(pools):
        stop, width = start + 1, len(pools[start])
        while stop < len(pools) and max(width, len(pools[stop])) * (stop + 1 - start) <= max_pairs:
            width, stop = max(width, len(pools[stop])), stop + 1
        if width:
            padded = np.zeros((stop - start, width), dtype=np.int64)  # row 0 pads; padded scores are dropped
            for i, pool in enumerate(pools[start:stop]):
                padded[i, : len(pool)] = pool
            gallery = _as_float_tensor(sets[padded.reshape(-1)]).to(device)
            n_q, (_, k_g, d) = stop - start, gallery.shape
            gallery = F.normalize(gallery, dim=-1).reshape(n_q, width * k_g, d)
            query = queries[start:stop].to(device)
            cos = torch.bmm(gallery, query.transpose(1, 2)).reshape(n_q, width, k_g, query.shape[1])
            block = spec.score(cos if query_side == "text" else cos.transpose(-1, -2), **opts).float().cpu()
            for i, pool in enumerate(pools[start:stop]):
                if len(pool):
                    got = block[i, : len(pool)]
                    order = torch.sort(got, descending=True, stable=True).indices[:k]
                    rows[start + i, : len(order)] = torch.from_numpy(pool)[order]
                    scores[start + i, : len(order)] = got[order]
        start = stop
    return Ranking(rows, scores)
