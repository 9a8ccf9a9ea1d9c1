"""Building an index: encode a gallery once, in bounded memory, resumably, and publish the folder whole.

A build streams: the gallery is encoded ``batch_size`` items at a time into a preallocated
:func:`numpy.lib.format.open_memmap`, so memory stays bounded whatever the gallery size. It writes into a hidden
folder next to the target (``.NAME.partial``), writes the manifest last and renames the folder into place, so a
failed or killed build never leaves a folder at the target path that looks complete (an interrupted
``--overwrite`` keeps the old index). The partial folder records after each batch how many rows are encoded
(``progress.json``, with the build's identity: checkpoint, feature file, split, kind, shard): the same command
run again resumes after them; a different build starts the folder afresh.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import DiskFullError, is_disk_full, reserve_space
from maxmatch_cli.locks import hold, lock_beside
from maxmatch_cli.retrieval.index.engines import SEARCH_ENGINES, build_engine
from maxmatch_cli.retrieval.index.folder import SETS_CHECK, Index, sets_check_record
from maxmatch_cli.retrieval.index.format import (ENGINE, FORMAT, FORMAT_VERSION, IDS_FILE, KINDS, MANIFEST_FILE,
                                                 SETS_FILE, TEXTS_FILE, checkpoint_fingerprint, json_value,
                                                 write_json)
from maxmatch_cli.retrieval.index.interface import check_nlist
from maxmatch_cli.retrieval.index.metadata import METADATA_KEY, item_metadata
from maxmatch_cli.retrieval.index.shards import parse_shard, shard_folders, shard_name, shard_rows

PROGRESS_FILE = "progress.json"
"""In a partial build folder: the build's identity and how many rows of sets.npy are encoded."""


def _one_build_at_a_time(build):
    """Hold the lock of the folder a build publishes (``.NAME.lock`` beside it, :mod:`maxmatch_cli.locks`) from
    before its checks until it is published or fails: a second build of the same folder is refused with the
    holder's pid, host and command instead of racing for the partial folder."""

    @functools.wraps(build)
    def locked(*args, **kwargs):
        bound = inspect.signature(build).bind(*args, **kwargs)
        out, shard = Path(bound.arguments["out"]), bound.arguments.get("shard")
        if shard is not None:
            out = out / shard_name(*(parse_shard(shard) if isinstance(shard, str) else shard))
        if out.parent.exists() and not out.parent.is_dir():
            return build(*args, **kwargs)  # its own checks name the file in the way
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MaxMatchError(f"cannot write to {out.parent}: {exc.strerror or exc}",
                                hint="choose an output folder you can write to (--out)") from None
        with hold(lock_beside(out), f"index {out}"):
            return build(*args, **kwargs)

    return locked


@_one_build_at_a_time
def build_index(checkpoint: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | None = None,
                split: str | None = None, kind: str = "images", device: str = "auto", batch_size: int | None = None,
                overwrite: bool = False, show_progress: bool = True, engine: str = "exact",
                nlist: int | None = None, shard: tuple[int, int] | str | None = None, *, uri: str | None = None,
                token: str | None = None, db: str | None = None, collection: str | None = None,
                index_type: str | None = None) -> Index:
    """Encode a split's images (or captions) once and write them as an index folder.

    Args:
        checkpoint: checkpoint file or run folder.
        out: the index folder to create.
        data: feature file (default: the checkpoint recipe's ``data.path``).
        split: split to index (default: the recipe's ``eval.split``).
        kind: ``images`` (a gallery for text queries) or ``captions``.
        device: where to encode.
        batch_size: items encoded (and written) at a time (default: the recipe's ``eval.batch_size``).
        overwrite: replace an index already at ``out`` (the old one stays until the new one is complete).
        show_progress: a progress bar.
        engine: ``exact`` (the sets only) or ``faiss`` (also a faiss element index for approximate candidate
            generation, :func:`~maxmatch_cli.retrieval.index.faiss_engine.build_element_index`); a name of
            :data:`~maxmatch_cli.retrieval.index.engines.SEARCH_ENGINES`.
        nlist: faiss: inverted lists (default :func:`~maxmatch_cli.retrieval.index.faiss_engine.default_nlist`).
        shard: ``(i, n)`` or ``"i/n"``: build only shard ``i`` (0-based) of ``n``, the contiguous rows
            :func:`~maxmatch_cli.retrieval.index.shards.shard_rows` of the split, into ``out/shard-i-of-n``
            (``out`` is the sharded index folder; :func:`~maxmatch_cli.retrieval.index.query.load_index` on it
            opens every shard as one :class:`~maxmatch_cli.retrieval.index.shards.ShardedIndex`).
        uri, token, db, collection, index_type: ``milvus``: where the element rows go (a milvus-lite ``FILE.db``
            or ``http://HOST:19530``), the server's token and database, the collection (default
            :func:`~maxmatch_cli.retrieval.index.milvus.connection.collection_for` ``out``) and its vector index type
            (default by size, :func:`~maxmatch_cli.retrieval.index.milvus.connection.default_index_type`).

    Returns:
        The written :class:`~maxmatch_cli.retrieval.index.folder.Index` (the shard's, with ``shard``).

    Raises:
        MaxMatchError: bad inputs, an existing ``out`` without ``overwrite``, or a folder that cannot be written.
    """
    spec, milvus = _check_options(kind, engine, nlist, batch_size, Path(out), shard, overwrite, uri=uri, token=token,
                                  db=db, collection=collection, index_type=index_type)
    from maxmatch_cli.devices import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device  # a bad name before the model loads
    out, shard = _target(Path(out), shard, overwrite)
    gallery = _open_gallery(checkpoint, device, data, split, kind, shard)
    batch_size = batch_size or gallery.model.recipe.eval.batch_size
    n, k, d = gallery.shape
    check_nlist(nlist, n * k)  # before any encoding

    from maxmatch_cli.features.images import extraction_of

    extraction = extraction_of(gallery.store)  # how image files can be encoded for queries (None: not from files)
    fingerprints = checkpoint_fingerprint(gallery.model.checkpoint), gallery.store.fingerprint()
    build_id = _build_id(gallery, fingerprints)
    if milvus:  # before any encoding: the server answers, and its collection is free or this build's
        milvus["identity"] = {"build": build_id, "fingerprint": fingerprints[0], "K": k, "D": d,
                              "out": str(out.resolve())}
        spec.prepare(milvus, milvus["identity"])
    tmp, done = _open_partial(out, build_id)
    try:
        _encode_into(tmp, build_id, done, gallery.model, gallery.store, kind, gallery.rows, gallery.texts,
                     batch_size, show_progress)
        metadata_files = _write_item_files(tmp, spec, gallery)
        element_index = spec.build(tmp, nlist, batch_size=batch_size, show_progress=show_progress, **milvus) \
            if milvus else spec.build(tmp, nlist)
        local_sets = getattr(spec, "local_sets", True)
        manifest = _manifest(tmp, gallery, element_index, local_sets, metadata_files, fingerprints, extraction)
        _complete(tmp, out, manifest, local_sets)
    except OSError as exc:  # disk full, permissions: the rows so far stay, and a re-run resumes after them
        raise _build_failed(exc, out, tmp, kind) from None
    # Any other interruption (Ctrl-C, a crash) also leaves the partial folder for the same command to resume.
    return Index.open(out, milvus.get("token"))


@dataclass
class _Gallery:
    """What a build encodes: the checkpoint's model, the feature file, and the rows of its split's items."""

    model: Any
    store: Any
    split: str
    kind: str
    rows: np.ndarray
    shard_record: dict[str, Any] | None
    """The manifest's record of the shard (None for an unsharded index)."""
    ids: list[Any]
    """The items' ids: image ids, or caption rows of the store."""
    texts: list[str] | None
    """The captions (a captions index), else None."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(items, K, D)`` of sets.npy."""
        return len(self.rows), self.model.num_embeds, self.model.embed_dim


def _check_options(kind: str, engine: str, nlist: int | None, batch_size: int | None, out: Path, shard: Any,
                   overwrite: bool, **milvus_options: Any) -> tuple[Any, dict[str, Any]]:
    """The engine's spec and its milvus build options ({} for other engines), once the options are checked
    (before the model loads). ``milvus_options``: ``uri``, ``token``, ``db``, ``collection``, ``index_type``."""
    if kind not in KINDS:
        raise MaxMatchError(f"unknown index kind '{kind}'", hint="use --kind images or --kind captions")
    spec = build_engine(engine)
    milvus = _milvus_options(engine, **milvus_options, out=out, shard=shard, overwrite=overwrite)
    spec.check_build(nlist, **milvus) if milvus else spec.check_build(nlist)
    if batch_size is not None and batch_size < 1:
        raise MaxMatchError(f"batch size must be positive, got {batch_size}", hint="e.g. --batch-size 256")
    return spec, milvus


def _open_gallery(checkpoint: str | os.PathLike, device: Any, data: str | os.PathLike | None, split: str | None,
                  kind: str, shard: tuple[int, int] | None) -> _Gallery:
    """Load the checkpoint, open its feature file (or ``data``) and pick the split's rows to encode (the shard's),
    their ids and texts; an images index's features are checked to be the ones the checkpoint reads."""
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.retrieval.api import load

    model = load(checkpoint, device)
    recipe = model.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    rows, shard_record = _gallery_rows(store, split, kind, shard)
    if kind == "images":
        from maxmatch_cli.evaluation.encoding import check_features

        check_features(_Ckpt(model.checkpoint, recipe), store)
        ids = [json_value(v) for v in np.asarray(store.image_ids)[rows]]
        texts = None
    else:
        ids = [int(v) for v in rows]
        texts = store.captions_text(rows)
    return _Gallery(model, store, split, kind, rows, shard_record, ids, texts)


def _build_id(gallery: _Gallery, fingerprints: tuple[str, str]) -> str:
    """The build's identity: a partial folder (or a Milvus collection) of the same id is this build's to resume."""
    ckpt_fp, data_fp = fingerprints
    return hashlib.sha256(json.dumps([FORMAT_VERSION, ckpt_fp, data_fp, gallery.split, gallery.kind,
                                      gallery.shard_record, *gallery.shape], sort_keys=True).encode()).hexdigest()


def _write_item_files(tmp: Path, spec: Any, gallery: _Gallery) -> list[str]:
    """Write the items' ids, metadata (image files or caption owners, for showing results) and texts into the
    partial folder, with another engine's files of an earlier attempt removed; the metadata files' names, sorted."""
    for name in (name for each in SEARCH_ENGINES.values() for name in each.files):
        if name not in getattr(spec, "resumable_files", ()):
            (tmp / name).unlink(missing_ok=True)  # from an earlier attempt with another --engine
    write_json(tmp / IDS_FILE, gallery.ids)
    metadata = item_metadata(gallery.store, gallery.kind, gallery.rows)
    for name, values in metadata.items():
        write_json(tmp / name, values)
    if gallery.texts is not None:
        write_json(tmp / TEXTS_FILE, gallery.texts)
    return sorted(metadata)


def _complete(tmp: Path, out: Path, manifest: dict[str, Any], local_sets: bool) -> None:
    """Finish the partial folder (progress record gone, the manifest written last) and publish it as ``out``."""
    (tmp / PROGRESS_FILE).unlink()
    if not local_sets:
        (tmp / SETS_FILE).unlink()  # the vectors are in the engine's store (Milvus)
    write_json(tmp / MANIFEST_FILE, manifest)  # last: a folder with a manifest is whole
    _chmod_published(tmp)
    _publish_folder(tmp, out)


def _build_failed(exc: OSError, out: Path, tmp: Path, kind: str) -> MaxMatchError:
    """The error for a build that failed writing (disk full, permissions), saying that a re-run resumes."""
    if is_disk_full(exc):
        return DiskFullError(getattr(exc, "filename", None) or tmp, None, hint=(
            f"free some space, then run the same command again: it resumes after the {_rows_in(tmp):,} {kind} "
            f"already encoded (kept in {tmp})"))
    return MaxMatchError(f"building index {out} failed: {exc.strerror or exc}",
                         hint=f"fix the cause and re-run the same command: it resumes after the {_rows_in(tmp):,} "
                              f"{kind} already encoded (kept in {tmp})")


def _manifest(tmp: Path, gallery: _Gallery, element_index: Any, local_sets: bool, metadata_files: list[str],
              fingerprints: tuple[str, str], extraction: Any) -> dict[str, Any]:
    """The index folder's manifest: what was encoded, by which checkpoint from which data, and how to search it."""
    from maxmatch_cli import __version__

    model = gallery.model
    n, k, d = gallery.shape
    ckpt_fp, data_fp = fingerprints
    stat = model.checkpoint.stat()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": gallery.kind, "n_items": n, "K": k, "D": d,
        "dtype": "float16", "normalized": True, "similarity": model.similarity,
        "similarity_options": model.similarity_options(model.similarity), "engine": ENGINE,
        "element_index": element_index,
        **({SETS_CHECK: sets_check_record(tmp / SETS_FILE)} if local_sets else {}),
        METADATA_KEY: metadata_files,
        "checkpoint": {"path": str(model.checkpoint.resolve()), "fingerprint": ckpt_fp,
                       "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "data": str(Path(gallery.store.path).resolve()), "data_fingerprint": data_fp, "split": gallery.split,
        "image_extraction": extraction, **({"shard": gallery.shard_record} if gallery.shard_record else {}),
        "maxmatch_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _milvus_options(engine: str, uri: str | None, token: str | None, db: str | None, collection: str | None,
                    index_type: str | None, out: Path, shard: Any, overwrite: bool) -> dict[str, Any]:
    """The milvus engine's build options ({} for the other engines, which refuse them)."""
    given = {"--uri": uri, "--token": token, "--db": db, "--collection": collection, "--index-type": index_type}
    if engine != "milvus":
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise MaxMatchError(f"{', '.join(named)} set{'s' if len(named) == 1 else ''} the milvus engine",
                                hint="add --engine milvus --uri URI, or leave them out")
        return {}
    if shard is not None:
        raise MaxMatchError("--shard builds one-machine shards; a Milvus collection is sharded by Milvus itself",
                            hint="leave out --shard with --engine milvus")
    from maxmatch_cli.retrieval.index.milvus.connection import check_collection_name, collection_for

    name = check_collection_name(collection) if collection is not None else collection_for(out)
    return {"uri": uri, "token": token, "db": db, "collection": name, "index_type": index_type,
            "overwrite": overwrite}


def _target(out: Path, shard: tuple[int, int] | str | None,
            overwrite: bool) -> tuple[Path, tuple[int, int] | None]:
    """The folder the build publishes (``out``, or its shard folder) and the parsed shard; refuses to replace
    anything but an index of the same shape (unsharded or sharded) when ``overwrite`` is given."""
    if shard is not None:
        shard = parse_shard(shard) if isinstance(shard, str) else parse_shard(f"{shard[0]}/{shard[1]}")
        if out.exists() and (not out.is_dir() or (out / MANIFEST_FILE).is_file()):
            raise MaxMatchError(f"{out} is {'an unsharded index' if out.is_dir() else 'a file'}, not a folder of shards",
                                hint="choose another --out for the sharded index")
        out = out / shard_name(*shard)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty folder is simply filled
        if shard is None and out.is_dir() and shard_folders(out):
            raise MaxMatchError(f"{out} is a sharded index; not replacing it with an unsharded one",
                                hint="add --shard I/N to (re)build one of its shards, or choose another --out")
        if not (out.is_dir() and (out / MANIFEST_FILE).is_file()):
            raise MaxMatchError(f"{out} exists and is not a maxmatch index; not replacing it",
                                hint="choose another --out, or remove it yourself")
        if not overwrite:
            raise MaxMatchError(f"index {out} already exists",
                                hint="pass --overwrite to replace it, or choose another --out")
    return out, shard


def _gallery_rows(store: Any, split: str, kind: str,
                  shard: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The store rows of the split's ``kind`` to encode (the shard's, with ``shard``) and the manifest's shard
    record."""
    images, captions = store.split(split)
    rows = images if kind == "images" else captions
    if len(rows) == 0:
        raise MaxMatchError(f"split '{split}' of {store.path} has no {kind}", hint="index another split (--split)")
    n_total = len(rows)
    shard_record = None
    if shard is not None:
        start, stop = shard_rows(n_total, *shard)
        if start == stop:
            raise MaxMatchError(f"shard {shard[0]}/{shard[1]} of {n_total} {kind} would be empty",
                                hint=f"use at most {n_total} shards")
        rows = rows[start:stop]
        shard_record = {"index": shard[0], "count": shard[1], "rows": [int(start), int(stop)], "n_total": n_total}
    return rows, shard_record


def _encode_into(tmp: Path, build_id: str, done: int, model: Any, store: Any, kind: str, rows: np.ndarray,
                 texts: list[str] | None, batch_size: int, show_progress: bool) -> None:
    """Encode the rows after the first ``done`` into the partial folder's sets.npy, recording progress per batch."""
    from maxmatch_cli.progress import make_progress

    n, k, d = len(rows), model.num_embeds, model.embed_dim
    sets = _open_sets(tmp, done, (n, k, d), kind)
    with make_progress(transient=True) as progress:
        task = progress.add_task(f"encoding {kind}", total=n, completed=done, unit="img" if kind == "images" else "cap",
                                 status=f"resumed at {done:,}" if done else "", visible=show_progress)
        for start in range(done, n, batch_size):
            chunk = rows[start: start + batch_size]
            if kind == "images":
                encoded = model.encode_images(store, chunk, batch_size=batch_size)
            else:
                encoded = model.encode_texts(texts[start: start + batch_size], batch_size=batch_size)
            block = F.normalize(encoded, dim=-1).numpy().astype(np.float16)
            _refuse_non_finite(block, model, store, kind, chunk)  # before the rows are written, or counted
            sets[start: start + len(chunk)] = block
            sets.flush()  # the rows first, then the record that they are there
            _save_progress(tmp, build_id, start + len(chunk))
            progress.advance(task, len(chunk))
    del sets


def _refuse_non_finite(block: np.ndarray, model: Any, store: Any, kind: str, chunk: np.ndarray) -> None:
    """Refuse a batch whose sets hold NaN or inf: an index of them answers every query with ``nan`` scores.

    Raises:
        MaxMatchError: naming the checkpoint, the feature file and the first few items (image ids or caption
            rows of the store).
    """
    bad = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))
    if not len(bad):
        return
    from maxmatch_cli.errors import first_few

    names = [str(store.image_ids[int(chunk[j])]) if kind == "images" else str(int(chunk[j])) for j in bad]
    what = "images with ids" if kind == "images" else "captions at rows"
    raise MaxMatchError(f"checkpoint {model.checkpoint} encodes the {what} {first_few(names, 5)} of {store.path} "
                        "as NaN or inf sets; an index of them would answer with nan scores",
                        hint="check those features (a NaN or inf written into the feature file) and the checkpoint "
                             "(`maxmatch evaluate` it; retrain if its weights hold NaN)")


def _open_sets(tmp: Path, done: int, shape: tuple[int, int, int], kind: str) -> np.memmap:
    """sets.npy mapped for writing, with the disk space of its rows still to encode reserved first.

    A write through a memory map into a sparse file on a full disk is a SIGBUS that kills the process without a
    word; with the blocks allocated up front, a full disk is an error here instead, before any row is encoded.

    Raises:
        DiskFullError: the rows still to encode do not fit (the rows encoded so far stay; the same command resumes).
    """
    path = tmp / SETS_FILE
    row_bytes = int(np.prod(shape[1:])) * np.dtype(np.float16).itemsize
    try:
        sets = np.lib.format.open_memmap(path, mode="r+" if done else "w+", dtype=np.float16, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            reserve_space(fd, sets.offset + done * row_bytes, (shape[0] - done) * row_bytes)
        finally:
            os.close(fd)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(path, (shape[0] - done) * row_bytes, hint=(
            f"free some space (or choose an --out on a larger disk), then run the same command again: it resumes "
            f"after the {done:,} {kind} already encoded")) from None
    return sets


# ----------------------------------------------------------------------------------------------- partial folder


def _partial_folder(out: Path) -> Path:
    """Where a build of ``out`` works until it is complete (hidden, next to it; a re-run resumes there)."""
    return out.parent / f".{out.name}.partial"


def _rows_in(partial: Path) -> int:
    try:
        return int(json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _open_partial(out: Path, build_id: str) -> tuple[Path, int]:
    """The partial folder of ``out`` and the rows already encoded in it: kept when an earlier attempt of the same
    build (same checkpoint, feature file, split, kind, shard) was interrupted, else started afresh."""
    partial = _partial_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial.is_dir():
            try:
                state = json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("build") == build_id and (partial / SETS_FILE).is_file():
                return partial, int(state.get("done", 0))
            shutil.rmtree(partial)  # another build's leftovers, or one that never recorded progress
        elif partial.exists():
            partial.unlink()
        partial.mkdir()
        _save_progress(partial, build_id, 0)
    except OSError as exc:
        raise MaxMatchError(f"cannot write to {out.parent}: {exc.strerror or exc}",
                            hint="choose an output folder you can write to (--out)") from None
    return partial, 0


def _save_progress(partial: Path, build_id: str, done: int) -> None:
    tmp = partial / f"{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps({"build": build_id, "done": done}) + "\n", encoding="utf-8")
    os.replace(tmp, partial / PROGRESS_FILE)


@dataclass
class _Ckpt:
    """What :func:`maxmatch_cli.evaluation.encoding.check_features` reads of a checkpoint."""

    path: Path
    recipe: Any


# ----------------------------------------------------------------------------------------------- publishing


def _chmod_published(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the index the permissions an ordinary folder and files would get."""
    from maxmatch_cli.fileio import current_umask

    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _publish_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto ``out``; an index already there is moved aside first, removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "index")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "index", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
