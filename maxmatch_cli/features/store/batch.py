"""A batch of images on its way into a store: checked, given ids and encoded as one float16 block.

Pure functions of the batch and the store's shape, so that :class:`~maxmatch_cli.features.store.writer.StoreWriter`
only decides where the block goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.float16 import to_float16


def feature_items(features: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """The batch as a list of per-image ``(R_i, D)`` arrays."""
    if isinstance(features, np.ndarray) and features.ndim == 3:
        return list(features)
    return [np.asarray(x) for x in features]


def check_shapes(items: list[np.ndarray], start: int, *, regions_per_image: int | None, feature_dim: int,
                 file_name: str) -> None:
    """Refuse an image whose features are not ``(R, D)`` (fixed layout, R given) or ``(R_i, D)`` (flat).

    Raises:
        MaxMatchError: naming the first such image by its position in the store (``start`` + its index).
    """
    fixed = regions_per_image is not None
    for k, x in enumerate(items):
        if x.ndim != 2 or x.shape[1] != feature_dim or (fixed and x.shape[0] != regions_per_image):
            want = f"({regions_per_image}, {feature_dim})" if fixed else f"(R, {feature_dim})"
            raise MaxMatchError(
                f"image {start + k} has features of shape {x.shape}; {file_name} stores {want}.",
                hint="all images of one feature file must have the same feature size",
            )


def ids_array(ids: Sequence[int] | Sequence[str] | np.ndarray | None, start: int, count: int, id_kind: str) -> Any:
    """The ids to store for ``count`` images from ``start``: as given (int64 or str objects), or their positions.

    Raises:
        ValueError: not one id per image.
    """
    if ids is None:
        return np.arange(start, start + count, dtype=np.int64)
    ids_arr: Any = list(ids) if id_kind == "str" else np.asarray(ids, dtype=np.int64)
    if len(ids_arr) != count:
        raise ValueError(f"{len(ids_arr)} ids for {count} images")
    if id_kind == "str":
        ids_arr = np.array([str(x) for x in ids_arr], dtype=object)
    return ids_arr


def encode_block(features: Any, items: list[np.ndarray], ids_arr: Any, start: int, *, fixed: bool,
                 feature_dim: int) -> np.ndarray:
    """The batch as one float16 block: ``(B, R, D)`` in the fixed layout, all rows ``(T, D)`` in the flat one.

    Raises:
        MaxMatchError: an image holds NaN/inf or values beyond the float16 range (the first one is named).
    """
    if fixed:
        whole = isinstance(features, np.ndarray) and features.ndim == 3
        block = to_float16(features if whole else np.stack(items))
    else:
        block = to_float16(np.concatenate(items) if items else np.zeros((0, feature_dim)))
    if block is None:
        bad = next(k for k, x in enumerate(items) if to_float16(x) is None)
        raise MaxMatchError(
            f"image {start + bad} (id {ids_arr[bad]}) has non-finite features or values beyond the float16 "
            "range.",
            hint="check the source features (NaN/inf or |x| > 65504)",
        )
    return block


def append_rows(images: h5py.Group, feats: h5py.Dataset, rows: int, start: int, block: np.ndarray,
                items: list[np.ndarray], boxes: Any, with_boxes: bool) -> int:
    """Flat layout: append the batch's rows (and boxes) after ``rows`` and set its images' offsets.

    Args:
        images: the ``images/`` group.
        feats: its ``features`` dataset, (T, D).
        rows: rows stored before this batch.
        start: position of the batch's first image.
        block: the batch's rows as float16, (sum of R_i, D).
        items: the batch's per-image features (for the region counts).
        boxes: per-image ``(R_i, 4)`` boxes, used if ``with_boxes``.
        with_boxes: the store keeps boxes.

    Returns:
        The number of rows stored afterwards.

    Raises:
        ValueError: the boxes of an image do not have one row per region.
    """
    counts = np.array([len(x) for x in items], dtype=np.int64)
    rows_end = rows + int(counts.sum())
    feats.resize(rows_end, axis=0)
    if rows_end > rows:
        feats[rows:rows_end] = block
    if with_boxes:
        bx = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        if [len(b) for b in bx] != counts.tolist():
            raise ValueError("boxes must have one row per region")
        images["boxes"].resize(rows_end, axis=0)
        images["boxes"][rows:rows_end] = np.concatenate(bx)
    images["offsets"][start + 1 : start + len(items) + 1] = rows + np.cumsum(counts)
    return rows_end
