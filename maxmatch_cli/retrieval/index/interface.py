"""What a search engine of an index provides, and the search options every engine accepts.

An engine answers "the ``k`` best gallery sets for each query set" over an index's memory-mapped sets, possibly
with a structure of its own built next to them (the faiss engine's element index). The engines are listed by
name in :data:`maxmatch_cli.retrieval.index.engines.SEARCH_ENGINES`.

An engine that stores the vectors elsewhere (the milvus engine: a Milvus collection) also takes its build options
as keywords of :meth:`SearchEngine.check_build` and :meth:`SearchEngine.build`, and may declare ``prepare(options,
identity)`` (run before anything is encoded), ``local_sets = False`` (the published folder has no sets.npy) and
``resumable_files`` (its files a resumed build keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from maxmatch_cli.errors import MaxMatchError


@runtime_checkable
class SearchEngine(Protocol):
    """A search engine: how an index is built for it and searched with it.

    Attributes:
        name: the engine's name (``--engine NAME``, the key of its table entry).
        auto_rank: ``--engine auto`` takes the usable engine of the highest rank.
        files: files the engine writes into an index folder (removed from a resumed build before it builds).
    """

    name: str
    auto_rank: int
    files: tuple[str, ...]

    def check_build(self, nlist: int | None) -> None:
        """Refuse, before anything is encoded, a build this engine cannot make (a missing package, options it
        does not take)."""

    def build(self, folder: Path, nlist: int | None) -> dict[str, Any] | None:
        """Build the engine's part from ``folder``'s finished sets.npy; returns the manifest's ``element_index``
        record, or None when the engine needs nothing beyond the sets."""

    def usable(self, index: Any) -> bool:
        """Whether ``index`` (an :class:`~maxmatch_cli.retrieval.index.folder.Index`) can be searched with this
        engine here (its part built, its package installed)."""

    def open(self, index: Any, device: str | torch.device) -> Any:
        """What :meth:`search` needs of ``index`` beyond its sets (passed as ``element_index``; None if nothing).

        Raises:
            MaxMatchError: the index was built without this engine's part.
        """

    def search(self, sets: Any, queries: torch.Tensor, k: int, kind: str, options: dict[str, Any], *,
               element_index: Any, candidates: int | None, nprobe: int | None, query_side: str,
               device: str | torch.device, block_size: int | None) -> Any:
        """The top-``k`` rows of ``sets`` ``(N, K, D)`` for each query set of ``queries`` ``(Q, K', D)`` (float32),
        scored exactly with similarity ``kind`` and its ``options``: a
        :class:`~maxmatch_cli.retrieval.api.Ranking` ``(Q, k)``."""


def check_depth(candidates: int | None, nprobe: int | None) -> None:
    """Refuse a ``candidates`` or ``nprobe`` that is given and not a positive integer (whatever the engine: a bad
    value is reported even where the exact engine would ignore it)."""
    for name, value in (("candidates", candidates), ("nprobe", nprobe)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MaxMatchError(f"{name} must be a positive integer, got {value!r}", hint=f"e.g. --{name} 64")


def check_nlist(nlist: int | None, n_vectors: int | None = None) -> None:
    """Refuse an ``nlist`` that is given and not an integer in 1..``n_vectors`` (the set elements, when known)."""
    hint = "leave --nlist unset for about the square root of the element count"
    if nlist is None:
        return
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise MaxMatchError(f"nlist must be a positive integer, got {nlist!r}", hint=hint)
    if n_vectors is not None and nlist > n_vectors:
        raise MaxMatchError(f"nlist={nlist} must lie in 1..{n_vectors} (the number of set elements)", hint=hint)
