"""Searching a Milvus collection: open and check it, fetch set vectors back, candidates per query element."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.faiss_engine import DEFAULT_NPROBE, default_candidates
from maxmatch_cli.retrieval.index.interface import check_depth
from maxmatch_cli.retrieval.index.milvus.connection import _count, _props, _pymilvus, connect

MAX_TOPK = 16384
"""Milvus's limit on results per search vector and rows per query request."""


@dataclass
class MilvusCollection:
    """An index's collection, opened and checked: what the engine searches and fetches vectors from."""

    client: Any
    name: str
    uri: str
    n_items: int
    k: int
    d: int
    index_type: str
    index_params: dict[str, Any]

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), K, D)`` float32 element vectors of the sets ``rows`` (unique), in that order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.zeros((len(rows), self.k, self.d), dtype=np.float32)
        where = {int(r): i for i, r in enumerate(rows)}
        step = max(1, MAX_TOPK // self.k)
        for lo in range(0, len(rows), step):
            # By primary key (set_id * K + position): a key lookup, where a filter on set_id scans the collection
            # (3.5x slower for 508 sets of a 50K-set milvus-lite collection, more as it grows).
            keys = [int(r) * self.k + p for r in rows[lo: lo + step] for p in range(self.k)]
            got = _call(self, "get", self.name, ids=keys, output_fields=["set_id", "position", "vector"])
            fast = _columns(got, self.d)
            if fast is not None:
                set_ids, positions, vectors = fast
                out[[where[int(r)] for r in set_ids], positions] = vectors
                continue
            for hit in got:
                out[where[int(hit["set_id"])], int(hit["position"])] = hit["vector"]
        return out

    def metadata(self, row: int) -> dict[str, Any]:
        """``id``, ``text`` (caption) and ``path`` (image file) of set ``row`` as the collection holds them (empty
        strings where unknown)."""
        got = _call(self, "query", self.name, filter=f"set_id == {int(row)} and position == 0",
                    output_fields=["item_id", "text", "path"], limit=1)
        return {"id": json.loads(got[0]["item_id"]), "text": got[0]["text"], "path": got[0]["path"]}


def _columns(got: Any, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(set ids, positions, vectors)`` of a query result read as columns: pymilvus decodes a float vector per row
    in Python (a quarter of a milvus-lite fetch); its result list keeps the vector column as one protobuf array.
    None where this pymilvus lays its results out otherwise (then the rows are read one by one)."""
    try:
        column = next(f for f in got._lazy_field_data if f.field_name == "vector")
        vectors = np.asarray(column.vectors.float_vector.data, dtype=np.float32).reshape(-1, d)
        raw = [list.__getitem__(got, i) for i in range(len(got))]  # the eager fields only
        set_ids = np.array([row["set_id"] for row in raw], dtype=np.int64)
        positions = np.array([row["position"] for row in raw], dtype=np.int64)
    except (AttributeError, KeyError, StopIteration, TypeError, ValueError):
        return None
    return (set_ids, positions, vectors) if len(vectors) == len(raw) else None


def _call(coll: MilvusCollection, method: str, *args: Any, **kwargs: Any) -> Any:
    pymilvus = _pymilvus()
    try:
        return getattr(coll.client, method)(*args, **kwargs)
    except pymilvus.exceptions.MilvusException as exc:
        raise MaxMatchError(f"Milvus at {coll.uri} failed on collection '{coll.name}' ({exc.message})",
                            hint="check that the server is up (README, 'Galleries in Milvus')") from None


class MilvusSets:
    """The ``(N, K, D)`` sets of a Milvus index, as far as an index reads them: shape, length, and rows fetched
    from the collection by index (an int, a slice or an array of rows)."""

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, coll: MilvusCollection):
        self.coll = coll
        self.shape = (coll.n_items, coll.k, coll.d)

    def __len__(self) -> int:
        return self.coll.n_items

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.coll.fetch(np.array([int(key)]))[0]
        rows = np.arange(self.coll.n_items)[key]
        uniq, inverse = np.unique(rows, return_inverse=True)
        return self.coll.fetch(uniq)[inverse.reshape(rows.shape)]


def open_collection(record: dict[str, Any], n_items: int, k: int, d: int, fingerprint: str, index_path: Path,
                    token: str | None = None) -> MilvusCollection:
    """The collection a manifest's ``element_index`` record names, checked to be the complete collection of that
    build (its build id, fingerprint, K, D, row count).

    Raises:
        MaxMatchError: Milvus does not answer, the collection is missing, incomplete, or of another build.
    """
    pymilvus = _pymilvus()
    uri, name = record["uri"], record["collection"]
    client = connect(uri, token, record.get("db") or None)
    rebuild = f"rebuild it with `maxmatch index ... --engine milvus --uri {uri} --out {index_path} --overwrite`"
    try:
        if not client.has_collection(name):
            raise MaxMatchError(f"index {index_path}: Milvus at {uri} has no collection '{name}'",
                                hint=f"it was dropped or the index points at another server; {rebuild}")
        props = _props(client, name)
        if props.get("build") != record.get("build") or props.get("fingerprint") != fingerprint \
                or (props.get("K"), props.get("D")) != (str(k), str(d)):
            raise MaxMatchError(f"index {index_path}: Milvus collection '{name}' at {uri} now holds another build "
                                f"than this index's", hint=rebuild)
        if props.get("complete") != "1":
            raise MaxMatchError(f"index {index_path}: Milvus collection '{name}' at {uri} is only partly built",
                                hint="let its build finish (run the same `maxmatch index` command again to resume), "
                                     "then query")
        client.load_collection(name)
        count = _count(client, name)
    except pymilvus.exceptions.MilvusException as exc:
        raise MaxMatchError(f"index {index_path}: Milvus at {uri} failed on collection '{name}' ({exc.message})",
                            hint="check that the server is up (README, 'Galleries in Milvus')") from None
    if count != n_items * k:
        raise MaxMatchError(f"index {index_path}: Milvus collection '{name}' holds {count:,} rows, not "
                            f"{n_items * k:,} ({n_items:,} sets of {k})", hint=rebuild)
    return MilvusCollection(client, name, uri, n_items, k, d, record.get("index_type", "FLAT"),
                            dict(record.get("index_params") or {}))


def milvus_depth(coll: MilvusCollection, candidates: int | None = None,
                 nprobe: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(elements fetched per query element, Milvus search params)``: :func:`default_candidates` of the gallery
    (or ``candidates``) capped by the element count and :data:`MAX_TOPK`; ``nprobe`` (IVF, default
    :data:`DEFAULT_NPROBE`, capped at nlist) or ``ef`` (HNSW, at least the depth)."""
    check_depth(candidates, nprobe)
    n_elements = coll.n_items * coll.k
    fetch = min(candidates if candidates is not None else default_candidates(coll.n_items), n_elements, MAX_TOPK)
    params: dict[str, Any] = {}
    if coll.index_type.startswith("IVF"):
        params["nprobe"] = min(nprobe or DEFAULT_NPROBE, int(coll.index_params.get("nlist", DEFAULT_NPROBE)))
    elif coll.index_type.startswith("HNSW") or coll.index_type == "AUTOINDEX":
        params["ef"] = max(fetch, 64)
    return fetch, params


def milvus_candidates(coll: MilvusCollection, queries: torch.Tensor, candidates: int | None = None,
                      nprobe: int | None = None, group: int = 64) -> list[np.ndarray]:
    """Gallery rows owning the nearest elements of each query element, per query (sorted, unique)."""
    fetch, params = milvus_depth(coll, candidates, nprobe)
    q, kq, d = queries.shape
    if d != coll.d:
        raise MaxMatchError(f"query elements have D={d}, the Milvus collection D={coll.d}",
                            hint="query with the checkpoint the index was built with")
    flat = F.normalize(queries.float(), dim=-1).reshape(q * kq, d).numpy()
    found: list[list[int]] = []
    for lo in range(0, len(flat), group):
        got = _call(coll, "search", coll.name, data=[v for v in flat[lo: lo + group]], limit=fetch,
                    anns_field="vector", search_params={"metric_type": "COSINE", "params": params})
        found.extend([int(hit["pk"]) for hit in hits] for hits in got)
    return [np.unique(np.array([pk for j in range(i * kq, (i + 1) * kq) for pk in found[j]], dtype=np.int64)
                      // coll.k) for i in range(q)]
