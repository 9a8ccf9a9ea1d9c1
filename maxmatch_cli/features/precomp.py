"""Import SCAN / VSE-infinity "precomp" folders into a feature store.

A precomp folder holds, per split, ``{split}_ims.npy`` (float32 (N, 36, 2048) BUTD region features),
``{split}_caps.txt`` (one caption a line, 5 per image, in image order) and, for COCO, ``{split}_ids.txt`` (COCO
image ids). COCO has train / dev / test / testall (testall = the 5K test), Flickr30K train / dev / test.

Quirks handled here:

* Some arrays repeat every image five times, once per caption (Flickr30K dev has 5,070 rows for 5,070
  captions). When there are as many rows as captions, every fifth row is taken, after checking that the rows of
  a group really are identical.
* Ids files come with one line per image, per row or per caption; they are reduced to one id per image and must
  agree within a group.
* The same COCO image appearing in two splits (e.g. a 1K ``test`` inside the 5K ``testall``) is stored once;
  each split keeps its own captions.

COCO train is 33 GB, so arrays are never loaded whole: rows are read with positioned reads straight from the
file into a small buffer (a batch of images at a time). Unlike a memory map, this keeps the resident memory of
the import bounded by the batch size however large the array is, and it lets a truncated file be reported
before anything is written. The import is resumable (``StoreWriter`` with an arguments fingerprint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, store_state

DATASET_SPLITS = {"coco": ("train", "dev", "test", "testall"), "f30k": ("train", "dev", "test")}


class NpyRows:
    """Row access to a 3-D ``.npy`` file by positioned reads (no memory map, no full load).

    Args:
        path: a ``.npy`` file holding a C-ordered array of shape (rows, R, D).

    Raises:
        MaxMatchError: not a .npy file, not 3-D, Fortran order, an unsupported dtype, or shorter than its
            header says (truncated).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                self.offset = f.tell()
        except FileNotFoundError:
            raise MaxMatchError(f"{self.path} does not exist.", hint="check the precomp folder") from None
        except (ValueError, OSError) as exc:
            raise MaxMatchError(
                f"{self.path} is not a readable .npy array ({exc}).",
                hint="re-download or re-create the file (numpy.save of a (N, 36, 2048) float32 array)",
            ) from None
        if len(shape) != 3 or fortran or dtype.kind != "f":
            raise MaxMatchError(
                f"{self.path} holds a {'Fortran-ordered ' if fortran else ''}{dtype} array of shape {shape}; "
                "expected C-ordered float (N, regions, dim), e.g. (N, 36, 2048).",
                hint="precomp features are saved with numpy.save(path, features.astype('float32'))",
            )
        self.shape: tuple[int, int, int] = tuple(int(x) for x in shape)  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        actual = self.path.stat().st_size
        if actual < expected:
            raise MaxMatchError(
                f"{self.path} is truncated: its header announces {self.shape[0]} rows of {self.shape[1:]} "
                f"({expected:,} bytes) but the file has {actual:,} bytes (about "
                f"{max(0, actual - self.offset) // max(self.row_bytes, 1):,} complete rows).",
                hint="the download or copy was interrupted; fetch the file again",
            )

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """Rows (any order) as a ``(len(rows), R, D)`` array of the file's dtype; contiguous runs are one read."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        view = out.reshape(len(rows), -1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            k = 0
            while k < len(rows):
                run = 1
                while k + run < len(rows) and rows[k + run] == rows[k] + run:
                    run += 1
                nbytes = run * self.row_bytes
                got = os.preadv(fd, [memoryview(view[k : k + run]).cast("B")], self.offset + int(rows[k]) * self.row_bytes)
                if got != nbytes:
                    raise MaxMatchError(f"{self.path}: short read at row {rows[k]} (file changed while reading?).")
                k += run
        finally:
            os.close(fd)
        return out


@dataclass
class _Split:
    name: str
    features: NpyRows
    captions: list[str]
    image_rows: np.ndarray  # row of each image in the .npy
    image_ids: list[Any] | None
    per_image: int


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as exc:
        raise MaxMatchError(f"{path} is not UTF-8 text ({exc}).", hint="re-save the captions as UTF-8") from None
    while lines and not lines[-1].strip():  # a trailing empty line is not a caption
        lines.pop()
    return lines


def _load_split(folder: Path, name: str, captions_per_image: int) -> _Split:
    ims_path, caps_path, ids_path = (folder / f"{name}_{kind}" for kind in ("ims.npy", "caps.txt", "ids.txt"))
    if not caps_path.exists():
        raise MaxMatchError(f"{caps_path} is missing (split '{name}' has {ims_path.name} but no captions).",
                            hint="every split needs {split}_ims.npy and {split}_caps.txt")
    feats = NpyRows(ims_path)
    captions = _read_lines(caps_path)
    rows, per = len(feats), captions_per_image
    if rows * per == len(captions):
        image_rows = np.arange(rows, dtype=np.int64)
    elif rows == len(captions) and rows % per == 0:
        image_rows = np.arange(0, rows, per, dtype=np.int64)
        _check_repeated(feats, image_rows, per)
    else:
        raise MaxMatchError(
            f"{caps_path} has {len(captions)} captions for {rows} image rows in {ims_path.name}: captions must be "
            f"{per} per image ({rows * per} lines), or one per row with each image repeated {per} times.",
            hint="check that the two files belong to the same split and that no line was lost",
        )
    empty = [k for k, c in enumerate(captions) if not c.strip()]
    if empty:
        raise MaxMatchError(f"{caps_path}: line {empty[0] + 1} is empty ({len(empty)} empty captions).",
                            hint="every line must hold one caption")
    ids = _load_ids(ids_path, len(image_rows), rows, per) if ids_path.exists() else None
    return _Split(name, feats, captions, image_rows, ids, per)


def _check_repeated(feats: NpyRows, image_rows: np.ndarray, per: int) -> None:
    """Rows == captions: the rows of each group must repeat one image. Checked on a few groups."""
    sample = np.unique(np.linspace(0, len(image_rows) - 1, num=min(4, len(image_rows))).astype(int))
    for g in sample:
        block = feats.read(np.arange(image_rows[g], image_rows[g] + per))
        if not all(np.array_equal(block[0], block[k]) for k in range(1, per)):
            raise MaxMatchError(
                f"{feats.path} has one row per caption, but rows {image_rows[g]}..{image_rows[g] + per - 1} are not "
                f"copies of one image, so they cannot be the x{per} repetition of SCAN's arrays.",
                hint="the captions file does not match this array (wrong split or different ordering)",
            )


def _load_ids(path: Path, n_images: int, rows: int, per: int) -> list[Any]:
    raw = [line.strip() for line in _read_lines(path)]
    try:
        ids: list[Any] = [int(x) for x in raw]
    except ValueError:
        ids = raw
    if len(ids) == n_images:
        return ids
    if len(ids) == n_images * per:
        groups = [ids[k * per : (k + 1) * per] for k in range(n_images)]
        bad = next((k for k, g in enumerate(groups) if any(x != g[0] for x in g)), None)
        if bad is not None:
            raise MaxMatchError(
                f"{path}: lines {bad * per + 1}-{bad * per + per} should repeat one image id but read {groups[bad]}.",
                hint="the ids do not line up with the captions",
            )
        return [g[0] for g in groups]
    raise MaxMatchError(
        f"{path} has {len(ids)} ids for {n_images} images ({rows} rows in the array).",
        hint=f"expected one id per image ({n_images}) or per caption ({n_images * per})",
    )


def import_precomp(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset: str = "coco",
    splits: list[str] | None = None,
    captions_per_image: int = 5,
    overwrite: bool = False,
    batch_images: int = 64,
    progress: bool = True,
) -> Path:
    """Convert a SCAN / VSE-infinity precomp folder into a feature store.

    Args:
        folder: the precomp folder (e.g. ``data/coco_precomp``).
        out: output ``.h5`` path.
        dataset: ``"coco"`` (splits train/dev/test/testall) or ``"f30k"`` (train/dev/test).
        splits: the splits to import (default: every split of the dataset found in the folder).
        captions_per_image: 5 for both datasets.
        overwrite: replace an existing output file.
        batch_images: images read and written at a time (bounds the memory used).
        progress: show a progress bar.

    Returns:
        The output path. A finished import with the same arguments is not repeated; an interrupted one resumes.
    """
    folder = Path(folder)
    wanted = _wanted_splits(folder, dataset, splits)
    loaded = [_load_split(folder, name, captions_per_image) for name in wanted]
    _check_one_feature_size(loaded)
    files = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for s in loaded
             for p in (s.features.path, folder / f"{s.name}_caps.txt")}
    fp = args_fingerprint(kind="precomp", folder=str(folder.resolve()), dataset=dataset, splits=wanted,
                          captions_per_image=captions_per_image, files=files)
    out = Path(out)
    if not overwrite and store_state(out, fp) == "complete":
        return out
    plan, plan_ids, split_images = _plan_images(loaded)
    id_kind = "str" if any(isinstance(x, str) for x in plan_ids) else "int"
    _, R, D = loaded[0].features.shape
    with StoreWriter(
        out, feature_kind="region", source=f"scan-precomp:{dataset}", feature_dim=D, regions_per_image=R,
        n_images=len(plan), id_kind=id_kind, args_fingerprint=fp, resume=True, overwrite=overwrite,
        metadata={"importer": "precomp", "dataset": dataset, "folder": str(folder.resolve()), "splits": wanted,
                  "duplicated_rows": [s.name for s in loaded if len(s.image_rows) != len(s.features)]},
        flush_every=max(batch_images * 8, 256),
    ) as writer:
        _copy_features(writer, loaded, plan, plan_ids, batch_images, progress)
        _write_captions_and_splits(writer, loaded, split_images)
    return out


def _wanted_splits(folder: Path, dataset: str, splits: list[str] | None) -> list[str]:
    """The splits to import: those asked for, else every split of ``dataset`` whose array is in ``folder``."""
    if dataset not in DATASET_SPLITS:
        raise MaxMatchError(f"unknown dataset '{dataset}'.", hint=f"use one of: {', '.join(DATASET_SPLITS)}")
    if not folder.is_dir():
        raise MaxMatchError(f"precomp folder {folder} does not exist or is not a folder.",
                            hint="pass the folder holding {split}_ims.npy and {split}_caps.txt")
    wanted = list(splits) if splits else [s for s in DATASET_SPLITS[dataset] if (folder / f"{s}_ims.npy").exists()]
    if not wanted:
        raise MaxMatchError(
            f"{folder} holds no precomp split: none of "
            f"{', '.join(f'{s}_ims.npy' for s in DATASET_SPLITS[dataset])} exists.",
            hint="pass the folder that holds the .npy files (e.g. data/coco_precomp)",
        )
    return wanted


def _check_one_feature_size(loaded: list[_Split]) -> None:
    """All splits must share one (regions, dim) row shape."""
    first = loaded[0].features
    for s in loaded[1:]:
        if s.features.shape[1:] != first.shape[1:]:
            raise MaxMatchError(
                f"{s.features.path} has rows of shape {s.features.shape[1:]}, but {first.path.name} has "
                f"{first.shape[1:]}: all splits must share one feature size.",
                hint="mixing features from different extractors in one cache is not supported",
            )


def _plan_images(loaded: list[_Split]) -> tuple[list[tuple[int, int]], list[Any], list[np.ndarray]]:
    """The images to store: unique images in order of first appearance (an id seen in an earlier split is stored
    once).

    Returns:
        ``plan`` (split position, row in that split's .npy) per stored image, their ids (the position when a split
        has no ids file), and per split the stored index of each of its images.
    """
    plan: list[tuple[int, int]] = []
    plan_ids: list[Any] = []
    index_of_id: dict[Any, int] = {}
    split_images: list[np.ndarray] = []
    use_ids = all(s.image_ids is not None for s in loaded)
    for k, s in enumerate(loaded):
        indices = np.empty(len(s.image_rows), dtype=np.int64)
        for j, row in enumerate(s.image_rows):
            key = s.image_ids[j] if use_ids else None  # type: ignore[index]
            if key is not None and key in index_of_id:
                indices[j] = index_of_id[key]
                continue
            indices[j] = len(plan)
            if key is not None:
                index_of_id[key] = len(plan)
            plan.append((k, int(row)))
            plan_ids.append(key if use_ids else len(plan) - 1)
        split_images.append(indices)
    return plan, plan_ids, split_images


def _write_captions_and_splits(writer: StoreWriter, loaded: list[_Split], split_images: list[np.ndarray]) -> None:
    """Every split's captions, in split order, owned by the stored images; each split with its own captions."""
    texts: list[str] = []
    owners: list[np.ndarray] = []
    split_captions: list[np.ndarray] = []
    for s, images in zip(loaded, split_images):
        split_captions.append(np.arange(len(texts), len(texts) + len(s.captions), dtype=np.int64))
        texts.extend(s.captions)
        owners.append(np.repeat(images, s.per_image))
    writer.set_captions(texts, np.concatenate(owners))
    for s, images, caps in zip(loaded, split_images, split_captions):
        writer.add_split(s.name, images, caps)


def _copy_features(writer: StoreWriter, loaded: list[_Split], plan: list[tuple[int, int]], plan_ids: list[Any],
                   batch_images: int, progress: bool) -> None:
    from maxmatch_cli.progress import make_progress

    start = writer.n_written
    with make_progress(transient=True) as bar:
        task = bar.add_task("precomp import", total=len(plan), completed=start, unit="images",
                            status="resumed" if start else "", visible=progress)
        lo = start
        while lo < len(plan):
            # A batch never mixes splits, so each batch is one read pattern on one file.
            k = plan[lo][0]
            hi = lo
            while hi < len(plan) and hi - lo < batch_images and plan[hi][0] == k:
                hi += 1
            rows = [row for _, row in plan[lo:hi]]
            writer.write_images(loaded[k].features.read(rows), ids=plan_ids[lo:hi])
            bar.update(task, completed=hi, status=loaded[k].name)
            lo = hi
