"""Reading a feature store: :func:`open_store` validates the file, :class:`FeatureStore` serves its contents.

The returned :class:`FeatureStore` opens its HDF5 handle lazily in each process, so it can be handed to
DataLoader workers (it pickles without the handle and reopens on first access after fork or spawn).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.features.store.describe import summarize
from maxmatch_cli.features.store.fingerprint import content_fingerprint
from maxmatch_cli.features.store.float16 import to_float32
from maxmatch_cli.features.store.schema import (
    PIXELS,
    check_features,
    check_store_path,
    hdf5_open_error,
    inconsistent,
    read_header,
)
from maxmatch_cli.fileio import escapes_folder


def utf8_strings(dataset: h5py.Dataset, path: Path, n: int | None = None) -> list[str]:
    """The first ``n`` (default: all) strings of a string dataset, decoded as UTF-8.

    Raises:
        MaxMatchError: an entry is not UTF-8 (named with its dataset and position).
    """
    raw = dataset[:n] if n is not None else dataset[:]
    out = []
    for k, value in enumerate(raw):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MaxMatchError(
                    f"{path}: {dataset.name.lstrip('/')}[{k}] is not UTF-8 text ({exc.reason} at byte {exc.start}: "
                    f"{value[max(exc.start - 10, 0): exc.start + 10]!r}).",
                    hint="strings in a feature file are UTF-8: re-create it with maxmatch extract-features from "
                         "UTF-8 captions") from None
        out.append(str(value))
    return out


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


class FeatureStore:
    """Read access to a schema-v1 feature store; see :mod:`maxmatch_cli.features.store.schema` for the layout.

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
        check_store_path(self.path, allow_incomplete)
        f = self._h5()
        try:
            self._load_metadata(f)
            if not allow_incomplete:  # ``features info`` still describes such a file
                self._refuse_empty_images()
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

    def _h5(self) -> h5py.File:
        """The HDF5 handle of this process, opened on first use (and again after a fork or unpickling)."""
        if self._file is None or self._pid != os.getpid():
            try:
                # A small chunk cache: items are read once per epoch, caching them only costs memory per worker.
                self._file = h5py.File(self.path, "r", rdcc_nbytes=1 << 20)
            except OSError as exc:
                raise hdf5_open_error(self.path, exc) from None
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
        header = read_header(f, self.path, self.allow_incomplete)
        self.schema_version = header.schema_version
        self.complete = header.complete
        self.n_written = header.n_written
        self.feature_kind = header.feature_kind
        self.source = header.source
        self.feature_dim = header.feature_dim
        self.layout = header.layout
        self.created_with = header.created_with
        self.args_fingerprint = header.args_fingerprint
        self.metadata: dict[str, Any] = header.metadata
        self.image_files: np.ndarray | None = None  # paths relative to image_root, where the file records them
        self.image_root: str | None = header.image_root
        if self.feature_kind == PIXELS:
            self.regions_per_image, self._offsets = None, None
            n_alloc = len(f["images/files"])
        else:
            n_alloc, self.regions_per_image, self._offsets = check_features(f["images"], header, self.path)
        self._load_images(f, n_alloc if self.complete else min(self.n_written, n_alloc))
        if not self.complete and "image" not in f["captions"]:  # interrupted before the captions were written
            self.caption_image = np.zeros(0, dtype=np.int64)
            self.n_captions = 0
            self.caption_ids = None
            self._captions_cache = []
            self._splits, self._split_cpi = {}, {}
            return
        self._load_captions(f)
        self._load_splits(f)

    def _load_images(self, f: h5py.File, n: int) -> None:
        """Image ids, sizes and (image-file stores, and features extracted from image files) paths of the first
        ``n`` images."""
        self.n_images = n
        if self.feature_kind == PIXELS or "files" in f["images"] or self.image_root is not None:
            self._load_files(f, n)
        ids = f["images/ids"]
        string_ids = h5py.check_string_dtype(ids.dtype)
        self.image_ids = np.asarray(utf8_strings(ids, self.path, n), dtype=object) if string_ids else ids[:n].copy()
        if self.complete and len(ids) != n:
            raise inconsistent(self.path, f"images/ids has {len(ids)} entries for {n} images")
        self.has_boxes = "boxes" in f["images"]
        self.image_sizes = f["images/sizes"][:n] if "sizes" in f["images"] else None

    def _load_files(self, f: h5py.File, n: int) -> None:
        """``images/files`` and ``image_root``: both or neither (see the schema); no path may leave the folder."""
        if "files" not in f["images"] or self.image_root is None:
            has = "image_root but no images/files" if self.image_root is not None else "images/files but no image_root"
            raise inconsistent(self.path, f"it has {has} (the two come together)")
        files = f["images/files"]
        if self.complete and len(files) != n:
            raise inconsistent(self.path, f"images/files has {len(files)} entries for {n} images")
        self.image_files = np.asarray(utf8_strings(files, self.path, n), dtype=object)
        outside = [name for name in self.image_files if escapes_folder(name)]
        if outside:
            remake = ("re-index the images with maxmatch extract-features images DIR --kind pixels"
                      if self.feature_kind == PIXELS
                      else f"re-extract the features with maxmatch extract-features images DIR --kind "
                           f"{self.feature_kind}")
            raise MaxMatchError(
                f"{self.path} names {len(outside)} image file(s) outside its image folder (an absolute path or "
                f"a '..' part): {first_few([repr(name) for name in outside])}.",
                hint=f"a feature file lists image paths relative to its image_root; {remake}")

    def _load_captions(self, f: h5py.File) -> None:
        self.caption_image = np.asarray(f["captions/image"][:], dtype=np.int64)
        self.n_captions = len(self.caption_image)
        if len(f["captions/text"]) != self.n_captions:
            raise inconsistent(
                self.path, f"captions/text has {len(f['captions/text'])} entries, captions/image {self.n_captions}"
            )
        n = self.n_images
        if self.n_captions and (self.caption_image.min() < 0 or self.caption_image.max() >= max(n, 1)):
            if self.complete:
                raise inconsistent(self.path, "captions/image points outside the image range")
        self.caption_ids = f["captions/ids"][:] if "ids" in f["captions"] else None

    def _load_splits(self, f: h5py.File) -> None:
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._split_cpi: dict[str, int] = {}
        for name, group in (f["splits"].items() if "splits" in f else []):
            images = np.asarray(group["images"][:], dtype=np.int64)
            captions = np.asarray(group["captions"][:], dtype=np.int64)
            if self.complete and (
                (len(images) and (images.min() < 0 or images.max() >= self.n_images))
                or (len(captions) and (captions.min() < 0 or captions.max() >= self.n_captions))
            ):
                raise inconsistent(self.path, f"split '{name}' holds indices outside the stored images or captions")
            self._splits[name] = (images, captions)
            self._split_cpi[name] = int(group.attrs.get("captions_per_image", 0))

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
        if self.feature_kind == PIXELS:
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
            self._captions_cache = utf8_strings(self._h5()["captions/text"], self.path)
        if indices is None:
            return list(self._captions_cache)
        cache = self._captions_cache
        return [cache[int(i)] for i in np.asarray(indices, dtype=np.int64).reshape(-1)]

    # -- features ------------------------------------------------------------------------------------------

    def _refuse_empty_images(self) -> None:
        """Refuse a store with an image of no regions: its set embedding would be made of nothing (NaN or zeros).

        Raises:
            MaxMatchError: naming the file and the first few such images by id.
        """
        if self.feature_kind == PIXELS or not self.n_images:
            return
        if self._offsets is None and self.regions_per_image == 0:
            raise MaxMatchError(
                f"{self.path} stores 0 regions per image (images/features has shape "
                f"{tuple(self._h5()['images/features'].shape)}); every image needs at least one region.",
                hint="re-create the feature file with maxmatch extract-features")
        empty = np.flatnonzero(self.region_counts == 0)
        if len(empty):
            raise MaxMatchError(
                f"{self.path}: {len(empty)} of {self.n_images} images have no regions (ids "
                f"{first_few([str(self.image_ids[i]) for i in empty], 5)}); every image needs at least one.",
                hint="re-extract those images (e.g. keep at least one detector box per image) or leave them out of "
                     "the feature file")

    @property
    def region_counts(self) -> np.ndarray:
        """(N,) int64: number of regions (or grid cells) of each image (0 in an image-file store)."""
        if self.feature_kind == PIXELS:
            return np.zeros(self.n_images, dtype=np.int64)
        if self._offsets is None:
            return np.full(self.n_images, self.regions_per_image, dtype=np.int64)
        return np.diff(self._offsets)

    @property
    def max_regions(self) -> int:
        """The largest number of regions of any image (R for the fixed layout; 0 in an image-file store)."""
        if self.feature_kind == PIXELS:
            return 0
        if self._offsets is None:
            return int(self.regions_per_image)
        return int(self.region_counts.max(initial=0))

    def n_regions(self, i: int) -> int:
        """Number of regions of image ``i``."""
        self._check_index(i)
        if self.feature_kind == PIXELS:
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
        if self.feature_kind == PIXELS:
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
            return to_float32(half)
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
        """The file of image ``i``: ``root`` (default: ``image_root``) / its relative path.

        For image-file stores and for features extracted from image files (``image_files`` is not ``None``).

        Raises:
            ValueError: the store does not record image files (synthetic, precomputed, BUTD TSV, or older).
        """
        self._check_index(i)
        if self.image_files is None:
            raise ValueError(f"{self.path} does not record image files (its images are known by id only)")
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
        """A cheap, stable identity of the contents (see :func:`~.fingerprint.content_fingerprint`), cached."""
        if self._fingerprint is None:
            self._fingerprint = content_fingerprint(self)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """A summary for ``maxmatch features info``: schema, source, sizes, splits, feature shape, disk size."""
        return summarize(self)
