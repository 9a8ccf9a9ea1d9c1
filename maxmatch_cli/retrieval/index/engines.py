"""The search engines by name, and search over a gallery's sets with one of them.

To add an engine: write a module with a class that satisfies
:class:`~maxmatch_cli.retrieval.index.interface.SearchEngine`, and add one instance to :data:`SEARCH_ENGINES`.
``--engine NAME`` of ``maxmatch index`` and ``maxmatch query``, :data:`ENGINES` and ``auto`` follow the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.exact import ExactEngine
from maxmatch_cli.retrieval.index.faiss_engine import FaissEngine
from maxmatch_cli.retrieval.index.interface import SearchEngine
from maxmatch_cli.retrieval.index.milvus.engine import MilvusEngine

SEARCH_ENGINES: dict[str, SearchEngine] = {engine.name: engine
                                           for engine in (ExactEngine(), FaissEngine(), MilvusEngine())}
"""Every engine by name, in the order listed to users."""
ENGINES = ("auto", *SEARCH_ENGINES)
"""Search engines of :meth:`~maxmatch_cli.retrieval.index.folder.Index.search` (``auto``: milvus for an index whose
vectors are in Milvus; faiss when the index has an element index and faiss is installed; else exact)."""


def check_engine(engine: str) -> None:
    """Refuse a search engine name that is not one of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise MaxMatchError(f"unknown search engine '{engine}'", hint=f"use one of: {', '.join(ENGINES)}")


def engine_for(engine: str, index: Any) -> SearchEngine:
    """The engine ``engine`` names, ``auto`` resolved for ``index``: the usable engine of the highest
    ``auto_rank``.

    Raises:
        MaxMatchError: an unknown name.
    """
    check_engine(engine)
    if engine == "auto":
        return max((e for e in SEARCH_ENGINES.values() if e.usable(index)), key=lambda e: e.auto_rank)
    return SEARCH_ENGINES[engine]


def build_engine(engine: str) -> SearchEngine:
    """The engine an index is built for (``auto`` is a search-time choice, not a build).

    Raises:
        MaxMatchError: an unknown name.
    """
    if engine not in SEARCH_ENGINES:
        raise MaxMatchError(f"unknown index engine '{engine}'",
                            hint="use " + " or ".join(f"--engine {name}" for name in SEARCH_ENGINES))
    return SEARCH_ENGINES[engine]


def search_sets(sets: np.ndarray | torch.Tensor, queries: torch.Tensor, k: int, kind: str,
                options: dict[str, Any] | None = None, *, engine: str = "exact", element_index: Any = None,
                candidates: int | None = None, nprobe: int | None = None, query_side: str = "text",
                device: str | torch.device = "cpu", block_size: int | None = None):
    """Top-k gallery sets per query set: exhaustive exact scoring, or faiss candidates re-ranked exactly.

    Args:
        sets: ``(N, K, D)`` gallery sets (a float16 memory-map is fine); for ``faiss`` with L2-normalised
            elements, as :func:`~maxmatch_cli.retrieval.index.faiss_engine.build_element_index` indexed them.
        queries: ``(Q, K', D)`` query sets (any scale).
        k: results per query.
        kind, options: the similarity and its options.
        engine: a name of :data:`SEARCH_ENGINES` (``exact`` or ``faiss``).
        element_index: the faiss index over the N x K gallery elements (``faiss`` only).
        candidates, nprobe: faiss search depth (:func:`~maxmatch_cli.retrieval.index.faiss_engine.default_candidates`,
            :data:`~maxmatch_cli.retrieval.index.faiss_engine.DEFAULT_NPROBE`).
        query_side: as for :func:`maxmatch_cli.retrieval.api.rank_sets`.
        device, block_size: where and in what blocks the exact scoring runs.

    Returns:
        :class:`~maxmatch_cli.retrieval.api.Ranking` ``(Q, k)``; with ``faiss``, rows -1 and scores -inf pad a query
        whose candidates number fewer than ``k``.
    """
    options = options or {}
    queries = torch.as_tensor(queries).float()
    queries = queries.unsqueeze(0) if queries.dim() == 2 else queries
    if engine not in SEARCH_ENGINES:
        raise MaxMatchError(f"unknown search engine '{engine}'",
                            hint="use engine=" + " or ".join(repr(name) for name in SEARCH_ENGINES))
    return SEARCH_ENGINES[engine].search(sets, queries, k, kind, options, element_index=element_index,
                                         candidates=candidates, nprobe=nprobe, query_side=query_side, device=device,
                                         block_size=block_size)
