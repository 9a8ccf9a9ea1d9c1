"""The ``<path>.partial`` file a writer fills: creating it, reopening it to resume, and publishing it.

A file at the final path is always complete: :class:`~maxmatch_cli.features.store.writer.StoreWriter` writes
``<path>.partial`` and renames it only after ``complete`` is set and the file is closed and synced, so a crashed
run leaves only the ``.partial``. Its ``n_written`` attribute, updated at each flush, vouches for the images
before it; a resumed run cuts away whatever was written after the last flush and continues from there, provided
the file was started with the same arguments (:class:`StoreSpec`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli import __version__
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.schema import SCHEMA_VERSION, STRING_DTYPE
from maxmatch_cli.fileio import publish


@dataclass(frozen=True)
class StoreSpec:
    """What a store is being written as; see :class:`~maxmatch_cli.features.store.writer.StoreWriter`."""

    feature_kind: str
    source: str
    feature_dim: int
    layout: str
    regions_per_image: int | None
    n_images: int | None
    id_kind: str
    with_boxes: bool
    with_sizes: bool
    args_fingerprint: str
    compression: str | None
    chunk_rows: int
    image_root: str | None

    def defining(self) -> dict[str, Any]:
        """The attributes a resumed file must share with this spec, as :func:`open_partial` reads them back."""
        return {
            "schema_version": SCHEMA_VERSION,
            "feature_kind": self.feature_kind,
            "source": self.source,
            "feature_dim": self.feature_dim,
            "layout": self.layout,
            "regions_per_image": self.regions_per_image,
            "args_fingerprint": self.args_fingerprint,
            "n_images": -1 if self.n_images is None else int(self.n_images),
            "image_root": self.image_root,
        }


def create_partial(partial: Path, spec: StoreSpec, metadata: dict[str, Any]) -> h5py.File:
    """Create ``partial`` afresh (replacing any file there) with the header and the empty datasets of ``spec``.

    Raises:
        MaxMatchError: the file cannot be created.
    """
    if partial.exists():
        partial.unlink()
    try:
        f = h5py.File(partial, "w", track_order=True)
    except OSError as exc:
        if "unable to lock file" in str(exc):  # HDF5's own lock: a process outside maxmatch has the file open
            raise MaxMatchError(f"cannot write {partial}: another process has it open ({exc}).",
                                hint="wait for that process to finish or stop it, then re-run") from None
        raise MaxMatchError(f"cannot write {partial}: {exc}.", hint="choose a writable --out path") from None
    _write_header(f.attrs, spec, metadata)
    images = f.create_group("images")
    # Held open until the flush, as the writer always did: HDF5 places metadata by what is open, and files
    # must stay byte for byte what earlier versions wrote.
    offsets = _create_image_datasets(images, spec)
    f.create_group("captions")
    f.create_group("splits")
    f.flush()
    del images, offsets
    return f


def _write_header(a: h5py.AttributeManager, spec: StoreSpec, metadata: dict[str, Any]) -> None:
    a["schema_version"] = SCHEMA_VERSION
    a["feature_kind"] = spec.feature_kind
    a["source"] = spec.source
    a["feature_dim"] = spec.feature_dim
    a["layout"] = spec.layout
    if spec.regions_per_image is not None:
        a["regions_per_image"] = int(spec.regions_per_image)
    a["created_with"] = f"maxmatch {__version__}"
    a["metadata"] = json.dumps(metadata, sort_keys=True)
    a["args_fingerprint"] = spec.args_fingerprint
    a["n_images_expected"] = -1 if spec.n_images is None else int(spec.n_images)
    a["n_written"] = 0
    a["complete"] = False
    if spec.image_root is not None:
        a["image_root"] = spec.image_root


def _create_image_datasets(images: h5py.Group, spec: StoreSpec) -> h5py.Dataset | None:
    """``images/``: features (or files), boxes, offsets, ids, sizes and (features with an ``image_root``) files,
    sized for ``n_images`` (or empty).

    Returns:
        The ``offsets`` dataset of the flat layout, still open; ``None`` for the other layouts.
    """
    offsets = None
    n0 = spec.n_images or 0
    D = spec.feature_dim
    common = dict(dtype=np.float16, compression=spec.compression, track_times=False)
    if spec.layout == "files":
        images.create_dataset("files", shape=(n0,), maxshape=(None,), chunks=(4096,), dtype=STRING_DTYPE,
                              track_times=False)
    elif spec.layout == "fixed":
        R = int(spec.regions_per_image)
        images.create_dataset("features", shape=(n0, R, D), maxshape=(None, R, D), chunks=(1, R, D), **common)
        if spec.with_boxes:
            images.create_dataset(
                "boxes", shape=(n0, R, 4), maxshape=(None, R, 4), chunks=(256, R, 4), dtype=np.float32,
                track_times=False,
            )
    else:
        images.create_dataset("features", shape=(0, D), maxshape=(None, D), chunks=(spec.chunk_rows, D), **common)
        offsets = images.create_dataset(
            "offsets", shape=(n0 + 1,), maxshape=(None,), chunks=(4096,), dtype=np.int64, track_times=False
        )
        offsets[0] = 0
        if spec.with_boxes:
            images.create_dataset(
                "boxes", shape=(0, 4), maxshape=(None, 4), chunks=(4096, 4), dtype=np.float32, track_times=False,
            )
    if spec.layout != "files" and spec.image_root is not None:  # features extracted from these image files
        images.create_dataset("files", shape=(n0,), maxshape=(None,), chunks=(4096,), dtype=STRING_DTYPE,
                              track_times=False)
    id_dtype = np.int64 if spec.id_kind == "int" else STRING_DTYPE
    images.create_dataset("ids", shape=(n0,), maxshape=(None,), chunks=(4096,), dtype=id_dtype, track_times=False)
    if spec.with_sizes:
        images.create_dataset(
            "sizes", shape=(n0, 2), maxshape=(None, 2), chunks=(4096, 2), dtype=np.int32, track_times=False
        )
    return offsets


def open_partial(partial: Path, layout: str) -> tuple[h5py.File, dict[str, Any], int]:
    """Open an existing ``partial`` for appending and read back its defining attributes.

    Returns:
        ``(file, defining attributes as in StoreSpec.defining, n_written)``.

    Raises:
        OSError, KeyError: its HDF5 metadata is unreadable (a kill during a write can leave it so); the file is
            closed again.
    """
    f = None
    try:
        f = h5py.File(partial, "r+")
        a = f.attrs
        stored = {
            "schema_version": int(a["schema_version"]),
            "feature_kind": str(a["feature_kind"]),
            "source": str(a["source"]),
            "feature_dim": int(a["feature_dim"]),
            "layout": str(a["layout"]),
            "regions_per_image": int(a["regions_per_image"]) if "regions_per_image" in a else None,
            "args_fingerprint": str(a["args_fingerprint"]),
            "n_images": int(a["n_images_expected"]),
            "image_root": str(a["image_root"]) if "image_root" in a else None,
        }
        n_written = int(a["n_written"])
        f["images/files" if layout == "files" else "images/features"]
    except (OSError, KeyError):
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - the handle of a broken file may already be invalid
                pass
        raise
    return f, stored, n_written


def check_same_arguments(f: h5py.File, partial: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to resume a partial file started with other arguments (closing it first).

    Raises:
        MaxMatchError: naming each attribute that differs, with its value there and now.
    """
    differ = [k for k in wanted if stored[k] != wanted[k]]
    if differ:
        f.close()
        details = ", ".join(f"{k}: {stored[k]!r} there, {wanted[k]!r} now" for k in differ)
        raise MaxMatchError(
            f"{partial} was started with different arguments ({details}).",
            hint=f"re-run with the original arguments to resume, or delete {partial} to start over",
        )


def drop_unflushed(f: h5py.File, spec: StoreSpec, n_written: int) -> int:
    """Cut away what was written after the last flush (it may be incomplete); return the feature rows kept."""
    if spec.layout == "flat":
        rows = int(f["images/offsets"][n_written])
        f["images/features"].resize(rows, axis=0)
        if "boxes" in f["images"]:
            f["images/boxes"].resize(rows, axis=0)
    else:
        rows = n_written * int(spec.regions_per_image)
    if spec.n_images is None:
        resize_images(f, spec.layout, n_written)
    return rows


def resize_images(f: h5py.File, layout: str, n: int) -> None:
    """Grow or truncate every per-image dataset to ``n`` images."""
    images = f["images"]
    for name in ("ids", "sizes", "files"):
        if name in images:
            images[name].resize(n, axis=0)
    if layout == "fixed":
        images["features"].resize(n, axis=0)
        if "boxes" in images:
            images["boxes"].resize(n, axis=0)
    elif layout == "flat":
        images["offsets"].resize(n + 1, axis=0)


def publish_partial(f: h5py.File, partial: Path, path: Path) -> None:
    """Close ``f`` (already marked complete), sync ``partial`` to disk and rename it to ``path``.

    Raises:
        OSError: any step failed (the caller says whether the disk is full).
    """
    f.flush()
    f.close()
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    publish(partial, path)
