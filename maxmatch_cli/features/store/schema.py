"""Schema v1 of the feature store: what a file holds, and the checks a reader runs on opening it.

Every source (synthetic demo data, SCAN precomp folders, bottom-up-attention TSV files, torchvision extraction
from images) becomes the same kind of file. Features are stored as float16, one HDF5 chunk per image, so that a
training item costs one chunk read.

Root attributes
    ``schema_version`` (int, 1); ``feature_kind`` (``"region"`` or ``"grid"``); ``source`` (free text naming where
    the features came from, e.g. ``"synthetic:demo"``, ``"scan-precomp:coco"``, ``"butd-tsv"``,
    ``"torchvision:resnet152"``); ``feature_dim`` (int D); ``layout`` (``"fixed"`` or ``"flat"``, see below);
    ``regions_per_image`` (int R, fixed layout only); ``created_with`` (``"maxmatch <version>"``); ``metadata``
    (a JSON object as a string, free form: preset, seed, backbone, image size, ...); ``args_fingerprint``
    (string identifying the arguments that produced the file, used to resume an interrupted extraction);
    ``n_written`` (int, images flushed so far); ``complete`` (bool, set last, after everything else is flushed);
    ``content_sha256`` (hex SHA-256 of every dataset's dtype, shape and bytes, recorded by the writer) and
    ``content_mtime_ns`` (the modification time the writer gave the finished file: the hash is trusted while the
    file keeps it; see :mod:`~maxmatch_cli.features.store.fingerprint`). Files written before these two still load.

``images/``
    ``features``: float16. Fixed layout: (N, R, D) with chunks (1, R, D), one chunk per image. Flat layout, for
    a variable number of regions per image (adaptive bottom-up attention, 10 to 100 boxes): (T, D) rows of all
    images one after the other, with ``offsets`` (N + 1,) int64 such that image i owns rows
    ``offsets[i]:offsets[i + 1]``. No compression (or lzf); never gzip, which costs ~25x per read.
    ``ids`` (N,): int64 or UTF-8 strings, the dataset's own image ids (COCO id, Flickr file name, ...).
    Optional ``boxes``: float32 (N, R, 4) or (T, 4), ``x1, y1, x2, y2`` in pixels; optional ``sizes``: int32
    (N, 2), ``width, height`` in pixels.

``captions/``
    ``text`` (M,) UTF-8 variable-length strings; ``image`` (M,) int64, the index of the owning image in
    ``images/``; optional ``ids`` (M,) int64.

``splits/<name>/``
    ``images`` (n,) int64 and ``captions`` (m,) int64, indices into the arrays above. The captions of a split
    are grouped by image, in the order of the split's images: with five captions per image, caption j of the
    split belongs to image j // 5 of the split, as the retrieval protocols expect. Attribute
    ``captions_per_image`` is that count when it is the same for every image of the split, else 0.

Other groups (e.g. ``synthetic/`` with the generator's object table) may be present; readers ignore them.

Image-file stores (``feature_kind = "pixels"``)
    For end-to-end training of a CNN (``model.image_encoder = "cnn"``) the store holds no features, only an index
    of the image files: ``layout`` is ``"files"``, ``feature_dim`` is 3 (RGB channels) and a root attribute
    ``image_root`` (str) names the image folder as an absolute path when the index was made. ``images/`` holds
    ``files`` (N,) UTF-8 paths relative to ``image_root`` instead of ``features``, plus ``ids`` and ``sizes``
    as above; ``captions/`` and ``splits/`` are as above. Training decodes ``image_root/files[i]`` on the fly
    (``data.image_root`` in a recipe overrides the root, e.g. for a copy on local scratch). Made by
    ``maxmatch extract-features images DIR --captions JSON --kind pixels``. This is an addition to schema v1:
    stores of the other kinds are unchanged, and a reader that predates it refuses the file by its kind.

Image files of extracted features (grid and region stores)
    A grid or region store extracted from image files (``maxmatch extract-features images DIR --kind
    grid|region``) also records where they are, as an image-file store does: the root attribute ``image_root``
    (str, the image folder as an absolute path at extraction time) and ``images/files`` (N,) UTF-8 paths
    relative to it, beside ``features``. Both are present or both absent; stores from other sources (synthetic,
    SCAN precomp, BUTD TSV) and those written before this addition have neither, and load as before (their
    images are known by id only). Readers refuse a path that leaves the folder (absolute, or with a ``..``
    part) as for image-file stores. Consumers use the files to show images (thumbnails in ``analyze-collapse``,
    paths in ``query``); a folder moved since is given again by the consumer (e.g. ``--images DIR``). This is an
    addition to schema v1: a reader that predates it ignores both.

The checks below raise :class:`~maxmatch_cli.errors.MaxMatchError` with the file's path and the fix; the reader
(:mod:`maxmatch_cli.features.store.reader`) calls them in the order a file is opened.
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

SCHEMA_VERSION = 1
FEATURE_KINDS = ("region", "grid", "pixels")
LAYOUTS = ("fixed", "flat", "files")
PIXELS = "pixels"  # the kind of image-file stores (no features)
PARTIAL_SUFFIX = ".partial"

# Rows per chunk in the flat layout: about one image's worth of regions (BUTD: 10-100 boxes).
FLAT_CHUNK_ROWS = 48
STRING_DTYPE = h5py.string_dtype("utf-8")


def partial_path(path: str | os.PathLike) -> Path:
    """Where :class:`StoreWriter` writes before the atomic rename: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def inconsistent(path: Path, what: str) -> MaxMatchError:
    """The error for a store whose datasets contradict each other (``what`` says how)."""
    return MaxMatchError(f"{path} is inconsistent: {what}.", hint="re-create it with maxmatch extract-features")


def hdf5_open_error(path: Path, exc: Exception) -> MaxMatchError:
    """The error for a file with an HDF5 signature that h5py cannot open: truncated, or otherwise corrupt."""
    detail = str(exc)
    if "truncated" in detail:
        what = "is truncated (the file is shorter than its header says; an interrupted copy or download?)"
    else:
        what = "is corrupt or unreadable as HDF5"
    return MaxMatchError(
        f"{path} {what}: {detail}",
        hint="copy or re-create the file (maxmatch extract-features ...)",
    )


def check_store_path(path: Path, allow_incomplete: bool) -> None:
    """Refuse, before opening it, a path that cannot hold a store: missing, a folder, a ``.partial``, not HDF5.

    Args:
        path: the file to open.
        allow_incomplete: a ``.partial`` file is accepted (for ``features info`` and merging).

    Raises:
        MaxMatchError: the path is not an openable store; the message says why and what to do.
    """
    is_partial = path.name.endswith(PARTIAL_SUFFIX)
    if not path.exists():
        if partial_path(path).exists():
            raise MaxMatchError(
                f"{path} is not finished: only {partial_path(path).name} exists (an extraction is running "
                "or was interrupted).",
                hint="re-run the same extract-features command to resume it",
            )
        raise MaxMatchError(
            f"feature file {path} does not exist.",
            hint="create one with `maxmatch extract-features synthetic demo --out PATH` or check the path",
        )
    if path.is_dir():
        raise MaxMatchError(f"{path} is a directory, not a feature file.", hint="pass the .h5 file itself")
    if is_partial and not allow_incomplete:
        raise MaxMatchError(
            f"{path} is an unfinished extraction (a .partial file).",
            hint="re-run the same extract-features command to finish it, then use "
            f"{path.name[: -len(PARTIAL_SUFFIX)]}",
        )
    if not h5py.is_hdf5(path):
        raise MaxMatchError(
            f"{path} is not an HDF5 file (no HDF5 signature; empty, corrupt, or another format).",
            hint="pass a feature file written by maxmatch extract-features",
        )


@dataclass(frozen=True)
class Header:
    """The root attributes of a store, checked (see the module docstring for their meaning)."""

    schema_version: int
    complete: bool
    n_written: int
    feature_kind: str
    source: str
    feature_dim: int
    layout: str
    created_with: str
    args_fingerprint: str
    metadata: dict[str, Any]
    image_root: str | None


def _garbled(path: Path, name: str, value: Any, expected: str) -> MaxMatchError:
    shown = repr(value)
    return MaxMatchError(f"{path}: the root attribute {name} is {shown[:80]}{'...' if len(shown) > 80 else ''}, "
                         f"not {expected}: the file is damaged or was not written by maxmatch.",
                         hint="re-create it with maxmatch extract-features")


def _int_attr(attrs: h5py.AttributeManager, name: str, path: Path, default: int | None = None) -> int:
    """A root attribute that must be a non-negative integer (a missing one raises KeyError without a default)."""
    value = attrs[name] if default is None else attrs.get(name, default)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise _garbled(path, name, value, "a non-negative integer")
    return int(value)


def _str_attr(attrs: h5py.AttributeManager, name: str, path: Path, default: str | None = None) -> str:
    """A root attribute that must be text (a missing one raises KeyError without a default)."""
    value = attrs[name] if default is None else attrs.get(name, default)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _garbled(path, name, value, "UTF-8 text") from None
    if not isinstance(value, str):
        raise _garbled(path, name, value, "text")
    return value


def _metadata_attr(attrs: h5py.AttributeManager, path: Path) -> dict[str, Any]:
    """The ``metadata`` root attribute: a JSON object (``{}`` when absent or empty)."""
    text = _str_attr(attrs, "metadata", path, "{}") or "{}"
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _garbled(path, "metadata", text, f"JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(metadata, dict):
        raise _garbled(path, "metadata", text, "a JSON object")
    return metadata


def read_header(f: h5py.File, path: Path, allow_incomplete: bool) -> Header:
    """Read and check the root attributes and the required groups of an open store.

    Args:
        f: the open file.
        path: its path, for messages.
        allow_incomplete: accept a file whose ``complete`` flag is not set.

    Raises:
        MaxMatchError: not a store, another schema version, unfinished, a required group missing, or an unknown
            kind or layout.
        KeyError: a required attribute is missing (the reader reports the file as not a complete store).
    """
    attrs = f.attrs
    if "schema_version" not in attrs:
        raise MaxMatchError(
            f"{path} is an HDF5 file but not a maxmatch feature store (no schema_version attribute).",
            hint="convert your features with maxmatch extract-features (precomp, tsv or images; see "
            "maxmatch extract-features --help)",
        )
    version = _int_attr(attrs, "schema_version", path)
    if version != SCHEMA_VERSION:
        raise MaxMatchError(
            f"{path} uses feature-store schema version {version}; this maxmatch ({__version__}) reads "
            f"version {SCHEMA_VERSION}.",
            hint="re-create the file with this version (maxmatch extract-features) or use a matching maxmatch",
        )
    complete = bool(attrs.get("complete", False))
    if not complete and not allow_incomplete:
        raise MaxMatchError(
            f"{path} is incomplete (its 'complete' flag is not set: the extraction was interrupted).",
            hint="re-run the extract-features command that made it, or delete it and extract again",
        )
    for group in ("images", "captions"):
        if group not in f:
            raise MaxMatchError(
                f"{path} lacks the '{group}/' group required by schema v{SCHEMA_VERSION}.",
                hint="re-create it with maxmatch extract-features",
            )
    kind, source = _str_attr(attrs, "feature_kind", path), _str_attr(attrs, "source", path)
    feature_dim, layout = _int_attr(attrs, "feature_dim", path), _str_attr(attrs, "layout", path)
    created_with = _str_attr(attrs, "created_with", path, "")
    fingerprint = _str_attr(attrs, "args_fingerprint", path, "")
    metadata = _metadata_attr(attrs, path)
    if kind not in FEATURE_KINDS or layout not in LAYOUTS or (kind == PIXELS) != (layout == "files"):
        raise MaxMatchError(
            f"{path} has feature_kind={kind!r}, layout={layout!r}; expected one of "
            f"{FEATURE_KINDS} and {LAYOUTS} (layout 'files' with kind 'pixels' only).",
            hint="re-create it with maxmatch extract-features",
        )
    return Header(
        schema_version=version, complete=complete, n_written=_int_attr(attrs, "n_written", path, 0), feature_kind=kind,
        source=source, feature_dim=feature_dim, layout=layout, created_with=created_with,
        args_fingerprint=fingerprint, metadata=metadata,
        image_root=_str_attr(attrs, "image_root", path) if kind == PIXELS or "image_root" in attrs else None,
    )


def check_features(images: h5py.Group, header: Header, path: Path) -> tuple[int, int | None, np.ndarray | None]:
    """Check ``images/features`` (and ``images/offsets`` in the flat layout) against the header.

    Args:
        images: the ``images/`` group of a feature store (not an image-file store).
        header: its checked root attributes.
        path: the file, for messages.

    Returns:
        ``(n_alloc, regions_per_image, offsets)``: the images the file has room for, R (``None`` in the flat
        layout) and the offsets of the readable images (``None`` in the fixed layout).

    Raises:
        MaxMatchError: wrong dtype or shape, or offsets that do not describe the stored rows.
    """
    feats = images["features"]
    if feats.dtype != np.float16 and feats.dtype != np.float32:
        raise inconsistent(path, f"images/features has dtype {feats.dtype}, expected float16")
    if header.layout == "fixed":
        if feats.ndim != 3 or feats.shape[2] != header.feature_dim:
            raise inconsistent(
                path,
                f"images/features has shape {feats.shape}, expected (N, R, {header.feature_dim}) for the "
                "fixed layout",
            )
        return int(feats.shape[0]), int(feats.shape[1]), None
    if feats.ndim != 2 or feats.shape[1] != header.feature_dim:
        raise inconsistent(
            path, f"images/features has shape {feats.shape}, expected (T, {header.feature_dim}) for the flat layout"
        )
    offsets = np.asarray(images["offsets"][:], dtype=np.int64)
    n_alloc = len(offsets) - 1
    n = n_alloc if header.complete else min(header.n_written, n_alloc)
    offsets = offsets[: n + 1]
    if n_alloc < 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > feats.shape[0]:
        raise inconsistent(path, "images/offsets is not a non-decreasing list starting at 0 within the rows")
    if header.complete and offsets[-1] != feats.shape[0]:
        raise inconsistent(path, f"images/offsets ends at {offsets[-1]} but there are {feats.shape[0]} rows")
    return n_alloc, None, offsets
