"""Room on the disk for a store being written: how much its writes take, and what to keep free.

HDF5 must never meet a full disk: a write it cannot finish leaves the file inconsistent (and h5py may crash on
closing it). So :class:`~maxmatch_cli.features.store.writer.StoreWriter` stops while there is still room to flush
and close cleanly, and the same command resumes from the last flush once there is space. These are the sums it
checks against the free space, and the messages it gives.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.partial import StoreSpec
from maxmatch_cli.fileio import DiskFullError


def per_image_extra(spec: StoreSpec) -> int:
    """Bytes per image besides features and boxes: the id, the size, the offset."""
    return (8 if spec.id_kind == "int" else 16) + 8 * spec.with_sizes + 8 * (spec.layout == "flat")


def rest_bytes(spec: StoreSpec, n_written: int) -> int | None:
    """About the bytes the images still to write take (fixed layout, known count, uncompressed; else None)."""
    if spec.layout != "fixed" or spec.n_images is None or spec.compression is not None:
        return None
    R = int(spec.regions_per_image)
    per_image = R * spec.feature_dim * 2 + 16 * R * spec.with_boxes + per_image_extra(spec)
    return max(0, spec.n_images - n_written) * per_image


def headroom(f: h5py.File) -> int:
    """Room kept free for a flush and the close: HDF5's metadata, and one whole chunk of each dataset (a chunk is
    allocated whole on its first write)."""
    chunks = 0
    for ds in f["images"].values():
        if ds.chunks:
            chunks += int(np.prod(ds.chunks)) * max(ds.dtype.itemsize, 16 if ds.dtype.kind == "O" else 0)
    return 64 * 1024 + chunks


def room_hint(resume: bool, n_written: int, partial: Path) -> str:
    """What to do about a full disk; a resumable run is told where it will continue."""
    again = "free some space (or choose an --out on a larger disk), then run the same command again"
    if resume and n_written:
        return f"{again}: it resumes after the {n_written:,} images in {partial.name}"
    return again


def files_bytes(files: Sequence[str] | None) -> int:
    """About the bytes the relative paths of a feature batch take (0 without paths)."""
    return sum(len(str(x).encode()) + 16 for x in files) if files is not None else 0


def write_failure(exc: BaseException, path: Path, partial: Path, rest: int | None, disk_full: bool) -> MaxMatchError:
    """The error for a write into ``partial`` that failed with ``exc``; ``disk_full``: HDF5 met a full disk."""
    if disk_full:
        return DiskFullError(path, rest, hint=(
            f"the disk filled up while HDF5 was writing {partial.name}, so it cannot be resumed and is "
            f"removed; free some space, then run the same command again"))
    return MaxMatchError(
        f"writing {partial} failed: {exc}.",
        hint="check the disk, then re-run the same command to resume",
    )


def close_quietly(f: h5py.File) -> None:
    """Close a file whose writes failed: HDF5 retries them and reports each failure again, saying nothing new."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda *_: None  # h5py reports failures in its objects' destructors there
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the write failure was reported already
        pass
    finally:
        sys.unraisablehook = hook
