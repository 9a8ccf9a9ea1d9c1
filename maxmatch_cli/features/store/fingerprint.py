"""Identities: of the arguments that made a store (for resuming) and of a store's contents (for provenance and the
embeddings cache).

A store's content hash covers every byte of every dataset (features, boxes, offsets, ids, sizes, files,
captions, splits, anything else written), so that any change of content changes it. Reading 33 GB at every
``evaluate`` is not an option, so the writer computes it while writing (a running hash of the features as they
are written, the small datasets read back at the end) and records it as the root attribute ``content_sha256``,
together with ``content_mtime_ns``: the modification time the writer then gives the finished file. A reader
trusts the recorded hash only while the file still has that modification time: any later write to the file (h5py
in ``r+`` mode included) gives it the time of that write instead. Otherwise (a file modified after it was
finished, one copied without keeping its times, or one written before the hash was recorded) the reader hashes
the whole file once, with a warning, and keeps the result in a small file beside it
(``<name>.content-hash.json``, valid while the store's size, modification time and inode are those it names);
where that folder is not writable the hash is computed at every open, and the warning says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import atomic_write, format_bytes

CONTENT_HASH_ATTR = "content_sha256"
CONTENT_STAMP_ATTR = "content_mtime_ns"
SIDECAR_SUFFIX = ".content-hash.json"
FEATURES = "images/features"
_READ_BYTES = 64 << 20  # bytes read at a time when hashing a dataset


def args_fingerprint(**arguments: Any) -> str:
    """A stable short hash of the arguments that define an extraction (for resume checks).

    Args:
        **arguments: JSON-serialisable values (paths should be given as strings, resolved by the caller).

    Returns:
        A 16-character hex string, equal for equal arguments in any order.
    """
    blob = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_fingerprint(store: Any) -> str:
    """The identity of a store's contents (independent of its path and timestamps), for provenance and caches.

    The defining attributes and sizes, and the content hash of every dataset (see the module docstring: the
    recorded one when the file is as its writer left it, else hashed once from the file).

    Args:
        store: an open :class:`~maxmatch_cli.features.store.reader.FeatureStore` (typed loosely because the
            reader imports this module).

    Returns:
        A 16-character hex string.
    """
    h = hashlib.sha256()
    header = {
        "schema_version": store.schema_version,
        "feature_kind": store.feature_kind,
        "source": store.source,
        "feature_dim": store.feature_dim,
        "layout": store.layout,
        "n_images": store.n_images,
        "n_captions": store.n_captions,
        "max_regions": store.max_regions,
        "splits": {name: [len(a), len(b)] for name, (a, b) in sorted(store._splits.items())},
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(store_content_hash(store._h5(), Path(store.path), store.complete).encode())
    return h.hexdigest()[:16]


def store_content_hash(f: h5py.File, path: Path, complete: bool = True) -> str:
    """The content hash of the open store ``f`` at ``path``: recorded, remembered beside it, or hashed now.

    Args:
        f: the store, open for reading.
        path: its path.
        complete: whether it is finished (an unfinished file is hashed as it is, and nothing is remembered).
    """
    st = os.stat(path)
    recorded = f.attrs.get(CONTENT_HASH_ATTR)
    stamp = f.attrs.get(CONTENT_STAMP_ATTR)
    if complete and recorded is not None and stamp is not None and int(stamp) == st.st_mtime_ns:
        return str(recorded)
    if not complete:
        return content_hash(dataset_digests(f))
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    remembered = _read_sidecar(sidecar, ident)
    if remembered is not None:
        return remembered
    why = ("it was written before feature files recorded one" if recorded is None
           else "it was modified after it was written, or copied without keeping its modification time")
    value = content_hash(dataset_digests(f))
    saved = _write_sidecar(sidecar, dict(ident, content_sha256=value))
    then = (f"remembered in {sidecar.name} until the file changes" if saved
            else f"{sidecar.parent} is not writable, so this happens at every use; copy the file where it is")
    warnings.warn(f"{path} has no valid recorded content hash ({why}); hashed its {format_bytes(st.st_size)} once "
                  f"({then})", stacklevel=2)
    return value


def _read_sidecar(sidecar: Path, ident: dict[str, int]) -> str | None:
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        if all(saved.get(k) == v for k, v in ident.items()) and isinstance(saved.get("content_sha256"), str):
            return saved["content_sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # missing, unreadable or foreign: hashed again
    return None


def _write_sidecar(sidecar: Path, values: dict[str, Any]) -> bool:
    try:
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(values, sort_keys=True), encoding="utf-8"))
    except (MaxMatchError, OSError):
        return False
    return True


def content_hash(digests: dict[str, list]) -> str:
    """SHA-256 (hex) of the ``{dataset name: [dtype, shape, sha256 of its bytes]}`` table, names sorted."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def dataset_digests(f: h5py.File, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """``{name: [dtype, shape, sha256 hex of its contents]}`` of every dataset in ``f`` except those in ``skip``.

    Numbers are hashed as their C-order bytes; strings as an 8-byte little-endian length and the stored bytes
    each (no decoding, so any bytes hash).
    """
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    out = {}
    for name in sorted(names):
        if name in skip:
            continue
        ds = f[name]
        h = hashlib.sha256()
        _hash_dataset(h, ds)
        out[name] = [str(ds.dtype), list(ds.shape), h.hexdigest()]
    return out


def _hash_dataset(h: Any, ds: h5py.Dataset) -> None:
    if ds.shape is None or ds.ndim == 0:
        _update(h, np.atleast_1d(ds[()]))
        return
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, _READ_BYTES // row_bytes)
    for start in range(0, ds.shape[0], step):
        _update(h, ds[start : start + step])


def _update(h: Any, values: np.ndarray) -> None:
    if values.dtype.kind == "O":
        for v in values.reshape(-1):
            raw = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    else:
        h.update(np.ascontiguousarray(values).tobytes())


class ContentHasher:
    """The writer's side: a running hash of the features as written, and the content hash recorded at the end."""

    def __init__(self) -> None:
        self._features = hashlib.sha256()

    @classmethod
    def of_prefix(cls, f: h5py.File, rows: int) -> ContentHasher:
        """A hasher that has seen the first ``rows`` rows (images in the fixed layout) of ``f``'s features, as a
        resumed writer keeps them (read back once: a resume then reads what it keeps)."""
        hasher = cls()
        if FEATURES in f and rows:
            ds = f[FEATURES]
            row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
            step = max(1, _READ_BYTES // row_bytes)
            for start in range(0, rows, step):
                hasher._features.update(np.ascontiguousarray(ds[start : min(start + step, rows)]).tobytes())
        return hasher

    def add(self, block: np.ndarray, dtype: np.dtype) -> None:
        """Count rows just written (in file order) as ``dtype``, the features dataset's type."""
        self._features.update(np.ascontiguousarray(block, dtype=dtype).tobytes())

    def record(self, f: h5py.File) -> int:
        """Hash the other datasets, write ``content_sha256`` and ``content_mtime_ns`` into ``f``'s root.

        Returns:
            The modification time (ns) the finished file must then be given (:func:`stamp_file`): a whole
            even second before now, which any file system stores exactly and no later write reproduces.
        """
        digests = dataset_digests(f, skip=(FEATURES,))
        if FEATURES in f:
            ds = f[FEATURES]
            digests[FEATURES] = [str(ds.dtype), list(ds.shape), self._features.hexdigest()]
        stamp = (int(time.time()) - 2) // 2 * 2 * 10**9
        f.attrs[CONTENT_HASH_ATTR] = content_hash(digests)
        f.attrs[CONTENT_STAMP_ATTR] = np.int64(stamp)
        return stamp


def stamp_file(path: Path, stamp_ns: int) -> None:
    """Give the finished store the modification time recorded in it (its content hash is trusted while it has it)."""
    try:
        os.utime(path, ns=(time.time_ns(), stamp_ns))
    except OSError:
        pass  # then readers hash the file once and remember it beside the file
