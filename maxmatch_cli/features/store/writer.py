"""Writing a feature store: :class:`StoreWriter`, append-only, atomic and resumable.

Images are appended in order; ``n_written`` is updated at each flush. Re-running with ``resume=True`` and the same
``args_fingerprint`` continues after the last flushed image; a different fingerprint is refused with a message
(see :mod:`maxmatch_cli.features.store.partial` for the ``.partial`` file and its publication). One process writes a
feature file at a time: the writer holds ``.NAME.lock`` beside it (:mod:`maxmatch_cli.locks`) until it finishes,
fails or is interrupted, and a second writer is refused with the holder's pid, host and command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import DiskFullError, free_space, is_disk_full
from maxmatch_cli.locks import acquire, lock_beside
from maxmatch_cli.features.store.appending import append_features, append_files
from maxmatch_cli.features.store.fingerprint import stamp_file
from maxmatch_cli.features.store.opening import check_output, layout_of, start_or_resume
from maxmatch_cli.features.store.partial import StoreSpec, publish_partial, resize_images
from maxmatch_cli.features.store.room import close_quietly, headroom, rest_bytes, room_hint, write_failure
from maxmatch_cli.features.store.schema import FLAT_CHUNK_ROWS, partial_path
from maxmatch_cli.features.store.splits import check_references, write_captions, write_split


class StoreWriter:
    """Append-only writer of a schema-v1 store, atomic and resumable.

    Use as a context manager::

        with StoreWriter(out, feature_kind="region", source="butd-tsv", feature_dim=2048,
                         regions_per_image=36, n_images=n, args_fingerprint=fp, resume=True) as w:
            for batch in ...:
                if <batch already written>: continue       # w.n_written says how many images are stored
                w.write_images(features, ids=ids)
            w.set_captions(texts, image_index)
            w.add_split("train", train_images)

    Leaving the block normally finishes the file (checks, sets ``complete``, closes, renames ``.partial`` to the
    final path). Leaving it with an exception (Ctrl-C included) flushes what was written and keeps the
    ``.partial`` for a later ``resume=True`` run.

    Args:
        path: final path of the store.
        feature_kind: ``"region"``, ``"grid"`` or ``"pixels"`` (an image-file store: layout ``"files"``,
            written with :meth:`write_files`, ``feature_dim`` 3).
        source: where the features come from, e.g. ``"butd-tsv"``.
        feature_dim: D.
        regions_per_image: R for the fixed layout (every image has R rows); ``None`` selects the flat layout
            (variable rows per image, stored without padding plus offsets).
        n_images: the number of images expected, if known (the file is pre-allocated and :meth:`finish`
            checks the count); ``None`` grows the file as images come.
        id_kind: ``"int"`` (int64 ids) or ``"str"`` (UTF-8 ids).
        with_boxes: store a box (x1, y1, x2, y2) per region; :meth:`write_images` then needs ``boxes``.
        with_sizes: store each image's (width, height); :meth:`write_images` then needs ``sizes``.
        metadata: JSON-serialisable dict stored as the ``metadata`` attribute.
        args_fingerprint: identity of the arguments (see :func:`args_fingerprint`); a resumed run must match.
        resume: continue ``<path>.partial`` if it exists (else start fresh). Without it, an existing partial
            file is discarded.
        overwrite: allow replacing an existing finished store at ``path`` (replaced only when the new one is
            finished).
        compression: ``None`` (default, fastest reads) or ``"lzf"``.
        flush_every: flush and record progress at least every this many images.
        chunk_rows: rows per HDF5 chunk in the flat layout (default 48; the typical region count per image
            makes most images one chunk read).
        image_root: the image folder (stored as the ``image_root`` attribute): of an image-file store, or of the
            image files features are extracted from (then :meth:`write_images` needs ``files``, each image's
            path relative to it, stored as ``images/files``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        feature_kind: str,
        source: str,
        feature_dim: int,
        regions_per_image: int | None = None,
        n_images: int | None = None,
        id_kind: str = "int",
        with_boxes: bool = False,
        with_sizes: bool = False,
        metadata: dict[str, Any] | None = None,
        args_fingerprint: str = "",
        resume: bool = False,
        overwrite: bool = False,
        compression: str | None = None,
        flush_every: int = 256,
        chunk_rows: int = FLAT_CHUNK_ROWS,
        image_root: str | os.PathLike | None = None,
    ):
        self.layout = layout_of(path, feature_kind=feature_kind, id_kind=id_kind, compression=compression,
                                regions_per_image=regions_per_image, image_root=image_root, with_boxes=with_boxes)
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.image_root = None if image_root is None else str(image_root)
        self.feature_kind = feature_kind
        self.source = source
        self.feature_dim = int(feature_dim)
        self.regions_per_image = regions_per_image
        self.n_images = n_images
        self.id_kind = id_kind
        self.with_boxes = with_boxes
        self.with_sizes = with_sizes
        self.metadata = metadata or {}
        self.args_fingerprint = args_fingerprint
        self.compression = compression
        self.flush_every = max(1, int(flush_every))
        self.chunk_rows = max(1, int(chunk_rows))
        self._start_counters(resume)
        self._spec = self._make_spec()
        self._open(overwrite)

    @classmethod
    def open_or_resume(cls, path: str | os.PathLike, **kwargs: Any) -> StoreWriter:
        """Same as ``StoreWriter(path, resume=True, **kwargs)``: continue ``path.partial`` if present."""
        kwargs["resume"] = True
        return cls(path, **kwargs)

    # -- set-up --------------------------------------------------------------------------------------------

    def _start_counters(self, resume: bool) -> None:
        """The state of a writer that has written nothing yet (:meth:`_open` sets where a resumed one continues)."""
        self.resumed = False
        self._resume = resume  # a failed run's .partial is continued by the same command (else started over)
        self._out_of_room = False
        self._since_flush = 0
        self._pending_bytes = 0  # written since the last flush: HDF5 may not have put them on disk yet
        self._broken = False  # HDF5 failed mid-write (a full disk): the .partial cannot be trusted
        self._finished = False

    def _make_spec(self) -> StoreSpec:
        """What the store is written as: the arguments a resumed ``.partial`` must share, and its datasets' shapes."""
        return StoreSpec(
            feature_kind=self.feature_kind, source=self.source, feature_dim=self.feature_dim, layout=self.layout,
            regions_per_image=self.regions_per_image, n_images=self.n_images, id_kind=self.id_kind,
            with_boxes=self.with_boxes, with_sizes=self.with_sizes, args_fingerprint=self.args_fingerprint,
            compression=self.compression, chunk_rows=self.chunk_rows, image_root=self.image_root,
        )

    def _open(self, overwrite: bool) -> None:
        """Take the feature file's lock, then create or reopen its ``.partial`` and check the room on the disk."""
        check_output(self.path, overwrite)  # also makes the folder, where the lock lies
        self._lock = acquire(lock_beside(self.path), f"feature file {self.path}")  # one writer per feature file
        try:
            check_output(self.path, overwrite)  # again under the lock: a writer that finished meanwhile
            opened = start_or_resume(self.partial, self._spec, self.metadata, self._resume)
            self._file, self.n_written, self._rows, self._hasher, self.resumed = opened
            self._check_room_at_start()
        except BaseException:
            self._lock.release()
            raise

    # -- writing -------------------------------------------------------------------------------------------

    def write_images(
        self,
        features: np.ndarray | Sequence[np.ndarray],
        *,
        ids: Sequence[int] | Sequence[str] | np.ndarray | None = None,
        boxes: np.ndarray | Sequence[np.ndarray] | None = None,
        sizes: np.ndarray | Sequence[Sequence[int]] | None = None,
        files: Sequence[str] | None = None,
    ) -> None:
        """Append a batch of images.

        Args:
            features: fixed layout: ``(B, R, D)`` array (or a list of ``(R, D)``); flat layout: a list of
                ``(R_i, D)`` arrays. Any float dtype; stored as float16.
            ids: ``B`` image ids (default: the running image index).
            boxes: like ``features`` with 4 columns (required if ``with_boxes``).
            sizes: ``(B, 2)`` width, height (required if ``with_sizes``).
            files: ``B`` image paths relative to ``image_root`` (required if the writer has one, else refused).
        """
        append_features(self, features, ids, boxes, sizes, files)

    def write_image(self, features: np.ndarray, *, id: int | str | None = None, boxes: np.ndarray | None = None,
                    size: Sequence[int] | None = None, file: str | None = None) -> None:
        """Append one image (see :meth:`write_images`)."""
        self.write_images(
            [features],
            ids=None if id is None else [id],
            boxes=None if boxes is None else [boxes],
            sizes=None if size is None else [size],
            files=None if file is None else [file],
        )

    def write_files(
        self,
        files: Sequence[str],
        *,
        ids: Sequence[int] | Sequence[str] | np.ndarray,
        sizes: np.ndarray | Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append images of an image-file store (``feature_kind="pixels"``).

        Args:
            files: ``B`` paths relative to the store's ``image_root``.
            ids: ``B`` image ids.
            sizes: ``(B, 2)`` width, height (required if ``with_sizes``).
        """
        append_files(self, files, ids, sizes)

    def _advance(self, end: int, B: int) -> None:
        """Count ``B`` more images written (``end`` in all) and flush when ``flush_every`` have come."""
        self.n_written = end
        self._since_flush += B
        if self._since_flush >= self.flush_every:
            self.flush()

    def _ensure_capacity(self, n: int) -> None:
        images = self._file["images"]
        current = len(images["ids"])
        if n <= current:
            return
        if self.n_images is not None:
            raise MaxMatchError(
                f"more images than the {self.n_images} announced for {self.path.name}.",
                hint="this is a bug in the importer; please report it",
            )
        resize_images(self._file, self.layout, n)

    # -- room on the disk (see :mod:`~maxmatch_cli.features.store.room`) -----------------------------------

    def _free(self) -> int | None:
        # free_space is looked up in this module: tests fake a full disk by replacing writer.free_space.
        return free_space(self.partial)

    def _rest_bytes(self) -> int | None:
        return rest_bytes(self._spec, self.n_written)

    def _room_hint(self) -> str:
        return room_hint(self._resume, self.n_written, self.partial)

    def _check_room_at_start(self) -> None:
        """Refuse a store whose remaining images cannot fit on the disk, before writing any (the .partial of a
        resumed run is kept as it is; a new, empty one is removed)."""
        rest, free = self._rest_bytes(), self._free()
        if rest is None or free is None or free >= rest + headroom(self._file):
            return
        needed = rest + headroom(self._file)
        hint = self._room_hint()
        close_quietly(self._file)
        if not (self._resume and self.n_written):
            self.partial.unlink(missing_ok=True)
        raise DiskFullError(self.path, needed, hint=hint, free=free)

    def _require_room(self, nbytes: int) -> None:
        """Before writing about ``nbytes`` more: refuse when the disk would then lack the room to flush and close.
        What was written so far is flushed first, so the same command resumes after it."""
        free = self._free()
        needed = self._pending_bytes + nbytes + headroom(self._file)
        if free is not None and free < needed:
            needed += max(0, (self._rest_bytes() or 0) - nbytes)  # all that is still to come, where it is known
            self.flush()
            self._out_of_room = True
            raise DiskFullError(self.path, needed, free=free, hint=self._room_hint())
        self._pending_bytes += nbytes

    def _write_error(self, exc: BaseException) -> MaxMatchError:
        disk_full = is_disk_full(exc)
        if disk_full:
            # HDF5 ran out of space in the middle of a write: what it has on disk is no longer consistent, and a
            # resume could read garbage. :meth:`abort` removes the .partial.
            self._broken = True
        return write_failure(exc, self.path, self.partial, self._rest_bytes() if disk_full else None, disk_full)

    def flush(self) -> None:
        """Flush data to disk and record ``n_written`` (the point a resumed run continues from)."""
        try:
            self._file.flush()  # data first, then the count that vouches for it
            self._file.attrs["n_written"] = self.n_written
            self._file.flush()
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for a failed flush
            raise self._write_error(exc) from None
        self._since_flush = 0
        self._pending_bytes = 0

    # -- captions, splits, metadata ------------------------------------------------------------------------

    def set_captions(
        self,
        texts: Sequence[str],
        image_index: Sequence[int] | np.ndarray,
        ids: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Store all captions (replacing any stored before).

        Args:
            texts: M caption strings.
            image_index: M indices of the owning images (positions in the store, not dataset ids).
            ids: optional M int64 caption ids.
        """
        self._require_room(sum(len(t.encode("utf-8", "replace")) + 40 for t in texts))
        write_captions(self._file["captions"], texts, image_index, ids)

    def add_split(
        self,
        name: str,
        image_indices: Sequence[int] | np.ndarray,
        caption_indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Store a split (replacing one of the same name).

        Args:
            name: e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
            image_indices: the split's images, in evaluation order.
            caption_indices: its captions, grouped by image in the order of ``image_indices``. ``None`` takes
                every stored caption of each image, in caption order (call :meth:`set_captions` first).
        """
        self._require_room(64 * len(image_indices) + 16 * len(caption_indices if caption_indices is not None else []))
        write_split(self._file, name, image_indices, caption_indices)

    def set_metadata(self, **values: Any) -> None:
        """Merge values into the ``metadata`` attribute."""
        self.metadata.update(values)
        self._file.attrs["metadata"] = json.dumps(self.metadata, sort_keys=True)

    def written_ids(self) -> list[int | str]:
        """Ids of the images written so far (after a resume: those kept from the partial file), in order."""
        ids = self._file["images/ids"]
        if h5py.check_string_dtype(ids.dtype):
            return list(ids.asstr()[: self.n_written])
        return [int(x) for x in ids[: self.n_written]]

    @property
    def h5(self) -> h5py.File:
        """The underlying HDF5 file, for extra groups (e.g. ``synthetic/``)."""
        return self._file

    # -- finishing -----------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Check, record the content hash, mark complete, close, sync and rename to the final path.

        Returns:
            The final path.
        """
        f = self._file
        if self.n_images is not None and self.n_written != self.n_images:
            raise MaxMatchError(
                f"{self.partial}: {self.n_written} images written, {self.n_images} expected.",
                hint="the importer stopped early; re-run the same command to resume",
            )
        resize_images(f, self.layout, self.n_written)
        if "text" not in f["captions"]:
            self.set_captions([], [])
        check_references(f, self.n_written, self.partial)
        try:
            stamp = self._hasher.record(f)
        except OSError as exc:
            raise self._write_error(exc) from None
        self.flush()
        f.attrs["complete"] = True
        try:
            publish_partial(f, self.partial, self.path)
        except OSError as exc:
            raise self._write_error(exc) from None
        stamp_file(self.path, stamp)
        self._finished = True
        self._lock.release()
        return self.path

    def abort(self) -> None:
        """Flush what is written and close, keeping ``.partial`` for a resume; the file's lock is released."""
        if self._finished or not self._file.id.valid:
            self._lock.release()
            return
        if not self._broken:
            try:
                self.flush()
            except MaxMatchError:
                pass
        if self._broken:  # HDF5 failed mid-write: the file cannot be trusted, so nothing resumes from it
            close_quietly(self._file)
            self.partial.unlink(missing_ok=True)
        else:
            self._file.close()
            if self._out_of_room and not self._resume:
                self.partial.unlink(missing_ok=True)  # nothing continues it: do not leave it taking the space
        self._lock.release()

    def discard(self) -> None:
        """Close and delete the ``.partial`` file."""
        if self._file.id.valid:
            self._file.close()
        if self.partial.exists():
            self.partial.unlink()
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if not self._finished:
                try:
                    self.finish()
                except BaseException as err:
                    self._leave(err)
                    raise
        else:
            self._leave(exc)

    def _leave(self, exc: BaseException) -> None:
        """:meth:`abort` after ``exc``; a full disk that HDF5 met becomes one message saying so."""
        error = self._write_error(exc) if not isinstance(exc, MaxMatchError) and is_disk_full(exc) else None
        self.abort()
        if error is not None:
            raise error from None

