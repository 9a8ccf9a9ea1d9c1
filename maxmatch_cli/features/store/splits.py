"""Writing ``captions/`` and ``splits/``: the caption table and the splits that index it, grouped by image.

A split lists its images in evaluation order and its captions grouped by image in that order, so that the
retrieval protocols can take caption j of a split as belonging to image j // captions_per_image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.schema import STRING_DTYPE


def write_captions(
    g: h5py.Group,
    texts: Sequence[str],
    image_index: Sequence[int] | np.ndarray,
    ids: Sequence[int] | np.ndarray | None = None,
) -> None:
    """Store all captions in the ``captions/`` group ``g``, replacing any stored before.

    Args:
        g: the ``captions/`` group.
        texts: M caption strings.
        image_index: M indices of the owning images (positions in the store, not dataset ids).
        ids: optional M int64 caption ids.

    Raises:
        ValueError: the lengths differ, or an owner index is negative.
    """
    image_index = np.asarray(image_index, dtype=np.int64)
    if len(texts) != len(image_index) or (ids is not None and len(ids) != len(texts)):
        raise ValueError("texts, image_index and ids must have the same length")
    if len(image_index) and image_index.min() < 0:
        raise ValueError("negative caption image index")
    for name in ("text", "image", "ids"):
        if name in g:
            del g[name]
    g.create_dataset("text", data=np.array(list(texts), dtype=object), dtype=STRING_DTYPE, track_times=False)
    g.create_dataset("image", data=image_index, track_times=False)
    if ids is not None:
        g.create_dataset("ids", data=np.asarray(ids, dtype=np.int64), track_times=False)


def write_split(
    f: h5py.File,
    name: str,
    image_indices: Sequence[int] | np.ndarray,
    caption_indices: Sequence[int] | np.ndarray | None = None,
) -> None:
    """Store split ``name`` under ``splits/``, replacing one of the same name (captions must be stored first).

    Args:
        f: the store being written.
        name: e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
        image_indices: the split's images, in evaluation order.
        caption_indices: its captions, grouped by image in the order of ``image_indices``. ``None`` takes
            every stored caption of each image, in caption order.

    Raises:
        ValueError: a bad name, no captions stored yet, an image listed twice, or captions not grouped by the
            split's images.
    """
    if not name or "/" in name:
        raise ValueError(f"invalid split name {name!r}")
    images = np.asarray(image_indices, dtype=np.int64)
    g = f["captions"]
    if "image" not in g:
        raise ValueError("call set_captions() before add_split()")
    owners = g["image"][:]
    if caption_indices is None:
        captions = captions_of(owners, images)
    else:
        captions = np.asarray(caption_indices, dtype=np.int64)
    cpi = check_grouping(owners, images, captions, name)
    splits = f["splits"]
    if name in splits:
        del splits[name]
    s = splits.create_group(name)
    s.create_dataset("images", data=images, track_times=False)
    s.create_dataset("captions", data=captions, track_times=False)
    s.attrs["captions_per_image"] = cpi


def captions_of(owners: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Every caption of each of ``images``, grouped by image in that order, in caption order within an image."""
    order = np.argsort(owners, kind="stable")
    sorted_owners = owners[order]
    lo = np.searchsorted(sorted_owners, images, side="left")
    hi = np.searchsorted(sorted_owners, images, side="right")
    return np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(images) else np.zeros(0, np.int64)


def check_grouping(owners: np.ndarray, images: np.ndarray, captions: np.ndarray, name: str) -> int:
    """Check that ``captions`` run through ``images`` in order; return their count per image, or 0 if uneven.

    Raises:
        ValueError: an image is listed twice, a caption belongs to no image of the split, or the captions are
            not grouped by image in the split's image order.
    """
    position = {int(im): k for k, im in enumerate(images)}
    if len(position) != len(images):
        raise ValueError(f"split {name!r} lists an image twice")
    try:
        pos = np.array([position[int(owners[c])] for c in captions], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"split {name!r} has a caption of image {exc}, which is not in the split") from None
    if np.any(np.diff(pos) < 0):
        raise ValueError(f"captions of split {name!r} are not grouped by image in the split's image order")
    per_image = np.bincount(pos, minlength=len(images))
    return int(per_image[0]) if len(per_image) and np.all(per_image == per_image[0]) else 0


def check_references(f: h5py.File, n_written: int, partial: Path) -> None:
    """Before a store is finished: no caption and no split may refer to an image beyond the ``n_written``.

    Raises:
        MaxMatchError: naming the caption owner or the split that points too far.
    """
    owners = f["captions"]["image"][:]
    if len(owners) and owners.max() >= n_written:
        raise MaxMatchError(
            f"{partial}: a caption belongs to image {int(owners.max())}, but only {n_written} "
            "images were written.",
            hint="the captions and the images do not line up; check the caption file",
        )
    for name, s in f["splits"].items():
        imgs = s["images"][:]
        if len(imgs) and imgs.max() >= n_written:
            raise MaxMatchError(
                f"{partial}: split {name!r} refers to image {int(imgs.max())}, beyond the "
                f"{n_written} written.",
                hint="the split list and the images do not line up",
            )
