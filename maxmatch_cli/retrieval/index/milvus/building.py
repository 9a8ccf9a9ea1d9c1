"""Building a Milvus collection: one row per set element, inserted in batches, flushed, resumable after a crash."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.faiss_engine import default_nlist
from maxmatch_cli.retrieval.index.interface import check_nlist
from maxmatch_cli.retrieval.index.milvus.connection import (PROP, _count, _props, _pymilvus, check_index_type, connect,
                                                            default_index_type, is_local, normalize_uri)

STATE_FILE = "milvus.json"
"""In a partial build folder: the collection being filled and how many sets are flushed into it."""
INSERT_BATCH = 1024
"""Sets inserted per request (K rows each)."""
FLUSH_ROWS = 1 << 18
"""Rows inserted between flushes (a flush makes them durable and is the resume point)."""
DELAY_ENV = "MAXMATCH_MILVUS_TEST_DELAY"
"""Test hook: seconds to sleep after each inserted batch (to kill a build mid-way)."""
FLUSH_ENV = "MAXMATCH_MILVUS_TEST_FLUSH_ROWS"
"""Test hook: overrides :data:`FLUSH_ROWS`."""


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
                            hint="fix the cause (is the server up?) and run the same command again: it resumes "
                                 "after the sets already flushed into the collection") from None
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
