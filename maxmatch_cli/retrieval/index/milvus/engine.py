"""The ``milvus`` search engine: builds through :mod:`.building`, searches through :mod:`.search`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.faiss_engine import _rerank
from maxmatch_cli.retrieval.index.format import IDS_FILE, SETS_FILE, TEXTS_FILE
from maxmatch_cli.retrieval.index.interface import check_nlist
from maxmatch_cli.retrieval.index.metadata import PATHS_FILE
from maxmatch_cli.retrieval.index.milvus.building import STATE_FILE, _claim, build_collection
from maxmatch_cli.retrieval.index.milvus.connection import (URI_HINT, _pymilvus, check_collection_name,
                                                            check_index_type, connect, normalize_uri)
from maxmatch_cli.retrieval.index.milvus.search import MilvusCollection, milvus_candidates


class MilvusEngine:
    """Milvus candidates re-ranked exactly (a :class:`~maxmatch_cli.retrieval.index.interface.SearchEngine`)."""

    name = "milvus"
    auto_rank = 2  # an index whose vectors are in Milvus can only be searched there
    files = (STATE_FILE,)
    resumable_files = (STATE_FILE,)  # kept by a resumed build
    local_sets = False  # the published folder has no sets.npy

    def check_build(self, nlist: int | None, **options: Any) -> None:
        _pymilvus()
        check_nlist(nlist)
        if not options.get("uri"):
            raise MaxMatchError("--engine milvus needs --uri", hint=URI_HINT)
        normalize_uri(options["uri"])
        check_index_type(options.get("index_type"), options["uri"])
        if options.get("collection") is not None:
            check_collection_name(options["collection"])

    def prepare(self, options: dict[str, Any], identity: dict[str, Any]) -> None:
        """Before anything is encoded: connect (a bad URI or a silent server fails here) and refuse a collection of
        another build unless ``overwrite``."""
        pymilvus = _pymilvus()
        client = connect(options["uri"], options.get("token"), options.get("db"))
        name = options["collection"]
        try:
            if client.has_collection(name):
                _claim(client, name, identity, options, True)
        except pymilvus.exceptions.MilvusException as exc:
            raise MaxMatchError(f"Milvus at {options['uri']} failed on collection '{name}' ({exc.message})",
                                hint="check that the server is up (README, 'Galleries in Milvus')") from None

    def build(self, folder: Path, nlist: int | None, **options: Any) -> dict[str, Any]:
        sets = np.load(folder / SETS_FILE, mmap_mode="r")
        ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
        texts_file = folder / TEXTS_FILE
        texts = json.loads(texts_file.read_text(encoding="utf-8")) if texts_file.is_file() else None
        paths_file = folder / PATHS_FILE  # image files, where the feature file lists them
        paths = json.loads(paths_file.read_text(encoding="utf-8")) if paths_file.is_file() else None
        return build_collection(sets, ids, texts, folder / STATE_FILE, nlist=nlist, paths=paths, **options)

    def usable(self, index: Any) -> bool:
        return getattr(index, "milvus", None) is not None

    def open(self, index: Any, device: str | torch.device) -> Any:
        if getattr(index, "milvus", None) is None:
            raise MaxMatchError(f"index {index.path} is not in Milvus",
                                hint="rebuild it with `maxmatch index ... --engine milvus --uri URI`, or use "
                                     "--engine exact")
        return index.milvus

    def search(self, sets: Any, queries: torch.Tensor, k: int, kind: str, options: dict[str, Any], *,
               element_index: Any, candidates: int | None, nprobe: int | None, query_side: str,
               device: str | torch.device, block_size: int | None) -> Any:
        from maxmatch_cli.retrieval.api import Ranking

        if not isinstance(element_index, MilvusCollection):
            raise MaxMatchError(f"search engine '{self.name}' needs a Milvus collection",
                                hint="open the index with load_index (built with --engine milvus)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. k=10")
        coll = element_index
        k = min(k, coll.n_items)
        pools = milvus_candidates(coll, queries, candidates, nprobe)
        rows = np.unique(np.concatenate(pools)) if pools else np.zeros(0, dtype=np.int64)
        local = coll.fetch(rows)
        ranking = _rerank(local, queries, [np.searchsorted(rows, p) for p in pools], k, kind, options, query_side,
                          device)
        found = ranking.indices
        mapped = torch.where(found >= 0, torch.from_numpy(rows)[found.clamp(min=0)] if len(rows) else found, found)
        return Ranking(mapped, ranking.scores)
