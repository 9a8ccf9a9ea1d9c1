"""Merge per-rank shards (or any compatible stores) into one feature store, no image lost or doubled.

Under torchrun each rank of an image extraction writes ``<out>.shards/rank-<r>-of-<w>.h5``, a finished store
of its share of the images without captions. Rank 0 waits for every shard and merges them into ``<out>`` in
the caption file's image order, adding captions and splits, so the merged file is the one a single process
would have written. The merge checks that every image of the caption file is in exactly one shard (or was
skipped as unreadable, which the shard records), is itself resumable, and removes the shards once the merged
file is complete.

Without a caption file, stores are concatenated in the given order, with their captions and splits (indices
shifted; splits of the same name are joined).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.features.store import FeatureStore, StoreWriter, args_fingerprint, open_store, store_state


def shard_folder(out: str | os.PathLike) -> Path:
    """Where the per-rank shards of ``out`` live: ``<out>.shards/``."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The shard rank ``rank`` of ``world_size`` writes."""
    return shard_folder(out) / f"rank-{rank:03d}-of-{world_size:03d}.h5"


def wait_for_shards(out: str | os.PathLike, world_size: int, timeout_s: float, poll_s: float = 5.0) -> list[Path]:
    """Block until every rank's shard is finished (it appears atomically), or fail after ``timeout_s``."""
    paths = [shard_path(out, r, world_size) for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return paths
        if time.monotonic() > deadline:
            raise MaxMatchError(
                f"gave up waiting for {len(missing)} shard(s) of {out}: {', '.join(p.name for p in missing[:4])}.",
                hint="when all ranks have finished, run `maxmatch features merge` with the shard files and the "
                     "caption file (or re-run the extraction: finished shards are reused)",
            )
        time.sleep(poll_s)


def merge_shards(
    shards: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    captions: str | os.PathLike | None = None,
    captions_per_image: int = 5,
    args_fingerprint: str = "",
    overwrite: bool = False,
    remove_shards: bool = True,
    batch_images: int = 64,
) -> Path:
    """Merge finished stores into ``out``.

    Args:
        shards: the stores to merge (e.g. from :func:`shard_path`).
        out: output path.
        captions: Karpathy json giving the image order, captions and splits; without it the stores are
            concatenated with their own captions and splits.
        captions_per_image: captions kept per image (with ``captions``).
        args_fingerprint: fingerprint recorded in the merged store (default: derived from the inputs).
        overwrite: replace an existing output.
        remove_shards: delete the shard files (and their folder if it empties) once the merge is finished.
        batch_images: images copied at a time.

    Raises:
        MaxMatchError: incompatible stores, an image in two stores, or an image of the caption file in none.
    """
    paths = [Path(p) for p in shards]
    if not paths:
        raise MaxMatchError("nothing to merge: no store given.", hint="pass the shard files")
    stores: list[FeatureStore] = []
    try:  # every opened store is closed, also when a check refuses the merge
        for p in paths:
            stores.append(open_store(p))
        _check_compatible(stores)
        fp = args_fingerprint or _merge_fingerprint(paths, captions, captions_per_image)
        out = Path(out)
        if not overwrite and store_state(out, fp) == "complete":
            return out
        _write_merged(stores, paths, out, fp, captions, captions_per_image, batch_images, overwrite)
    finally:
        for s in stores:
            s.close()
    if remove_shards:
        _remove_shards(paths, out)
    return out


def _write_merged(stores: list[FeatureStore], paths: list[Path], out: Path, fp: str, captions, captions_per_image: int,
                  batch_images: int, overwrite: bool) -> None:
    """Write ``out`` from the open ``stores``: their images in the merged order, then the captions and splits."""
    entries, order = _merge_order(stores, _locate_images(stores), captions, captions_per_image)
    ref = stores[0]
    image_root, files = _merged_files(stores, paths)
    with StoreWriter(
        out, feature_kind=ref.feature_kind, source=ref.source, feature_dim=ref.feature_dim,
        regions_per_image=ref.regions_per_image, n_images=len(order),
        id_kind="str" if ref.image_ids.dtype == object else "int", with_boxes=ref.has_boxes,
        with_sizes=all(s.image_sizes is not None for s in stores), metadata=_merged_metadata(stores, paths),
        args_fingerprint=fp, resume=True, overwrite=overwrite, image_root=image_root,
    ) as writer:
        _copy_images(writer, stores, order, batch_images, files)
        if entries is not None:
            _captions_of_entries(writer, entries)
        else:
            _concatenate_captions(writer, stores)


def _check_compatible(stores: list[FeatureStore]) -> None:
    """Every store must hold the same kind of features as the first."""
    ref = stores[0]
    for s in stores[1:]:
        if (s.feature_kind, s.source, s.feature_dim, s.layout, s.regions_per_image, s.has_boxes) != (
            ref.feature_kind, ref.source, ref.feature_dim, ref.layout, ref.regions_per_image, ref.has_boxes
        ):
            raise MaxMatchError(
                f"{s.path} ({s.feature_kind}, {s.source}, {s.layout}, D={s.feature_dim}) cannot be merged with "
                f"{ref.path} ({ref.feature_kind}, {ref.source}, {ref.layout}, D={ref.feature_dim}).",
                hint="merge only shards of one extraction",
            )


def _locate_images(stores: list[FeatureStore]) -> dict[int | str, tuple[int, int]]:
    """Each image key's (store, row); a key in two stores is an error."""
    where: dict[int | str, tuple[int, int]] = {}
    for k, s in enumerate(stores):
        for i, key in enumerate(_keys(s)):
            if key in where:
                other = stores[where[key][0]].path
                raise MaxMatchError(
                    f"image {key!r} is in both {other} and {s.path}.",
                    hint="the shards overlap: they come from different runs or world sizes; re-extract",
                )
            where[key] = (k, i)
    return where


def _merge_order(stores: list[FeatureStore], where: dict[int | str, tuple[int, int]], captions,
                 captions_per_image: int) -> tuple[list | None, list[tuple[int, int]]]:
    """The caption file's entries (``None`` without one) and the (store, row) of each merged image, in order.

    Raises:
        MaxMatchError: an image of the caption file that no store holds and none skipped as unreadable.
    """
    if captions is None:
        return None, [(k, i) for k, s in enumerate(stores) for i in range(s.n_images)]
    from maxmatch_cli.features.karpathy import load_karpathy

    entries = load_karpathy(captions, captions_per_image)
    skipped = {str(x) for s in stores for x in s.metadata.get("skipped_images", [])}
    lost = [e.key for e in entries if e.key not in where and str(e.key) not in skipped]
    if lost:
        raise MaxMatchError(
            f"{len(lost)} image(s) of {captions} are in none of the {len(stores)} shards "
            f"(e.g. {', '.join(map(str, lost[:5]))}).",
            hint="a rank did not finish or the shards come from another run; re-run the extraction",
        )
    return entries, [where[e.key] for e in entries if e.key in where]


def _merged_metadata(stores: list[FeatureStore], paths: list[Path]) -> dict:
    """The first store's metadata, naming the merged files and every image skipped in any of them."""
    metadata = dict(stores[0].metadata)
    metadata["merged_from"] = [p.name for p in paths]
    metadata["skipped_images"] = sorted({str(x) for s in stores for x in s.metadata.get("skipped_images", [])})
    return metadata


def _merged_files(stores: list[FeatureStore], paths: list[Path]) -> tuple[str | None, list[list[str]] | None]:
    """The merged file's image folder and each store's image paths relative to it, or (None, None).

    Shards of one extraction share their folder; stores of different folders (train2014 and val2014, say) keep
    their files under the folders' common parent. Where some store records no image paths, none are kept (a
    warning says so).
    """
    with_files = [s.image_files is not None for s in stores]
    if not any(with_files):
        return None, None
    if not all(with_files):
        without = [p.name for p, has in zip(paths, with_files) if not has]
        warnings.warn(f"{first_few(without)} record no image paths, so the merged file records none (thumbnails and "
                      f"query then need the images' folder given again)", stacklevel=3)
        return None, None
    roots = [str(s.image_root) for s in stores]
    if len(set(roots)) == 1:  # the shards of one extraction: their folder as they recorded it
        return roots[0], [[str(f) for f in s.image_files] for s in stores]
    if not all(os.path.isabs(r) for r in roots):  # made elsewhere (another OS): no common folder to trust here
        warnings.warn(f"the stores' image folders {first_few(roots)} are not all absolute paths on this machine, so "
                      f"the merged file records no image paths", stacklevel=3)
        return None, None
    root = os.path.commonpath(roots)
    files = []
    for s, r in zip(stores, roots):
        prefix = PurePosixPath(Path(os.path.relpath(r, root)).as_posix())
        files.append([str(prefix / f) if str(prefix) != "." else str(f) for f in s.image_files])
    return root, files


def _copy_images(writer: StoreWriter, stores: list[FeatureStore], order: list[tuple[int, int]], batch_images: int,
                 files: list[list[str]] | None) -> None:
    """Append the images ``order`` lists, ``batch_images`` at a time, from where ``writer`` resumes."""
    with_boxes = stores[0].has_boxes
    for lo in range(writer.n_written, len(order), batch_images):
        part = order[lo : lo + batch_images]
        writer.write_images(
            [stores[k].image_features(i) for k, i in part],
            ids=[_keys(stores[k])[i] for k, i in part],
            boxes=[stores[k].image_boxes(i) for k, i in part] if with_boxes else None,
            sizes=[stores[k].image_sizes[i] for k, i in part] if writer.with_sizes else None,
            files=[files[k][i] for k, i in part] if files is not None else None,
        )


def _captions_of_entries(writer: StoreWriter, entries: list) -> None:
    """The caption file's captions and splits, in the merged image order."""
    from maxmatch_cli.features.karpathy import captions_and_splits

    index = {key: n for n, key in enumerate(writer.written_ids())}
    texts, owners, splits = captions_and_splits(entries, index)
    writer.set_captions(texts, owners)
    for name, idx in splits.items():
        writer.add_split(name, idx)


def _remove_shards(paths: list[Path], out: Path) -> None:
    """Delete the merged files that lie in ``out``'s shard folder, and the folder once it is empty."""
    for p in paths:
        if p.parent == shard_folder(out):
            p.unlink(missing_ok=True)
    if shard_folder(out).is_dir() and not any(shard_folder(out).iterdir()):
        shutil.rmtree(shard_folder(out))


def _keys(store: FeatureStore) -> list[int | str]:
    ids = store.image_ids
    return [str(x) for x in ids] if ids.dtype == object else [int(x) for x in ids]


def _merge_fingerprint(paths: list[Path], captions, captions_per_image: int) -> str:
    return args_fingerprint(kind="merge", shards=[[str(p.resolve()), p.stat().st_size] for p in paths],
                            captions=str(captions), captions_per_image=captions_per_image)


def _concatenate_captions(writer: StoreWriter, stores: list[FeatureStore]) -> None:
    texts: list[str] = []
    owners: list[np.ndarray] = []
    splits: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    image_offset = 0
    for s in stores:
        caption_offset = len(texts)
        texts.extend(s.captions_text())
        owners.append(s.caption_image + image_offset)
        for name in s.splits:
            images, caps = s.split(name)
            entry = splits.setdefault(name, ([], []))
            entry[0].append(images + image_offset)
            entry[1].append(caps + caption_offset)
        image_offset += s.n_images
    writer.set_captions(texts, np.concatenate(owners) if owners else [])
    for name, (images, caps) in splits.items():
        writer.add_split(name, np.concatenate(images), np.concatenate(caps))
