"""Opening a store for writing: the writer's arguments checked, the output path checked, and its ``.partial``
file created afresh or reopened to resume (see :class:`~maxmatch_cli.features.store.writer.StoreWriter`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import h5py

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.fingerprint import ContentHasher
from maxmatch_cli.features.store.partial import (
    StoreSpec,
    check_same_arguments,
    create_partial,
    drop_unflushed,
    open_partial,
)
from maxmatch_cli.features.store.schema import FEATURE_KINDS, PIXELS


def layout_of(path: str | os.PathLike, *, feature_kind: str, id_kind: str, compression: str | None,
              regions_per_image: int | None, image_root: object, with_boxes: bool) -> str:
    """Check the writer's arguments and return the layout they select: ``"files"``, ``"fixed"`` or ``"flat"``.

    Raises:
        ValueError: an argument a program got wrong.
        MaxMatchError: images with no region (the source features' shape).
    """
    if feature_kind not in FEATURE_KINDS:
        raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}")
    if id_kind not in ("int", "str"):
        raise ValueError(f"id_kind must be 'int' or 'str', got {id_kind!r}")
    if compression not in (None, "lzf"):
        raise ValueError("compression must be None or 'lzf' (gzip makes every read ~25x slower)")
    if regions_per_image is not None and int(regions_per_image) < 1:
        raise MaxMatchError(f"{path}: images with {regions_per_image} regions each cannot be stored.",
                            hint="every image needs at least one region: check the source features' shape")
    if feature_kind == PIXELS:
        if image_root is None or regions_per_image is not None or with_boxes:
            raise ValueError("an image-file store takes image_root, and no regions_per_image or boxes")
        return "files"
    return "fixed" if regions_per_image is not None else "flat"


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing store (unless ``overwrite``) or a folder at the path; create the parent folder."""
    if path.exists() and not overwrite:
        raise MaxMatchError(
            f"{path} already exists.",
            hint="choose another --out path, delete the file, or pass --overwrite to replace it",
        )
    if path.is_dir():
        raise MaxMatchError(f"{path} is a directory.", hint="--out must name a file, e.g. features.h5")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MaxMatchError(
                f"cannot create the folder {parent} for {path.name}: {exc.strerror}.",
                hint="choose a writable --out path",
            ) from None


class Opened(NamedTuple):
    """A ``.partial`` file ready for writing, and where writing continues in it."""

    file: h5py.File
    n_written: int
    rows: int
    hasher: ContentHasher
    resumed: bool


def start_or_resume(partial: Path, spec: StoreSpec, metadata: dict[str, Any], resume: bool) -> Opened:
    """Reopen ``partial`` to continue it (``resume`` and the file exists), else create it afresh.

    An unreadable file is started over with a warning; one made with other arguments is refused.
    """
    if not (resume and partial.exists()):
        return _create(partial, spec, metadata)
    try:
        f, stored, n_written = open_partial(partial, spec.layout)
    except (OSError, KeyError) as exc:
        # A kill during a write can leave the HDF5 metadata unreadable; nothing in it can be trusted.
        # stacklevel 4: the warning points at the code that made the writer (through its __init__ and _open).
        warnings.warn(f"{partial} could not be resumed ({exc}); starting over", stacklevel=4)
        return _create(partial, spec, metadata)
    check_same_arguments(f, partial, stored, spec.defining())
    rows = drop_unflushed(f, spec, n_written)
    hasher = ContentHasher.of_prefix(f, n_written if spec.layout == "fixed" else rows)
    return Opened(f, n_written, rows, hasher, True)


def _create(partial: Path, spec: StoreSpec, metadata: dict[str, Any]) -> Opened:
    f = create_partial(partial, spec, metadata)
    return Opened(f, 0, 0, ContentHasher(), False)
