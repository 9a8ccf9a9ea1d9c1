"""The ``milvus`` engine: the set elements in a Milvus collection, candidates from Milvus, exact re-ranking here.

Optional (``pip install -e '.[milvus]'``: pymilvus and milvus-lite). ``--uri FILE.db`` builds into milvus-lite,
an embedded Milvus in this process that keeps its data in the folder FILE.db; ``--uri http://HOST:19530`` (with
``--token`` and ``--db`` where the server needs them) builds into a Milvus server or cluster with the same code.

The collection holds one row per set element (Milvus has no multi-vector field): the primary key
``set_id * K + position``, the set id (the index row), the element position, the L2-normalised element as a
float vector (metric COSINE), and on each set's element 0 its item id and caption (``""`` for images). Its
properties record the build's identity, the checkpoint fingerprint, K, D and whether the build completed. The
local index folder keeps the manifest (URI, database, collection, K, D, metric, fingerprint), ids.json and
texts.json; the vectors live only in Milvus (no sets.npy).

A search asks Milvus, per query element, for its nearest gallery elements (the depth of the faiss engine's rule,
:func:`~maxmatch_cli.retrieval.index.faiss_engine.default_candidates`, or ``candidates``), groups them by set,
fetches those sets' element vectors back from Milvus and scores them exactly
(:func:`~maxmatch_cli.retrieval.index.faiss_engine._rerank`). Scores are exact; recall is approximate (an exact
``FLAT`` index at full depth returns the exact engine's results).

A build inserts the encoded sets in batches and records, after each flush, how many sets are durably in the
collection (``milvus.json`` in the partial folder); a re-run after a crash deletes the rows past that point
(rows inserted but not recorded) and continues, so no row is inserted twice. The collection is marked complete
and the local manifest written only at the end; a search refuses a collection that is not complete, not of the
manifest's build, or not of the expected size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.faiss_engine import DEFAULT_NPROBE, _rerank, default_candidates, default_nlist
from maxmatch_cli.retrieval.index.format import IDS_FILE, SETS_FILE, TEXTS_FILE
from maxmatch_cli.retrieval.index.interface import check_depth, check_nlist
from maxmatch_cli.retrieval.index.metadata import PATHS_FILE

STATE_FILE = "milvus.json"
"""In a partial build folder: the collection being filled and how many sets are flushed into it."""
INSERT_BATCH = 1024
"""Sets inserted per request (K rows each)."""
FLUSH_ROWS = 1 << 18
"""Rows inserted between flushes (a flush makes them durable and is the resume point)."""
FLAT_MAX_ELEMENTS = 100_000
"""Up to this many elements the default index is exact (``FLAT``); above it ``IVF_FLAT``."""
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX")
"""Index types milvus-lite 3.2 builds (all but FLAT need faiss-cpu); a Milvus server takes others too."""
MAX_TOPK = 16384
"""Milvus's limit on results per search vector and rows per query request."""
DEFAULT_TIMEOUT = 10.0
"""Seconds a Milvus request may take before the server counts as not answering."""
TOKEN_ENV = "MAXMATCH_MILVUS_TOKEN"
"""Environment variable read for the token when none is passed (keeps it out of shell history)."""
DELAY_ENV = "MAXMATCH_MILVUS_TEST_DELAY"
"""Test hook: seconds to sleep after each inserted batch (to kill a build mid-way)."""
FLUSH_ENV = "MAXMATCH_MILVUS_TEST_FLUSH_ROWS"
"""Test hook: overrides :data:`FLUSH_ROWS`."""
URI_HINT = "pass --uri FILE.db (milvus-lite: a local folder, no server) or --uri http://HOST:19530 (a Milvus server)"
PROP = "maxmatch."


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


# ----------------------------------------------------------------------------------------------- connecting


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MaxMatchError("the milvus engine needs the pymilvus package (and milvus-lite for a .db file), which "
                            "is not installed", hint="pip install -e '.[milvus]', or use --engine exact") from None
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its RPC errors become our MaxMatchError
    return pymilvus


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a milvus-lite file (no scheme) rather than a server."""
    return "://" not in uri and not uri.startswith("unix:")


def normalize_uri(uri: str) -> str:
    """A server URI as given; a milvus-lite file as an absolute path ending in ``.db`` whose folder exists.

    Raises:
        MaxMatchError: a scheme Milvus does not take, a file not ending in ``.db``, a missing parent folder.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise MaxMatchError(f"Milvus URI {uri!r} is empty", hint=URI_HINT)
    if not is_local(uri):
        scheme = uri.split(":", 1)[0].lower()
        if scheme not in ("http", "https", "tcp", "unix"):
            raise MaxMatchError(f"Milvus URI {uri} has the scheme '{scheme}', which Milvus does not take",
                                hint=URI_HINT)
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise MaxMatchError(f"Milvus URI {uri} is neither a server (http://...) nor a milvus-lite file (*.db)",
                            hint=URI_HINT)
    if not path.parent.is_dir():
        raise MaxMatchError(f"the folder of milvus-lite file {uri} does not exist ({path.parent})",
                            hint="create it, or choose another --uri")
    return str(path)


_CLIENTS: dict[tuple[str, str, str], Any] = {}


def connect(uri: str, token: str | None = None, db: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A :class:`pymilvus.MilvusClient` on ``uri`` (cached per URI, token and database; a milvus-lite file is
    served in this process).

    Raises:
        MaxMatchError: a URI Milvus refuses, a server that does not answer within ``timeout``, a bad token or db.
    """
    pymilvus = _pymilvus()
    uri = normalize_uri(uri)
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    key = (uri, token or "", db or "")
    if key in _CLIENTS:
        return _CLIENTS[key]
    where = f"milvus-lite file {uri}" if is_local(uri) else f"Milvus server {uri}"
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token or "", db_name=db or "", timeout=timeout)
        client.list_collections(timeout=timeout)
    except pymilvus.exceptions.ConnectionConfigException as exc:
        raise MaxMatchError(f"cannot open {where}: {exc.message}", hint=URI_HINT) from None
    except pymilvus.exceptions.MilvusException as exc:
        raise MaxMatchError(f"{where} does not answer ({exc.message})",
                            hint="start it (README, 'Galleries in Milvus'), check the host and port, and --token / --db "
                                 f"(or ${TOKEN_ENV})") from None
    _CLIENTS[key] = client
    return client


def check_collection_name(name: str) -> str:
    """Refuse a name Milvus would refuse (letters, digits and underscores, not starting with a digit)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise MaxMatchError(f"'{name}' is not a Milvus collection name",
                            hint="use letters, digits and underscores, starting with a letter (--collection)")
    return name


def collection_for(out: Path) -> str:
    """The default collection of an index folder: ``maxmatch_``, the folder's name (other characters as ``_``) and 8
    hex digits of its absolute path, so folders of one name in different places get their own collections."""
    where = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return f"maxmatch_{re.sub(r'[^A-Za-z0-9_]', '_', Path(out).name)[:200]}_{where}"


def check_index_type(index_type: str | None, uri: str) -> None:
    """Refuse an index type milvus-lite does not build (a server decides for itself)."""
    if index_type is None:
        return
    if not isinstance(index_type, str) or not re.fullmatch(r"[A-Z0-9_]+", index_type):
        raise MaxMatchError(f"'{index_type}' is not a Milvus index type",
                            hint=f"use one of {', '.join(LITE_INDEX_TYPES)} (upper case)")
    if is_local(uri) and index_type not in LITE_INDEX_TYPES:
        raise MaxMatchError(f"milvus-lite does not build index type {index_type}",
                            hint=f"use one of {', '.join(LITE_INDEX_TYPES)}, or a Milvus server")


def default_index_type(n_elements: int) -> str:
    """``FLAT`` (exact) up to :data:`FLAT_MAX_ELEMENTS` elements, ``IVF_FLAT`` above."""
    return "FLAT" if n_elements <= FLAT_MAX_ELEMENTS else "IVF_FLAT"


# ----------------------------------------------------------------------------------------------- building


def _props(client: Any, name: str) -> dict[str, str]:
    props = client.describe_collection(name).get("properties") or {}
    return {key[len(PROP):]: str(value) for key, value in props.items() if key.startswith(PROP)}


def _claim(client: Any, name: str, identity: dict[str, Any], options: dict[str, Any], resumable: bool) -> str:
    """What to do with an existing collection ``name``: ``resume`` (this build's, with local progress), ``drop``
    (this build's without it, or any with ``overwrite``).

    Raises:
        MaxMatchError: the collection holds another build (another checkpoint, dimension or gallery) or is not
            a maxmatch collection, and ``overwrite`` is not given.
    """
    props = _props(client, name)
    if props.get("build") == identity["build"] and props.get("out", "") == identity.get("out", ""):
        return "resume" if resumable else "drop"  # this build's, for this index folder
    if options.get("overwrite"):
        return "drop"
    if not props:
        what = "a collection maxmatch did not write"
    elif props.get("fingerprint") != identity["fingerprint"]:
        what = f"an index built from another checkpoint (fingerprint {props.get('fingerprint', '?')[:12]}…)"
    elif (props.get("K"), props.get("D")) != (str(identity["K"]), str(identity["D"])):
        what = f"an index of another shape (K={props.get('K')}, D={props.get('D')}; this build K={identity['K']}, " \
               f"D={identity['D']})"
    elif props.get("build") == identity["build"]:
        what = f"the same gallery for another index folder ({props.get('out') or '?'})"
    else:
        what = "an index of another gallery (feature file, split or kind)"
    raise MaxMatchError(f"Milvus collection '{name}' at {options['uri']} already holds {what}",
                        hint="choose another --collection, or pass --overwrite to replace it")


def _schema(pymilvus: Any, d: int) -> Any:
    dt = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", dt.INT64, is_primary=True)
    schema.add_field("set_id", dt.INT64)
    schema.add_field("position", dt.INT16)
    schema.add_field("vector", dt.FLOAT_VECTOR, dim=d)
    schema.add_field("item_id", dt.VARCHAR, max_length=1024)
    schema.add_field("text", dt.VARCHAR, max_length=8192)
    schema.add_field("path", dt.VARCHAR, max_length=4096)
    return schema


def _read_state(path: Path, identity: dict[str, Any], uri: str, name: str) -> int:
    """Sets flushed into collection ``name`` by an earlier attempt of this build (0 if none recorded)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if state.get("build") != identity["build"] or state.get("uri") != uri or state.get("collection") != name:
        return 0
    return int(state.get("flushed", 0))


def _write_state(path: Path, identity: dict[str, Any], uri: str, name: str, flushed: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"build": identity["build"], "uri": uri, "collection": name, "flushed": flushed})
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _open_for_build(client: Any, pymilvus: Any, name: str, identity: dict[str, Any], options: dict[str, Any],
                    flushed: int) -> int:
    """Collection ``name`` ready to take rows from set ``flushed`` on (rows past it deleted; created or recreated
    when there is nothing to resume); returns the set to start from."""
    if client.has_collection(name):
        if _claim(client, name, identity, options, flushed > 0) == "resume":
            client.delete(name, filter=f"set_id >= {flushed}")  # inserted but not recorded as flushed
            client.alter_collection_properties(name, properties={PROP + "complete": "0"})
            return flushed
        client.drop_collection(name)
    props = {PROP + "build": identity["build"], PROP + "fingerprint": identity["fingerprint"],
             PROP + "K": str(identity["K"]), PROP + "D": str(identity["D"]), PROP + "complete": "0",
             PROP + "out": identity.get("out", "")}
    client.create_collection(name, schema=_schema(pymilvus, identity["D"]), properties=props)
    return 0


def build_collection(sets: np.ndarray, ids: list[Any], texts: list[str] | None, state_file: Path, *, uri: str,
                     collection: str, identity: dict[str, Any], token: str | None = None, db: str | None = None,
                     index_type: str | None = None, nlist: int | None = None, batch_size: int = INSERT_BATCH,
                     overwrite: bool = False, show_progress: bool = True,
                     paths: list[str] | None = None) -> dict[str, Any]:
    """Insert ``sets`` ``(N, K, D)`` (L2-normalised elements) with their ids, captions and image files into Milvus
    collection ``collection``, index and load it, mark it complete; resumable through ``state_file``.

    ``identity``: ``build`` (a hash naming this build), ``fingerprint`` (the checkpoint's), ``K``, ``D`` and
    ``out`` (the index folder it is for: two folders never share a collection unless ``overwrite`` says so).

    Returns:
        The manifest's ``element_index`` record.
    """
    pymilvus = _pymilvus()
    n, k, d = sets.shape
    uri = normalize_uri(uri)
    check_index_type(index_type, uri)
    index_type = index_type or default_index_type(n * k)
    check_nlist(nlist, n * k)
    client = connect(uri, token, db)
    options = {"uri": uri, "overwrite": overwrite}
    flushed = _read_state(state_file, identity, uri, collection)
    try:
        start = _open_for_build(client, pymilvus, collection, identity, options, flushed)
        _write_state(state_file, identity, uri, collection, start)
        _insert(client, collection, sets, (ids, texts, paths), start, batch_size,
                lambda done: _write_state(state_file, identity, uri, collection, done), show_progress)
        params = _make_index(client, collection, index_type, nlist, n * k)
        count = _count(client, collection)
        if count != n * k:
            raise MaxMatchError(f"Milvus collection '{collection}' holds {count:,} rows after the build, not {n * k:,}",
                                hint="something else writes into it; choose another --collection and rebuild")
        client.alter_collection_properties(collection, properties={PROP + "complete": "1"})
    except pymilvus.exceptions.MilvusException as exc:
        raise MaxMatchError(f"Milvus at {uri} failed while building collection '{collection}' ({exc.message})",
                            hint="fix the cause and run the same command again: it resumes after the sets "
                                 "already flushed into the collection") from None
    state_file.unlink(missing_ok=True)
    import pymilvus as _pm

    try:
        from milvus_lite import __version__ as lite_version
    except ImportError:
        lite_version = None
    return {"kind": "milvus", "uri": uri, "db": db or "", "collection": collection, "metric": "COSINE",
            "index_type": index_type, "index_params": params, "n_elements": n * k, "build": identity["build"],
            "pymilvus_version": _pm.__version__, **({"milvus_lite_version": lite_version} if is_local(uri) else {})}


def _insert(client: Any, name: str, sets: np.ndarray, meta: tuple[list[Any], Any, Any], start: int,
            batch_size: int, record, show_progress: bool) -> None:
    """Insert sets ``start..N`` in batches; flush every :data:`FLUSH_ROWS` rows and at the end, recording each
    flush with ``record(sets flushed)``."""
    from maxmatch_cli.progress import make_progress

    n, k, _ = sets.shape
    flush_rows = int(os.environ.get(FLUSH_ENV) or FLUSH_ROWS)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    pending = 0
    with make_progress(transient=True) as progress:
        task = progress.add_task("inserting into Milvus", total=n, completed=start, unit="set",
                                 status=f"resumed at {start:,}" if start else "", visible=show_progress)
        for lo in range(start, n, batch_size):
            hi = min(n, lo + batch_size)
            client.insert(name, _rows(sets, *meta, lo, hi))
            pending += (hi - lo) * k
            if pending >= flush_rows or hi == n:
                client.flush(name)
                record(hi)
                pending = 0
            progress.advance(task, hi - lo)
            if delay:
                time.sleep(delay)


def _rows(sets: np.ndarray, ids: list[Any], texts: list[str] | None, paths: list[str] | None, lo: int,
          hi: int) -> list[dict[str, Any]]:
    k = sets.shape[1]
    block = np.asarray(sets[lo:hi], dtype=np.float32)
    rows = []
    for i in range(lo, hi):
        for p in range(k):
            first = p == 0
            rows.append({"pk": i * k + p, "set_id": i, "position": p, "vector": block[i - lo, p],
                         "item_id": json.dumps(ids[i], ensure_ascii=False) if first else "",
                         "text": (texts[i] if texts is not None else "") if first else "",
                         "path": str(paths[i] or "") if first and paths is not None else ""})
    return rows


def _make_index(client: Any, name: str, index_type: str, nlist: int | None, n_elements: int) -> dict[str, Any]:
    """Build the vector index (unless this build made it already) and load the collection."""
    params: dict[str, Any] = {}
    if index_type.startswith("IVF"):
        params["nlist"] = nlist or default_nlist(n_elements)
    elif index_type.startswith("HNSW"):
        params.update(M=16, efConstruction=200)
    if not client.list_indexes(name, field_name="vector"):
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=index_type, metric_type="COSINE", params=params)
        client.create_index(name, index_params)
    client.load_collection(name)
    return params


def _count(client: Any, name: str) -> int:
    return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


# ----------------------------------------------------------------------------------------------- searching


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
