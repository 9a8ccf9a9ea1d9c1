"""HDF5 feature store, schema v1: the one file that ``train`` and ``evaluate`` read.

Every source (synthetic demo data, SCAN precomp folders, bottom-up-attention TSV files, torchvision extraction
from images) becomes the same kind of file. Features are stored as float16, one HDF5 chunk per image, so that a
training item costs one chunk read.

Schema v1
---------
Root attributes
    ``schema_version`` (int, 1); ``feature_kind`` (``"region"`` or ``"grid"``); ``source`` (free text naming where
    the features came from, e.g. ``"synthetic:demo"``, ``"scan-precomp:coco"``, ``"butd-tsv"``,
    ``"torchvision:resnet152"``); ``feature_dim`` (int D); ``layout`` (``"fixed"`` or ``"flat"``, see below);
    ``regions_per_image`` (int R, fixed layout only); ``created_with`` (``"maxmatch <version>"``); ``metadata``
    (a JSON object as a string, free form: preset, seed, backbone, image size, ...); ``args_fingerprint``
    (string identifying the arguments that produced the file, used to resume an interrupted extraction);
    ``n_written`` (int, images flushed so far); ``complete`` (bool, set last, after everything else is flushed).

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
    ``maxmatch extract-features --images DIR --captions JSON --kind pixels``. This is an addition to schema v1:
    stores of the other kinds are unchanged, and a reader that predates it refuses the file by its kind.

Writing and resuming
--------------------
:class:`StoreWriter` writes ``<path>.partial`` and renames it to ``<path>`` only after ``complete`` is set and
the file is closed and synced, so a file at ``<path>`` is always complete and a crashed run leaves only a
``.partial``. Images are appended in order; ``n_written`` is updated at each flush. Re-running with
``resume=True`` and the same ``args_fingerprint`` continues after the last flushed image; a different
fingerprint is refused with a message. :func:`store_state` tells an importer whether there is nothing, a
partial file or a finished file at a path, so that re-running a finished extraction does nothing.

Reading
-------
:func:`open_store` validates the file on open and explains what is wrong. The returned :class:`FeatureStore`
opens its HDF5 handle lazily in each process, so it can be handed to DataLoader workers (it pickles without
the handle and reopens on first access after fork or spawn).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli import __version__
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import publish

SCHEMA_VERSION = 1
FEATURE_KINDS = ("region", "grid", "pixels")
LAYOUTS = ("fixed", "flat", "files")
PIXELS = "pixels"  # the kind of image-file stores (no features)
PARTIAL_SUFFIX = ".partial"
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)

# Rows per chunk in the flat layout: about one image's worth of regions (BUTD: 10-100 boxes).
_FLAT_CHUNK_ROWS = 48
_STR = h5py.string_dtype("utf-8")


def partial_path(path: str | os.PathLike) -> Path:
    """Where :class:`StoreWriter` writes before the atomic rename: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def args_fingerprint(**arguments: Any) -> str:
    """A stable short hash of the arguments that define an extraction (for resume checks).

    Args:
        **arguments: JSON-serialisable values (paths should be given as strings, resolved by the caller).

    Returns:
        A 16-character hex string, equal for equal arguments in any order.
    """
    blob = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_state(path: str | os.PathLike, args_fingerprint: str | None = None) -> str:
    """Tell whether ``path`` holds a finished store, an interrupted one, or nothing.

    Args:
        path: final path of the store (without ``.partial``).
        args_fingerprint: if given and a finished store exists, it must have been made with these arguments.

    Returns:
        ``"complete"`` (a finished store at ``path``), ``"partial"`` (only ``path.partial`` exists) or
        ``"missing"``.

    Raises:
        MaxMatchError: a finished store exists but was made with different arguments, or is not a store.
    """
    path = Path(path)
    if path.exists():
        store = open_store(path)
        stored = store.args_fingerprint
        store.close()
        if args_fingerprint is not None and stored and stored != args_fingerprint:
            raise MaxMatchError(
                f"{path} already exists and was made with different arguments.",
                hint="choose another output path, delete the file, or pass --overwrite to replace it",
            )
        return "complete"
    if partial_path(path).exists():
        return "partial"
    return "missing"


# --------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False) -> FeatureStore:
    """Open and validate a feature store.

    Args:
        path: the ``.h5`` file written by ``maxmatch extract-features`` (or :class:`StoreWriter`).
        allow_incomplete: open an interrupted file (``complete`` false, or a ``.partial``) anyway, exposing
            only the images flushed so far; for ``maxmatch features info`` and merging.

    Returns:
        A :class:`FeatureStore`.

    Raises:
        MaxMatchError: the file is missing, not HDF5, corrupt or truncated, of another schema version,
            incomplete, or inconsistent; the message names the file and the fix.
    """
    return FeatureStore(path, allow_incomplete=allow_incomplete)


def describe_store(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`FeatureStore.describe` of a finished store, or of an unfinished one (``complete`` false)."""
    path = Path(path)
    target = partial_path(path) if not path.exists() and partial_path(path).exists() else path
    with open_store(target, allow_incomplete=True) as store:
        return store.describe()


def _hdf5_open_error(path: Path, exc: Exception) -> MaxMatchError:
    detail = str(exc)
    if "truncated" in detail:
        what = "is truncated (the file is shorter than its header says; an interrupted copy or download?)"
    else:
        what = "is corrupt or unreadable as HDF5"
    return MaxMatchError(
        f"{path} {what}: {detail}",
        hint="copy or re-create the file (maxmatch extract-features ...)",
    )


class FeatureStore:
    """Read access to a schema-v1 feature store; see the module docstring for the layout.

    Cheap metadata (ids, offsets, caption owners, splits) is read once on open; features are read per image.
    The HDF5 handle is opened lazily per process, so instances can be pickled into DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.allow_incomplete = allow_incomplete
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._captions_cache: list[str] | None = None
        self._fingerprint: str | None = None
        self._validate_path()
        f = self._h5()
        try:
            self._load_metadata(f)
        except KeyError as exc:  # a group or dataset is missing
            self.close()
            raise MaxMatchError(
                f"{self.path} is not a complete maxmatch feature store: {exc}",
                hint="re-create it with maxmatch extract-features",
            ) from None
        except MaxMatchError:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------------------

    def _validate_path(self) -> None:
        path = self.path
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
                hint="create one with `maxmatch extract-features --synthetic demo --out PATH` or check the path",
            )
        if path.is_dir():
            raise MaxMatchError(f"{path} is a directory, not a feature file.", hint="pass the .h5 file itself")
        if is_partial and not self.allow_incomplete:
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

    def _h5(self) -> h5py.File:
        """The HDF5 handle of this process, opened on first use (and again after a fork or unpickling)."""
        if self._file is None or self._pid != os.getpid():
            try:
                # A small chunk cache: items are read once per epoch, caching them only costs memory per worker.
                self._file = h5py.File(self.path, "r", rdcc_nbytes=1 << 20)
            except OSError as exc:
                raise _hdf5_open_error(self.path, exc) from None
            self._pid = os.getpid()
            self._features = self._file.get("images/features")  # None until validated (foreign files)
            feats = self._features
            self._direct = (
                isinstance(feats, h5py.Dataset) and feats.ndim == 3 and feats.dtype == np.dtype("<f2")
                and feats.chunks == (1, *feats.shape[1:]) and not feats.compression and not feats.shuffle
                and not feats.fletcher32 and sys.byteorder == "little"
            )
            self._chunk_bytes = int(np.prod(feats.shape[1:])) * 2 if self._direct else 0
        return self._file

    def _load_metadata(self, f: h5py.File) -> None:
        path = self.path
        attrs = f.attrs
        if "schema_version" not in attrs:
            raise MaxMatchError(
                f"{path} is an HDF5 file but not a maxmatch feature store (no schema_version attribute).",
                hint="convert your features with maxmatch extract-features (--from-precomp, --from-butd-tsv, "
                "--images)",
            )
        version = int(attrs["schema_version"])
        if version != SCHEMA_VERSION:
            raise MaxMatchError(
                f"{path} uses feature-store schema version {version}; this maxmatch ({__version__}) reads "
                f"version {SCHEMA_VERSION}.",
                hint="re-create the file with this version (maxmatch extract-features) or use a matching maxmatch",
            )
        self.schema_version = version
        self.complete = bool(attrs.get("complete", False))
        self.n_written = int(attrs.get("n_written", 0))
        if not self.complete and not self.allow_incomplete:
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
        self.feature_kind = str(attrs["feature_kind"])
        self.source = str(attrs["source"])
        self.feature_dim = int(attrs["feature_dim"])
        self.layout = str(attrs["layout"])
        self.created_with = str(attrs.get("created_with", ""))
        self.args_fingerprint = str(attrs.get("args_fingerprint", ""))
        self.metadata: dict[str, Any] = json.loads(attrs.get("metadata", "{}") or "{}")
        if (self.feature_kind not in FEATURE_KINDS or self.layout not in LAYOUTS
                or (self.feature_kind == PIXELS) != (self.layout == "files")):
            raise MaxMatchError(
                f"{path} has feature_kind={self.feature_kind!r}, layout={self.layout!r}; expected one of "
                f"{FEATURE_KINDS} and {LAYOUTS} (layout 'files' with kind 'pixels' only).",
                hint="re-create it with maxmatch extract-features",
            )

        self.image_files: np.ndarray | None = None  # relative paths, image-file stores only
        self.image_root: str | None = str(attrs["image_root"]) if self.feature_kind == PIXELS else None
        if self.feature_kind == PIXELS:
            self.regions_per_image, self._offsets = None, None
            files = f["images/files"]
            n_alloc = len(files)
        else:
            n_alloc = self._check_features(f["images/features"])
        n = n_alloc if self.complete else min(self.n_written, n_alloc)
        self.n_images = n
        if self.feature_kind == PIXELS:
            self.image_files = np.asarray(files.asstr()[:n], dtype=object)
        ids = f["images/ids"]
        self.image_ids = (ids.asstr()[:n] if h5py.check_string_dtype(ids.dtype) else ids[:n]).copy()
        if self.complete and len(ids) != n:
            raise self._inconsistent(f"images/ids has {len(ids)} entries for {n} images")
        self.has_boxes = "boxes" in f["images"]
        self.image_sizes = f["images/sizes"][:n] if "sizes" in f["images"] else None

        if not self.complete and "image" not in f["captions"]:  # interrupted before the captions were written
            self.caption_image = np.zeros(0, dtype=np.int64)
            self.n_captions = 0
            self.caption_ids = None
            self._captions_cache = []
            self._splits, self._split_cpi = {}, {}
            return
        self.caption_image = np.asarray(f["captions/image"][:], dtype=np.int64)
        self.n_captions = len(self.caption_image)
        if len(f["captions/text"]) != self.n_captions:
            raise self._inconsistent(
                f"captions/text has {len(f['captions/text'])} entries, captions/image {self.n_captions}"
            )
        if self.n_captions and (self.caption_image.min() < 0 or self.caption_image.max() >= max(n, 1)):
            if self.complete:
                raise self._inconsistent("captions/image points outside the image range")
        self.caption_ids = f["captions/ids"][:] if "ids" in f["captions"] else None

        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._split_cpi: dict[str, int] = {}
        for name, group in (f["splits"].items() if "splits" in f else []):
            images = np.asarray(group["images"][:], dtype=np.int64)
            captions = np.asarray(group["captions"][:], dtype=np.int64)
            if self.complete and (
                (len(images) and (images.min() < 0 or images.max() >= n))
                or (len(captions) and (captions.min() < 0 or captions.max() >= self.n_captions))
            ):
                raise self._inconsistent(f"split '{name}' holds indices outside the stored images or captions")
            self._splits[name] = (images, captions)
            self._split_cpi[name] = int(group.attrs.get("captions_per_image", 0))

    def _check_features(self, feats: h5py.Dataset) -> int:
        if feats.dtype != np.float16 and feats.dtype != np.float32:
            raise self._inconsistent(f"images/features has dtype {feats.dtype}, expected float16")
        if self.layout == "fixed":
            if feats.ndim != 3 or feats.shape[2] != self.feature_dim:
                raise self._inconsistent(
                    f"images/features has shape {feats.shape}, expected (N, R, {self.feature_dim}) for the "
                    "fixed layout"
                )
            self.regions_per_image = int(feats.shape[1])
            self._offsets = None
            return int(feats.shape[0])
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise self._inconsistent(
                f"images/features has shape {feats.shape}, expected (T, {self.feature_dim}) for the flat layout"
            )
        self.regions_per_image = None
        offsets = np.asarray(self._h5()["images/offsets"][:], dtype=np.int64)
        n_alloc = len(offsets) - 1
        n = n_alloc if self.complete else min(self.n_written, n_alloc)
        offsets = offsets[: n + 1]
        if n_alloc < 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > feats.shape[0]:
            raise self._inconsistent("images/offsets is not a non-decreasing list starting at 0 within the rows")
        if self.complete and offsets[-1] != feats.shape[0]:
            raise self._inconsistent(f"images/offsets ends at {offsets[-1]} but there are {feats.shape[0]} rows")
        self._offsets = offsets
        return n_alloc

    def _inconsistent(self, what: str) -> MaxMatchError:
        return MaxMatchError(
            f"{self.path} is inconsistent: {what}.", hint="re-create it with maxmatch extract-features"
        )

    # -- pickling (DataLoader workers) ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state.pop("_features", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        """Close this process's HDF5 handle (it reopens on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a handle that h5py already invalidated
                pass
        self._file = None
        self._pid = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.image_files is not None:
            return (f"FeatureStore({str(self.path)!r}, pixels, {self.n_images} image files under {self.image_root}, "
                    f"{self.n_captions} captions, splits={self.splits})")
        return (
            f"FeatureStore({str(self.path)!r}, {self.feature_kind}, {self.n_images} images x "
            f"{self.max_regions} x {self.feature_dim}, {self.n_captions} captions, splits={self.splits})"
        )

    # -- splits and captions -------------------------------------------------------------------------------

    @property
    def splits(self) -> list[str]:
        """Names of the stored splits, sorted."""
        return sorted(self._splits)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Image and caption indices of a split.

        Returns:
            ``(images (n,), captions (m,))`` int64 arrays; captions are grouped by image in the order of
            ``images`` (caption j belongs to image j // 5 with five captions per image).

        Raises:
            MaxMatchError: no split of that name (the message lists the available ones).
        """
        if name not in self._splits:
            available = ", ".join(self.splits) or "none"
            raise MaxMatchError(
                f"{self.path} has no split '{name}'; available splits: {available}.",
                hint="pick one of the available splits (e.g. --split test, or data.*_split in the recipe)",
            )
        images, captions = self._splits[name]
        return images.copy(), captions.copy()

    def captions_per_image(self, name: str) -> int:
        """Captions per image in split ``name`` if the same for every image, else 0."""
        self.split(name)
        return self._split_cpi[name]

    def captions_text(self, indices: Iterable[int] | np.ndarray | None = None) -> list[str]:
        """Caption strings at the given global indices (all captions if ``None``)."""
        if self._captions_cache is None:
            self._captions_cache = list(self._h5()["captions/text"].asstr()[:])
        if indices is None:
            return list(self._captions_cache)
        cache = self._captions_cache
        return [cache[int(i)] for i in np.asarray(indices, dtype=np.int64).reshape(-1)]

    # -- features ------------------------------------------------------------------------------------------

    @property
    def region_counts(self) -> np.ndarray:
        """(N,) int64: number of regions (or grid cells) of each image (0 in an image-file store)."""
        if self.image_files is not None:
            return np.zeros(self.n_images, dtype=np.int64)
        if self._offsets is None:
            return np.full(self.n_images, self.regions_per_image, dtype=np.int64)
        return np.diff(self._offsets)

    @property
    def max_regions(self) -> int:
        """The largest number of regions of any image (R for the fixed layout; 0 in an image-file store)."""
        if self.image_files is not None:
            return 0
        if self._offsets is None:
            return int(self.regions_per_image)
        return int(self.region_counts.max(initial=0))

    def n_regions(self, i: int) -> int:
        """Number of regions of image ``i``."""
        self._check_index(i)
        if self.image_files is not None:
            return 0
        if self._offsets is None:
            return int(self.regions_per_image)
        return int(self._offsets[i + 1] - self._offsets[i])

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range for {self.n_images} images in {self.path}")

    def image_features(self, i: int, dtype: type = np.float32) -> np.ndarray:
        """Local features of image ``i`` as ``(R_i, D)``; one chunk read in the fixed layout.

        Args:
            i: image index.
            dtype: ``np.float32`` (default) or ``np.float16`` (as stored, no conversion).
        """
        i = int(i)
        self._check_index(i)
        if self.image_files is not None:
            raise MaxMatchError(
                f"{self.path} indexes image files (feature_kind 'pixels'); it holds no features.",
                hint="train on it with model.image_encoder=cnn, or extract features with --kind grid|region",
            )
        self._h5()
        feats = self._features
        try:
            if self._offsets is None:
                raw = self._read_chunk(i) if self._direct else None
                half = feats[i] if raw is None else raw
            else:
                half = feats[self._offsets[i] : self._offsets[i + 1]]
        except OSError as exc:
            raise MaxMatchError(
                f"{self.path}: reading the features of image {i} failed ({exc}); the file is damaged.",
                hint="re-create or re-copy the feature file",
            ) from None
        if half.dtype == dtype:
            return half if half.flags.writeable else half.copy()
        if half.dtype == np.float16 and dtype == np.float32:
            # A table lookup converts float16 to float32 exactly and faster than numpy's astype.
            return _HALF_TO_FLOAT.take(half.view(np.uint16))
        return half.astype(dtype)

    def _read_chunk(self, i: int) -> np.ndarray | None:
        """The stored chunk of image ``i`` without HDF5's selection machinery (about half the cost of ds[i])."""
        mask, data = self._features.id.read_direct_chunk((i, 0, 0))
        if mask or len(data) != self._chunk_bytes:
            return None
        return np.frombuffer(data, dtype="<f2").reshape(self.regions_per_image, self.feature_dim)

    def image_features_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of several images, zero-padded to the longest.

        Returns:
            ``(features (B, Rmax, D) float32, n_regions (B,) int64)``.
        """
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        counts = np.array([self.n_regions(i) for i in indices], dtype=np.int64)
        out = np.zeros((len(indices), int(counts.max(initial=0)), self.feature_dim), dtype=np.float32)
        for row, i in enumerate(indices):
            out[row, : counts[row]] = self.image_features(i)
        return out, counts

    def image_path(self, i: int, root: str | os.PathLike | None = None) -> Path:
        """The file of image ``i`` in an image-file store: ``root`` (default: ``image_root``) / its relative path."""
        self._check_index(i)
        if self.image_files is None:
            raise ValueError(f"{self.path} holds features, not image files")
        return Path(root or self.image_root or "") / self.image_files[int(i)]

    def image_boxes(self, i: int) -> np.ndarray | None:
        """Boxes of image ``i`` as float32 ``(R_i, 4)`` (x1, y1, x2, y2), or ``None`` if none are stored."""
        if not self.has_boxes:
            return None
        self._check_index(i)
        boxes = self._h5()["images/boxes"]
        if self._offsets is None:
            return boxes[i].astype(np.float32)
        return boxes[self._offsets[i] : self._offsets[i + 1]].astype(np.float32)

    # -- provenance ----------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A cheap, stable identity of the contents (independent of path and file timestamps).

        Hashes the defining attributes, the sizes, the caption-to-image map, the split indices, a few caption
        strings and the features of a few images spread over the file. Used in checkpoint provenance.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        header = {
            "schema_version": self.schema_version,
            "feature_kind": self.feature_kind,
            "source": self.source,
            "feature_dim": self.feature_dim,
            "layout": self.layout,
            "n_images": self.n_images,
            "n_captions": self.n_captions,
            "max_regions": self.max_regions,
            "splits": {name: [len(a), len(b)] for name, (a, b) in sorted(self._splits.items())},
        }
        h.update(json.dumps(header, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.caption_image).tobytes())
        for name in sorted(self._splits):
            for arr in self._splits[name]:
                h.update(np.ascontiguousarray(arr).tobytes())
        if self._offsets is not None:
            h.update(self._offsets.tobytes())
        texts = self._h5()["captions"].get("text")
        for j in sorted({0, self.n_captions // 2, self.n_captions - 1}):
            if 0 <= j < self.n_captions:
                h.update(texts.asstr()[j].encode())
        if self.image_files is not None:  # the image files themselves are not hashed: their paths name them
            h.update("\n".join(self.image_files).encode())
        elif self.n_images:
            for i in np.unique(np.linspace(0, self.n_images - 1, num=min(8, self.n_images)).astype(int)):
                rows = self._features[i] if self._offsets is None else self._features[
                    self._offsets[i] : self._offsets[i + 1]
                ]
                h.update(np.ascontiguousarray(rows).tobytes())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """A summary for ``maxmatch features info``: schema, source, sizes, splits, feature shape, disk size."""
        info: dict[str, Any] = {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "complete": self.complete,
            **({} if self.complete else {"images_written": self.n_images}),
            "feature_kind": self.feature_kind,
            "source": self.source,
            "created_with": self.created_with,
            "layout": self.layout,
            "n_images": self.n_images,
            "n_captions": self.n_captions,
        }
        if self.image_files is not None:
            # An image-file store: the image root and file count instead of feature shapes.
            info["image_root"] = self.image_root
            info["image_files"] = f"{self.n_images} paths relative to image_root"
        else:
            feats = self._h5()["images/features"]
            counts = self.region_counts
            info.update({
                "feature_shape": list(feats.shape),
                "feature_dtype": str(feats.dtype),
                "feature_dim": self.feature_dim,
                "chunks": list(feats.chunks) if feats.chunks else None,
                "compression": feats.compression,
                "regions_per_image": {
                    "min": int(counts.min()) if len(counts) else 0,
                    "max": int(counts.max(initial=0)),
                    "mean": float(counts.mean()) if len(counts) else 0.0,
                },
                "has_boxes": self.has_boxes,
            })
        info.update({
            "has_image_sizes": self.image_sizes is not None,
            "splits": {
                name: {"images": int(len(a)), "captions": int(len(b)), "captions_per_image": self._split_cpi[name]}
                for name, (a, b) in sorted(self._splits.items())
            },
            "size_bytes": self.path.stat().st_size,
            "fingerprint": self.fingerprint(),
            "metadata": self.metadata,
        })
        return info


# --------------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------------


def _to_float16(x: np.ndarray) -> np.ndarray | None:
    """``x`` as float16, or ``None`` if it holds NaN/inf or values beyond the float16 range."""
    if x.dtype == np.float16:
        bits = np.ascontiguousarray(x).view(np.uint16)
        if bits.size == 0 or bits.max() < 0x7C00:  # fast path: all non-negative and finite
            return x
        return None if ((bits & 0x7FFF) >= 0x7C00).any() else x  # exponent all ones: inf or NaN
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if x32.size and not (np.isfinite(x32).all() and max(-float(x32.min()), float(x32.max())) <= 65504.0):
        return None
    try:
        import torch  # converts ~4x faster than numpy

        return torch.from_numpy(x32).to(torch.float16).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency, but the store does not need it
        return x32.astype(np.float16)


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
        image_root: the image folder of an image-file store (stored as the ``image_root`` attribute).
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
        chunk_rows: int = _FLAT_CHUNK_ROWS,
        image_root: str | os.PathLike | None = None,
    ):
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}")
        if id_kind not in ("int", "str"):
            raise ValueError(f"id_kind must be 'int' or 'str', got {id_kind!r}")
        if compression not in (None, "lzf"):
            raise ValueError("compression must be None or 'lzf' (gzip makes every read ~25x slower)")
        self.path = Path(path)
        self.partial = partial_path(self.path)
        if feature_kind == PIXELS:
            if image_root is None or regions_per_image is not None or with_boxes:
                raise ValueError("an image-file store takes image_root, and no regions_per_image or boxes")
            self.layout = "files"
        else:
            self.layout = "fixed" if regions_per_image is not None else "flat"
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
        self.resumed = False
        self._since_flush = 0
        self._finished = False

        if self.path.exists() and not overwrite:
            raise MaxMatchError(
                f"{self.path} already exists.",
                hint="choose another --out path, delete the file, or pass --overwrite to replace it",
            )
        if self.path.is_dir():
            raise MaxMatchError(f"{self.path} is a directory.", hint="--out must name a file, e.g. features.h5")
        parent = self.path.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MaxMatchError(
                    f"cannot create the folder {parent} for {self.path.name}: {exc.strerror}.",
                    hint="choose a writable --out path",
                ) from None
        if resume and self.partial.exists():
            self._file = self._reopen_partial()
        else:
            self._file = self._create()

    @classmethod
    def open_or_resume(cls, path: str | os.PathLike, **kwargs: Any) -> StoreWriter:
        """Same as ``StoreWriter(path, resume=True, **kwargs)``: continue ``path.partial`` if present."""
        kwargs["resume"] = True
        return cls(path, **kwargs)

    # -- set-up --------------------------------------------------------------------------------------------

    def _create(self) -> h5py.File:
        if self.partial.exists():
            self.partial.unlink()
        try:
            f = h5py.File(self.partial, "w", track_order=True)
        except OSError as exc:
            raise MaxMatchError(
                f"cannot write {self.partial}: {exc}.", hint="choose a writable --out path"
            ) from None
        a = f.attrs
        a["schema_version"] = SCHEMA_VERSION
        a["feature_kind"] = self.feature_kind
        a["source"] = self.source
        a["feature_dim"] = self.feature_dim
        a["layout"] = self.layout
        if self.regions_per_image is not None:
            a["regions_per_image"] = int(self.regions_per_image)
        a["created_with"] = f"maxmatch {__version__}"
        a["metadata"] = json.dumps(self.metadata, sort_keys=True)
        a["args_fingerprint"] = self.args_fingerprint
        a["n_images_expected"] = -1 if self.n_images is None else int(self.n_images)
        a["n_written"] = 0
        a["complete"] = False
        if self.image_root is not None:
            a["image_root"] = self.image_root

        n0 = self.n_images or 0
        D = self.feature_dim
        images = f.create_group("images")
        common = dict(dtype=np.float16, compression=self.compression, track_times=False)
        if self.layout == "files":
            images.create_dataset("files", shape=(n0,), maxshape=(None,), chunks=(4096,), dtype=_STR,
                                  track_times=False)
        elif self.layout == "fixed":
            R = int(self.regions_per_image)
            images.create_dataset("features", shape=(n0, R, D), maxshape=(None, R, D), chunks=(1, R, D), **common)
            if self.with_boxes:
                images.create_dataset(
                    "boxes", shape=(n0, R, 4), maxshape=(None, R, 4), chunks=(256, R, 4), dtype=np.float32,
                    track_times=False,
                )
        else:
            images.create_dataset(
                "features", shape=(0, D), maxshape=(None, D), chunks=(self.chunk_rows, D), **common
            )
            offsets = images.create_dataset(
                "offsets", shape=(n0 + 1,), maxshape=(None,), chunks=(4096,), dtype=np.int64, track_times=False
            )
            offsets[0] = 0
            if self.with_boxes:
                images.create_dataset(
                    "boxes", shape=(0, 4), maxshape=(None, 4), chunks=(4096, 4), dtype=np.float32,
                    track_times=False,
                )
        id_dtype = np.int64 if self.id_kind == "int" else _STR
        images.create_dataset("ids", shape=(n0,), maxshape=(None,), chunks=(4096,), dtype=id_dtype, track_times=False)
        if self.with_sizes:
            images.create_dataset(
                "sizes", shape=(n0, 2), maxshape=(None, 2), chunks=(4096, 2), dtype=np.int32, track_times=False
            )
        f.create_group("captions")
        f.create_group("splits")
        self.n_written = 0
        self._rows = 0
        f.flush()
        return f

    def _reopen_partial(self) -> h5py.File:
        try:
            f = h5py.File(self.partial, "r+")
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
            }
            n_written = int(a["n_written"])
            feats = f["images/files" if self.layout == "files" else "images/features"]
        except (OSError, KeyError) as exc:
            # A kill during a write can leave the HDF5 metadata unreadable; nothing in it can be trusted.
            try:
                f.close()  # type: ignore[possibly-undefined]
            except Exception:  # noqa: BLE001
                pass
            import warnings

            warnings.warn(f"{self.partial} could not be resumed ({exc}); starting over", stacklevel=3)
            return self._create()
        wanted = {
            "schema_version": SCHEMA_VERSION,
            "feature_kind": self.feature_kind,
            "source": self.source,
            "feature_dim": self.feature_dim,
            "layout": self.layout,
            "regions_per_image": self.regions_per_image,
            "args_fingerprint": self.args_fingerprint,
            "n_images": -1 if self.n_images is None else int(self.n_images),
        }
        differ = [k for k in wanted if stored[k] != wanted[k]]
        if differ:
            f.close()
            details = ", ".join(f"{k}: {stored[k]!r} there, {wanted[k]!r} now" for k in differ)
            raise MaxMatchError(
                f"{self.partial} was started with different arguments ({details}).",
                hint=f"re-run with the original arguments to resume, or delete {self.partial} to start over",
            )
        self.n_written = n_written
        # Drop whatever was written after the last flush: it may be incomplete.
        if self.layout == "flat":
            self._rows = int(f["images/offsets"][n_written])
            feats.resize(self._rows, axis=0)
            if "boxes" in f["images"]:
                f["images/boxes"].resize(self._rows, axis=0)
        else:
            self._rows = n_written * int(self.regions_per_image)
        if self.n_images is None:
            self._resize_images(f, n_written)
        self.resumed = True
        return f

    def _resize_images(self, f: h5py.File, n: int) -> None:
        """Grow or truncate every per-image dataset to ``n`` images."""
        images = f["images"]
        for name in ("ids", "sizes", "files"):
            if name in images:
                images[name].resize(n, axis=0)
        if self.layout == "fixed":
            images["features"].resize(n, axis=0)
            if "boxes" in images:
                images["boxes"].resize(n, axis=0)
        elif self.layout == "flat":
            images["offsets"].resize(n + 1, axis=0)

    # -- writing -------------------------------------------------------------------------------------------

    def write_images(
        self,
        features: np.ndarray | Sequence[np.ndarray],
        *,
        ids: Sequence[int] | Sequence[str] | np.ndarray | None = None,
        boxes: np.ndarray | Sequence[np.ndarray] | None = None,
        sizes: np.ndarray | Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append a batch of images.

        Args:
            features: fixed layout: ``(B, R, D)`` array (or a list of ``(R, D)``); flat layout: a list of
                ``(R_i, D)`` arrays. Any float dtype; stored as float16.
            ids: ``B`` image ids (default: the running image index).
            boxes: like ``features`` with 4 columns (required if ``with_boxes``).
            sizes: ``(B, 2)`` width, height (required if ``with_sizes``).
        """
        if self.layout == "files":
            raise ValueError("an image-file store holds no features: use write_files()")
        f = self._file
        fixed = self.layout == "fixed"
        if isinstance(features, np.ndarray) and features.ndim == 3:
            items: list[np.ndarray] = list(features)
        else:
            items = [np.asarray(x) for x in features]
        B = len(items)
        if B == 0:
            return
        start = self.n_written
        for k, x in enumerate(items):
            if x.ndim != 2 or x.shape[1] != self.feature_dim or (fixed and x.shape[0] != self.regions_per_image):
                want = f"({self.regions_per_image}, {self.feature_dim})" if fixed else f"(R, {self.feature_dim})"
                raise MaxMatchError(
                    f"image {start + k} has features of shape {x.shape}; {self.path.name} stores {want}.",
                    hint="all images of one feature file must have the same feature size",
                )
        if ids is None:
            ids_arr: Any = np.arange(start, start + B, dtype=np.int64)
        else:
            ids_arr = list(ids) if self.id_kind == "str" else np.asarray(ids, dtype=np.int64)
            if len(ids_arr) != B:
                raise ValueError(f"{len(ids_arr)} ids for {B} images")
            if self.id_kind == "str":
                ids_arr = np.array([str(x) for x in ids_arr], dtype=object)
        if self.with_boxes and boxes is None:
            raise ValueError("this store keeps boxes: pass boxes=")
        if self.with_sizes and sizes is None:
            raise ValueError("this store keeps image sizes: pass sizes=")

        if fixed:
            block = _to_float16(features if isinstance(features, np.ndarray) and features.ndim == 3 else np.stack(items))
        else:
            block = _to_float16(np.concatenate(items) if items else np.zeros((0, self.feature_dim)))
        if block is None:
            bad = next(k for k, x in enumerate(items) if _to_float16(x) is None)
            raise MaxMatchError(
                f"image {start + bad} (id {ids_arr[bad]}) has non-finite features or values beyond the float16 "
                "range.",
                hint="check the source features (NaN/inf or |x| > 65504)",
            )
        end = start + B
        try:
            images = f["images"]
            self._ensure_capacity(end)
            if fixed:
                images["features"][start:end] = block
                if self.with_boxes:
                    images["boxes"][start:end] = np.stack([np.asarray(b, dtype=np.float32) for b in boxes])
            else:
                counts = np.array([len(x) for x in items], dtype=np.int64)
                rows_end = self._rows + int(counts.sum())
                feats = images["features"]
                feats.resize(rows_end, axis=0)
                if rows_end > self._rows:
                    feats[self._rows : rows_end] = block
                if self.with_boxes:
                    bx = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
                    if [len(b) for b in bx] != counts.tolist():
                        raise ValueError("boxes must have one row per region")
                    images["boxes"].resize(rows_end, axis=0)
                    images["boxes"][self._rows : rows_end] = np.concatenate(bx)
                images["offsets"][start + 1 : end + 1] = self._rows + np.cumsum(counts)
                self._rows = rows_end
            images["ids"][start:end] = ids_arr
            if self.with_sizes:
                images["sizes"][start:end] = np.asarray(sizes, dtype=np.int32).reshape(B, 2)
        except OSError as exc:
            raise self._write_error(exc) from None
        if self.layout == "fixed":
            self._rows = end * int(self.regions_per_image)
        self.n_written = end
        self._since_flush += B
        if self._since_flush >= self.flush_every:
            self.flush()

    def write_image(self, features: np.ndarray, *, id: int | str | None = None, boxes: np.ndarray | None = None,
                    size: Sequence[int] | None = None) -> None:
        """Append one image (see :meth:`write_images`)."""
        self.write_images(
            [features],
            ids=None if id is None else [id],
            boxes=None if boxes is None else [boxes],
            sizes=None if size is None else [size],
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
        if self.layout != "files":
            raise ValueError("write_files() is for image-file stores (feature_kind='pixels')")
        B = len(files)
        if len(ids) != B or (sizes is not None and len(sizes) != B):
            raise ValueError("files, ids and sizes must have the same length")
        if self.with_sizes and sizes is None:
            raise ValueError("this store keeps image sizes: pass sizes=")
        if B == 0:
            return
        start, end = self.n_written, self.n_written + B
        images = self._file["images"]
        try:
            self._ensure_capacity(end)
            images["files"][start:end] = np.array([str(x) for x in files], dtype=object)
            if self.id_kind == "str":
                images["ids"][start:end] = np.array([str(x) for x in ids], dtype=object)
            else:
                images["ids"][start:end] = np.asarray(ids, dtype=np.int64)
            if self.with_sizes:
                images["sizes"][start:end] = np.asarray(sizes, dtype=np.int32).reshape(B, 2)
        except OSError as exc:
            raise self._write_error(exc) from None
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
        self._resize_images(self._file, n)

    def _write_error(self, exc: OSError) -> MaxMatchError:
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc)
        if full:
            return MaxMatchError(
                f"the disk is full while writing {self.partial}.",
                hint="free some space and re-run the same command: it resumes from the last flushed image",
            )
        return MaxMatchError(
            f"writing {self.partial} failed: {exc}.",
            hint="check the disk, then re-run the same command to resume",
        )

    def flush(self) -> None:
        """Flush data to disk and record ``n_written`` (the point a resumed run continues from)."""
        try:
            self._file.flush()  # data first, then the count that vouches for it
            self._file.attrs["n_written"] = self.n_written
            self._file.flush()
        except OSError as exc:
            raise self._write_error(exc) from None
        self._since_flush = 0

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
        image_index = np.asarray(image_index, dtype=np.int64)
        if len(texts) != len(image_index) or (ids is not None and len(ids) != len(texts)):
            raise ValueError("texts, image_index and ids must have the same length")
        if len(image_index) and image_index.min() < 0:
            raise ValueError("negative caption image index")
        g = self._file["captions"]
        for name in ("text", "image", "ids"):
            if name in g:
                del g[name]
        g.create_dataset("text", data=np.array(list(texts), dtype=object), dtype=_STR, track_times=False)
        g.create_dataset("image", data=image_index, track_times=False)
        if ids is not None:
            g.create_dataset("ids", data=np.asarray(ids, dtype=np.int64), track_times=False)

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
        if not name or "/" in name:
            raise ValueError(f"invalid split name {name!r}")
        images = np.asarray(image_indices, dtype=np.int64)
        g = self._file["captions"]
        if "image" not in g:
            raise ValueError("call set_captions() before add_split()")
        owners = g["image"][:]
        if caption_indices is None:
            order = np.argsort(owners, kind="stable")
            sorted_owners = owners[order]
            lo = np.searchsorted(sorted_owners, images, side="left")
            hi = np.searchsorted(sorted_owners, images, side="right")
            captions = (
                np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(images) else np.zeros(0, np.int64)
            )
        else:
            captions = np.asarray(caption_indices, dtype=np.int64)
        # Check the grouping: owners of the captions must run through the split's images in order.
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
        cpi = int(per_image[0]) if len(per_image) and np.all(per_image == per_image[0]) else 0
        splits = self._file["splits"]
        if name in splits:
            del splits[name]
        s = splits.create_group(name)
        s.create_dataset("images", data=images, track_times=False)
        s.create_dataset("captions", data=captions, track_times=False)
        s.attrs["captions_per_image"] = cpi

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
        """Check, mark complete, close, sync and rename to the final path. Returns the final path."""
        f = self._file
        if self.n_images is not None and self.n_written != self.n_images:
            raise MaxMatchError(
                f"{self.partial}: {self.n_written} images written, {self.n_images} expected.",
                hint="the importer stopped early; re-run the same command to resume",
            )
        self._resize_images(f, self.n_written)
        g = f["captions"]
        if "text" not in g:
            self.set_captions([], [])
        owners = g["image"][:]
        if len(owners) and owners.max() >= self.n_written:
            raise MaxMatchError(
                f"{self.partial}: a caption belongs to image {int(owners.max())}, but only {self.n_written} "
                "images were written.",
                hint="the captions and the images do not line up; check the caption file",
            )
        for name, s in f["splits"].items():
            imgs = s["images"][:]
            if len(imgs) and imgs.max() >= self.n_written:
                raise MaxMatchError(
                    f"{self.partial}: split {name!r} refers to image {int(imgs.max())}, beyond the "
                    f"{self.n_written} written.",
                    hint="the split list and the images do not line up",
                )
        self.flush()
        f.attrs["complete"] = True
        try:
            f.flush()
            f.close()
            fd = os.open(self.partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            publish(self.partial, self.path)
        except OSError as exc:
            raise self._write_error(exc) from None
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Flush what is written and close, keeping ``.partial`` for a resume."""
        if self._finished or not self._file.id.valid:
            return
        try:
            self.flush()
        except MaxMatchError:
            pass
        self._file.close()

    def discard(self) -> None:
        """Close and delete the ``.partial`` file."""
        if self._file.id.valid:
            self._file.close()
        if self.partial.exists():
            self.partial.unlink()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if not self._finished:
                try:
                    self.finish()
                except BaseException:
                    self.abort()
                    raise
        else:
            self.abort()
