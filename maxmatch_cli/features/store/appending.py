"""Appending a batch of images to the ``images/`` group of a store being written.

The bodies of :meth:`StoreWriter.write_images <maxmatch_cli.features.store.writer.StoreWriter.write_images>` and
:meth:`~maxmatch_cli.features.store.writer.StoreWriter.write_files`: a batch is checked and encoded
(:mod:`~maxmatch_cli.features.store.batch`), its room on the disk asked for, then written where the writer's
count says; the writer counts it and flushes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.fileio import escapes_folder
from maxmatch_cli.features.store.batch import append_rows, check_shapes, encode_block, feature_items, ids_array
from maxmatch_cli.features.store.room import files_bytes, per_image_extra

# ``w`` below is the StoreWriter being written (typed Any: writer.py imports this module, not the other way).


def append_features(w: Any, features: Any, ids: Any, boxes: Any, sizes: Any,
                    files: Sequence[str] | None) -> None:
    """Append a batch of feature images to ``w``; the arguments are those of ``StoreWriter.write_images``."""
    if w.layout == "files":
        raise ValueError("an image-file store holds no features: use write_files()")
    if (files is None) != (w.image_root is None):
        raise ValueError("pass files= exactly when the store has an image_root")
    items = feature_items(features)
    if not items:
        return
    ids_arr, block = _checked_block(w, features, items, ids, boxes, sizes, files)
    if files is not None:
        check_inside(w, files)
    B, fixed = len(items), w.layout == "fixed"
    start = w.n_written
    end = start + B
    boxes_bytes = 16 * (B * int(w.regions_per_image) if fixed else len(block)) if w.with_boxes else 0
    w._require_room(block.nbytes + boxes_bytes + files_bytes(files) + B * per_image_extra(w._spec))
    try:
        images = w._file["images"]
        w._ensure_capacity(end)
        if fixed:
            images["features"][start:end] = block
            if w.with_boxes:
                images["boxes"][start:end] = np.stack([np.asarray(b, dtype=np.float32) for b in boxes])
        else:
            # Open until the batch is written, as it always was: HDF5 places metadata by what is open,
            # and files must stay byte for byte what earlier versions wrote.
            feats = images["features"]
            w._rows = append_rows(images, feats, w._rows, start, block, items, boxes, w.with_boxes)
        images["ids"][start:end] = ids_arr
        if w.with_sizes:
            images["sizes"][start:end] = np.asarray(sizes, dtype=np.int32).reshape(B, 2)
        if files is not None:
            images["files"][start:end] = np.array([str(x) for x in files], dtype=object)
    except OSError as exc:
        raise w._write_error(exc) from None
    w._hasher.add(block, w._file["images/features"].dtype)  # the content hash, as written
    if fixed:
        w._rows = end * int(w.regions_per_image)
    w._advance(end, B)


def _checked_block(w: Any, features: Any, items: list[np.ndarray], ids: Any, boxes: Any, sizes: Any,
                   files: Sequence[str] | None) -> tuple[Any, np.ndarray]:
    """Refuse a batch that does not fit ``w``'s store; return its ids and its features as one float16 block."""
    fixed = w.layout == "fixed"
    B, start = len(items), w.n_written
    check_shapes(items, start, regions_per_image=w.regions_per_image if fixed else None,
                 feature_dim=w.feature_dim, file_name=w.path.name)
    ids_arr = ids_array(ids, start, B, w.id_kind)
    if w.with_boxes and boxes is None:
        raise ValueError("this store keeps boxes: pass boxes=")
    if w.with_sizes and sizes is None:
        raise ValueError("this store keeps image sizes: pass sizes=")
    if files is not None and len(files) != B:
        raise ValueError(f"{len(files)} files for {B} images")
    return ids_arr, encode_block(features, items, ids_arr, start, fixed=fixed, feature_dim=w.feature_dim)


def append_files(w: Any, files: Sequence[str], ids: Any, sizes: Any) -> None:
    """Append a batch of an image-file store to ``w``; the arguments are those of ``StoreWriter.write_files``."""
    if w.layout != "files":
        raise ValueError("write_files() is for image-file stores (feature_kind='pixels')")
    B = len(files)
    if len(ids) != B or (sizes is not None and len(sizes) != B):
        raise ValueError("files, ids and sizes must have the same length")
    if w.with_sizes and sizes is None:
        raise ValueError("this store keeps image sizes: pass sizes=")
    if B == 0:
        return
    check_inside(w, files)
    start, end = w.n_written, w.n_written + B
    images = w._file["images"]
    w._require_room(sum(len(str(x).encode()) for x in files) + B * (16 + per_image_extra(w._spec)))
    try:
        w._ensure_capacity(end)
        images["files"][start:end] = np.array([str(x) for x in files], dtype=object)
        if w.id_kind == "str":
            images["ids"][start:end] = np.array([str(x) for x in ids], dtype=object)
        else:
            images["ids"][start:end] = np.asarray(ids, dtype=np.int64)
        if w.with_sizes:
            images["sizes"][start:end] = np.asarray(sizes, dtype=np.int32).reshape(B, 2)
    except OSError as exc:
        raise w._write_error(exc) from None
    w._advance(end, B)


def check_inside(w: Any, files: Sequence[str]) -> None:
    """Refuse image paths that the reader would refuse: every name must stay inside the image folder.

    Raises:
        MaxMatchError: naming the store and the first few such names (``..`` parts, absolute, or a backslash
            path that reads as one of those).
    """
    outside = [str(x) for x in files if escapes_folder(str(x))]
    if outside:
        raise MaxMatchError(
            f"{w.path}: {len(outside)} image path(s) would leave the image folder {w.image_root} (an absolute path "
            f"or a '..' part, also as a backslash path): {first_few([repr(x) for x in outside])}.",
            hint="rename these files (or move them out of the folder) and run the command again")
