"""Image-file stores: index a folder of images for end-to-end CNN training (``--kind pixels``).

The store keeps captions, splits, image ids and sizes like every other store, but instead of features it
lists each image's path relative to the folder (``images/files``), with the folder as the ``image_root``
attribute (see :mod:`maxmatch_cli.features.store`). Training with ``model.image_encoder = "cnn"`` decodes the
files on the fly (:mod:`maxmatch_cli.data.images`), so the CNN can be fine-tuned with augmentation.

Indexing reads only each file's header (format and size, through PIL), a few milliseconds per image at most,
in a small thread pool because the time is spent waiting for the disk. A missing or unreadable file stops with
its path (the first few are listed), unless ``skip_unreadable`` leaves such images, and their captions, out and
lists them in the metadata (``skipped_images``, ``skipped_files``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.features.captions_file import load_entries
from maxmatch_cli.features.karpathy import KarpathyImage, captions_and_splits
from maxmatch_cli.features.store import PIXELS, StoreWriter, args_fingerprint, store_state

SOURCE = "image-folder"


def _relative_path(root: Path, im: KarpathyImage) -> str:
    """``filepath/filename`` when that exists under ``root``, else the bare file name (flat folders)."""
    return im.relpath if (root / im.relpath).exists() else Path(im.relpath).name


def _probe(path: Path) -> tuple[int, int] | str:
    """(width, height) from the file's header, or the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def index_images(
    images_dir: str | os.PathLike,
    captions: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    captions_per_image: int = 5,
    split: str | None = None,
    skip_unreadable: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    threads: int = 8,
) -> Path:
    """Write an image-file store (``feature_kind="pixels"``) for the images of a Karpathy json.

    Args:
        images_dir: image root; an entry is found at ``images_dir/filepath/filename`` or ``images_dir/filename``.
        captions: Karpathy split json (captions and splits), a plain captions file (txt/csv/json list), or
            ``None`` for a gallery of every image under ``images_dir``
            (see :mod:`maxmatch_cli.features.captions_file`).
        out: output ``.h5`` path.
        captions_per_image: captions kept per image (Karpathy json).
        split: the one split of a plain captions file (default ``train``) or a gallery (default ``gallery``).
        skip_unreadable: leave out images whose file is missing or not an image instead of stopping.
        overwrite: replace an existing output.
        progress: show a progress bar.
        threads: header reads in flight.

    Returns:
        The output path (already complete when an identical earlier run finished: nothing is redone).

    Raises:
        MaxMatchError: a missing folder, a bad caption file, or unreadable images (without ``skip_unreadable``).
    """
    from maxmatch_cli.progress import make_progress

    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise MaxMatchError(f"image folder {images_dir} does not exist.",
                            hint="pass an existing folder: maxmatch extract-features images DIR ...")
    root = images_dir.resolve()
    loaded = load_entries(images_dir, captions, captions_per_image=captions_per_image, split=split,
                          skip_missing=skip_unreadable)
    entries = loaded.images
    source_id = str(Path(captions).resolve()) if captions is not None else "gallery"
    extra = {} if loaded.format == "karpathy" else {"split": loaded.metadata["split"]}
    fp = args_fingerprint(kind=PIXELS, images=str(root), captions=source_id, n=len(entries),
                          captions_per_image=captions_per_image, skip_unreadable=skip_unreadable, **extra)
    if not overwrite and store_state(out, fp) == "complete":
        return out

    relpaths = [_relative_path(root, im) for im in entries]
    probes: list[tuple[int, int] | str] = []
    with make_progress(transient=True) as bar, ThreadPoolExecutor(max(1, threads)) as pool:
        task = bar.add_task("indexing images", total=len(entries), unit="images", status="", visible=progress)
        for result in pool.map(_probe, (root / rel for rel in relpaths), chunksize=64):
            probes.append(result)
            bar.advance(task)
    bad = [k for k, p in enumerate(probes) if isinstance(p, str)]
    if bad and not skip_unreadable:
        listed = first_few([f"{root / relpaths[k]} ({probes[k]})" for k in bad])
        raise MaxMatchError(f"{len(bad)} of {len(entries)} images cannot be read: {listed}.",
                            hint="check --images (files are looked up at DIR/filepath/filename or DIR/filename), "
                                 "or pass --skip-unreadable to leave such images out")
    keep = [k for k, p in enumerate(probes) if not isinstance(p, str)]
    with StoreWriter(
        out, feature_kind=PIXELS, source=SOURCE, feature_dim=3, image_root=root, n_images=len(keep),
        id_kind="int" if all(isinstance(e.key, int) for e in entries) else "str", with_sizes=True,
        args_fingerprint=fp, overwrite=overwrite, flush_every=1 << 16,
        metadata={"captions": str(captions), "captions_per_image": captions_per_image, **loaded.metadata,
                  "skipped_images": [str(entries[k].key) for k in bad],
                  "skipped_files": [f"{relpaths[k]}: {probes[k]}" for k in bad[:1000]]},
    ) as writer:
        writer.write_files([relpaths[k] for k in keep], ids=[entries[k].key for k in keep],
                           sizes=[probes[k] for k in keep])
        index = {entries[k].key: i for i, k in enumerate(keep)}
        texts, owners, splits = captions_and_splits(entries, index)
        writer.set_captions(texts, owners)
        for name, idx in splits.items():
            writer.add_split(name, idx)
    return out
