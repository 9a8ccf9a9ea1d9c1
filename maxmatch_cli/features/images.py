"""Extract features from a folder of images with torchvision models: grid (ResNet) or region (Faster R-CNN).

* **Grid**: ResNet-152 or ResNeXt-101 32x8d without pool and fc. Images are resized (shorter side) and
  centre-cropped to ``image_size``; the last feature map's h x w cells of 2048 dims are stored as the image's
  "regions" (7 x 7 = 49 at 224, 14 x 14 at 448). The model's global vector is their average.
* **Region**: torchvision Faster R-CNN (ResNet-50 FPN, v1 or v2, COCO-trained). For each image the detections
  are ranked by score; ``num_boxes`` fixed (default 36, as BUTD) takes the top ones and fills up with the
  highest-objectness RPN proposals when there are fewer detections; ``num_boxes=0`` keeps the adaptive
  ``min_boxes``..``max_boxes`` detections above ``score_threshold`` (flat layout). Each box's feature is the
  detector's box-head output (1024 dims), computed on the final boxes; boxes are stored in original pixels.

Weights come from ``weights`` (a local ``.pth``) or torch's hub cache (``torch.hub.get_dir()/checkpoints``) and
are never downloaded: a missing file stops with its exact name and where to put it. ``weights="random"`` builds
untrained models for tests and smoke runs.

Images are decoded in DataLoader workers and run in batches on the GPU when there is one (fp16 autocast), on the
CPU otherwise. An unreadable image stops the extraction with its path (the partial file stays and a re-run
resumes), unless ``skip_unreadable`` is set: then it is left out, with its captions, and listed in the
metadata (``skipped_images``). Interrupted runs resume: images already in the partial file are not recomputed.

The store records where the images are: the folder as ``image_root`` (absolute) and each image's path relative
to it as ``images/files`` (see :mod:`maxmatch_cli.features.store.schema`), so that thumbnails and query results
can show the images themselves.

The models and :class:`ExtractConfig` live in :mod:`maxmatch_cli.features.image_models`, decoding and the
feature functions in :mod:`maxmatch_cli.features.image_features`; this module runs them over a caption file's
images and re-exports their public names.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes every WORLD_SIZE-th image and writes its own shard
``<out>.shards/rank-<r>-of-<w>.h5``; rank 0 then waits for all shards and merges them into ``<out>`` (see
:mod:`maxmatch_cli.features.merge`), in the caption file's image order, so the result does not depend on the
number of ranks.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.captions_file import load_entries
from maxmatch_cli.features.image_features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    collate_list,
    grid_features,
    region_features,
)
from maxmatch_cli.features.image_models import (
    GRID_BACKBONES,
    RANDOM_WEIGHTS,
    DetectorSpec,
    ExtractConfig,
    build_detector,
    build_grid_model,
    detector_specs,
    resolve_device,
    resolve_weights,
)
from maxmatch_cli.features.karpathy import KarpathyImage
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, partial_path, store_state

__all__ = [
    "GRID_BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_WEIGHTS",
    "DetectorSpec",
    "ExtractConfig",
    "ImageFiles",
    "build_detector",
    "build_grid_model",
    "extract_from_images",
    "extraction_of",
    "features_of_files",
    "grid_features",
    "region_features",
    "resolve_weights",
]

# build_grid_model, build_detector and _write_batch are looked up here when called, so tests can patch them on this
# module (tests/conftest.py reuses random models; tests/faults/test_newcomer.py forbids loading).


def extract_from_images(
    images_dir: str | os.PathLike,
    captions: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    config: ExtractConfig | None = None,
    split: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    merge_timeout_s: float = 24 * 3600,
) -> Path:
    """Extract grid or region features of every image of a caption file (or of a folder) into a feature store.

    Args:
        images_dir: image root; an entry is found at ``images_dir/filepath/filename`` or ``images_dir/filename``.
        captions: Karpathy split json (captions and splits), a plain captions file (txt/csv/json list), or
            ``None`` for a gallery of every image under ``images_dir``
            (see :mod:`maxmatch_cli.features.captions_file`).
        out: output ``.h5`` path.
        config: what to extract (:class:`ExtractConfig`).
        split: the one split of a plain captions file (default ``train``) or a gallery (default ``gallery``).
        weights: checkpoint path, ``None`` for the torch hub cache, or ``"random"`` (tests only).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        batch_size: images per forward pass.
        num_workers: DataLoader decoding workers (default: up to 4, fewer on small machines).
        overwrite: replace an existing output.
        progress: show a progress bar with images/s and ETA.
        rank, world_size: shard position (default: ``RANK`` / ``WORLD_SIZE`` from torchrun, else 0 / 1).
        merge_timeout_s: how long rank 0 waits for the other ranks' shards before giving up on the merge.

    Returns:
        The output path (after the merge on rank 0; the shard path on other ranks).
    """
    config = config or ExtractConfig()
    _check_kind_and_backbone(config)  # before the images are listed and the model is built
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise MaxMatchError(f"image folder {images_dir} does not exist.",
                            hint="pass an existing folder: maxmatch extract-features images DIR ...")
    loaded = load_entries(images_dir, captions, captions_per_image=config.captions_per_image, split=split,
                          skip_missing=config.skip_unreadable)
    entries = loaded.images
    if world_size > 1 and loaded.format != "karpathy":
        raise MaxMatchError("extraction over several ranks needs a Karpathy json (--captions) for the merge.",
                            hint="run a gallery or a plain captions file in one process")
    paths = [_find_image(images_dir, im) for im in entries]
    fp = _fingerprint(images_dir, captions, loaded, weights, config)
    if not overwrite and store_state(out, fp) == "complete":
        return out

    from maxmatch_cli.features.merge import merge_shards, shard_path, wait_for_shards

    mine = list(range(rank, len(entries), world_size))
    target = out if world_size == 1 else shard_path(out, rank, world_size)
    relpaths = [path.relative_to(images_dir).as_posix() for path in paths]  # as _find_image built them
    _extract_part(entries, paths, mine, target, config, weights, device, batch_size, num_workers, overwrite,
                  progress, fp, final=world_size == 1, captions=str(captions), extra_metadata=loaded.metadata,
                  image_files=(images_dir.resolve(), relpaths))
    if world_size == 1:
        return out
    if rank != 0:
        return target
    shards = wait_for_shards(out, world_size, merge_timeout_s)
    return merge_shards(shards, out, captions=captions, captions_per_image=config.captions_per_image,
                        args_fingerprint=fp, overwrite=overwrite)


def _check_kind_and_backbone(config: ExtractConfig) -> None:
    if config.kind not in ("grid", "region"):
        raise MaxMatchError(f"unknown feature kind '{config.kind}'.", hint="use grid or region")
    backbones = GRID_BACKBONES if config.kind == "grid" else tuple(detector_specs())
    if config.backbone not in backbones:
        raise MaxMatchError(f"unknown {config.kind} backbone '{config.backbone}'.",
                            hint=f"use --backbone {' or '.join(backbones)}")


def _fingerprint(images_dir: Path, captions, loaded, weights, config: ExtractConfig) -> str:
    """What identifies the output for resuming: the inputs, the weights and every feature-defining setting."""
    # skip_unreadable does not change any stored feature: a run may resume with it switched on.
    defining = {k: v for k, v in vars(config).items() if k != "skip_unreadable"}
    source_id = str(Path(captions).resolve()) if captions is not None else "gallery"
    extra = {} if loaded.format == "karpathy" else {"split": loaded.metadata["split"]}
    return args_fingerprint(kind="images", images=str(images_dir.resolve()), captions=source_id,
                            n=len(loaded.images), weights=str(weights), config=defining, **extra)


def extraction_of(store) -> dict[str, Any] | None:
    """How a feature file's images were turned into features, when `extract-features images` wrote it:
    ``{"config": ExtractConfig fields, "weights": ...}``; ``None`` for synthetic, precomputed or BUTD files."""
    meta = getattr(store, "metadata", None) or {}
    config, extractor = meta.get("config"), str(meta.get("extractor", ""))
    if not isinstance(config, dict) or not extractor.startswith("torchvision:"):
        return None
    known = set(ExtractConfig.__dataclass_fields__)
    return {"config": {k: v for k, v in config.items() if k in known}, "weights": meta.get("weights", "None")}


def features_of_files(paths: list[str | os.PathLike], extraction: dict[str, Any],
                      device: str = "auto") -> list[np.ndarray]:
    """Local features of image files, computed exactly as `extract-features images` computed a feature file's.

    Args:
        paths: image files.
        extraction: :func:`extraction_of` a feature file (its extractor settings and weights).
        device: where the extractor runs.

    Returns:
        One ``(R, F)`` float32 array per path (grid cells or region features), in order.

    Raises:
        MaxMatchError: a file that is missing or cannot be decoded (named), or weights that are no longer where
            the feature file's extraction found them.
    """
    config = ExtractConfig(**extraction["config"])
    weights = extraction.get("weights")
    weights = None if weights in (None, "None") else weights
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise MaxMatchError(f"image {path} does not exist", hint="pass the path of an image file")
    dev = resolve_device(device)
    decoded = ImageFiles(files, config.image_size, crop=config.kind == "grid")
    images = []
    for k in range(len(files)):
        _, x, error, _ = decoded[k]
        if x is None:
            raise MaxMatchError(f"cannot decode image {files[k]} ({error})",
                                hint="pass a readable image file (JPEG, PNG, ...)")
        images.append(x)
    if config.kind == "grid":
        model = build_grid_model(config.backbone, weights).to(dev)
        return grid_features(model, images, dev)
    model = build_detector(config.backbone, weights, config.image_size).to(dev)
    results = region_features(model, images, dev, num_boxes=config.num_boxes, min_boxes=config.min_boxes,
                              max_boxes=config.max_boxes, score_threshold=config.score_threshold)
    return [f for f, _ in results]


def _find_image(root: Path, im: KarpathyImage) -> Path:
    full = root / im.relpath
    return full if full.exists() else root / Path(im.relpath).name



def _extract_part(entries, paths, mine, target: Path, config: ExtractConfig, weights, device_name, batch_size,
                  num_workers, overwrite, progress, fp, *, final: bool, captions: str,
                  extra_metadata: dict | None = None, image_files: tuple[Path, list[str]] | None = None) -> None:
    """Extract the images ``mine`` (positions in ``entries``) into ``target``; ``image_files`` = (the absolute
    image folder, each entry's path relative to it) is recorded in the store."""
    device = resolve_device(device_name)
    model, feature_dim, regions = _build_extractor(config, weights, device)
    metadata = {"extractor": f"torchvision:{config.backbone}", "config": vars(config), "device": str(device),
                "captions": captions, "weights": str(weights), **(extra_metadata or {})}
    image_files = _as_partial_began(target, image_files, fp)
    writer = _open_writer(target, entries, config, feature_dim, regions, metadata, batch_size=batch_size, fp=fp,
                          overwrite=overwrite, image_root=None if image_files is None else image_files[0])
    relpaths = None if image_files is None else image_files[1]
    with writer:
        done = set(writer.written_ids())
        todo = [k for k in mine if entries[k].key not in done]
        t0 = time.perf_counter()
        skipped, skipped_paths = _extract_batches(writer, model, config, device, entries, paths, relpaths, todo,
                                                  total=len(mine), batch_size=batch_size, num_workers=num_workers,
                                                  progress=progress)
        writer.set_metadata(skipped_images=skipped, skipped_files=skipped_paths[:1000],
                            seconds=round(time.perf_counter() - t0, 2))
        if final:
            _write_captions(writer, entries)


def _as_partial_began(target: Path, image_files: tuple[Path, list[str]] | None,
                      fp: str) -> tuple[Path, list[str]] | None:
    """``image_files``, or None where ``target``'s ``.partial`` is this extraction (same arguments fingerprint)
    begun by a maxmatch that recorded no image paths: it resumes as it began, with a warning. Anything else (no
    partial, one with paths, another extraction's, not a store) goes to the writer, which resumes, refuses or
    starts over as usual."""
    partial = partial_path(target)
    if image_files is None or not partial.is_file():
        return image_files
    try:
        with h5py.File(partial, "r") as f:
            images = f.get("images")
            began_without = (isinstance(images, h5py.Group) and "n_written" in f.attrs
                             and f.attrs.get("args_fingerprint") == fp
                             and "image_root" not in f.attrs and "files" not in images)
    except (OSError, KeyError, ValueError, TypeError):
        return image_files  # not a readable store: the writer says what is wrong with it
    if not began_without:
        return image_files
    warnings.warn(f"{partial} was begun by an older maxmatch, which did not record image paths: resuming it "
                  f"without them (analyze-collapse then needs --images DIR for thumbnails; delete {partial.name} "
                  f"and run again to record them)", stacklevel=4)
    return None


def _build_extractor(config: ExtractConfig, weights, device: torch.device) -> tuple[torch.nn.Module, int, int | None]:
    """The model on ``device``, its feature size and regions per image (``None``: adaptive box counts)."""
    if config.kind == "grid":
        model = build_grid_model(config.backbone, weights).to(device)
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, config.image_size, config.image_size, device=device))
        return model, probe.shape[1], probe.shape[2] * probe.shape[3]
    model = build_detector(config.backbone, weights, config.image_size).to(device)
    feature_dim = model.roi_heads.box_predictor.cls_score.in_features  # the box head's output size
    return model, feature_dim, config.num_boxes if config.num_boxes > 0 else None


def _open_writer(target: Path, entries, config: ExtractConfig, feature_dim: int, regions: int | None,
                 metadata: dict, *, batch_size: int, fp: str, overwrite: bool, image_root: Path | None) -> StoreWriter:
    """The resumable writer of ``target`` (not entered yet)."""
    return StoreWriter(
        target, feature_kind=config.kind, source=metadata["extractor"], feature_dim=feature_dim,
        regions_per_image=regions, id_kind="int" if all(isinstance(e.key, int) for e in entries) else "str",
        with_boxes=config.kind == "region", with_sizes=True, args_fingerprint=fp, resume=True, overwrite=overwrite,
        chunk_rows=max(8, min(128, config.max_boxes // 2)), flush_every=max(64, 4 * batch_size),
        metadata=metadata, image_root=image_root,
    )


def _extract_batches(writer: StoreWriter, model, config: ExtractConfig, device: torch.device, entries, paths,
                     relpaths: list[str] | None, todo: list[int], *, total: int, batch_size: int,
                     num_workers: int | None, progress: bool) -> tuple[list[str], list[str]]:
    """Decode the images ``todo`` in DataLoader workers and write their features, with a progress bar.

    Returns:
        The keys of the images left out as unreadable, and ``path: error`` of each.
    """
    from maxmatch_cli.progress import make_progress

    skipped: list[str] = []
    skipped_paths: list[str] = []
    workers = num_workers if num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = DataLoader(ImageFiles([paths[k] for k in todo], config.image_size, crop=config.kind == "grid"),
                        batch_size=batch_size, num_workers=workers, collate_fn=collate_list,
                        pin_memory=device.type == "cuda")
    with make_progress(transient=True) as bar:
        task = bar.add_task(f"{config.kind} features", total=total, completed=total - len(todo),
                            unit="images", status=str(device), visible=progress)
        for batch in loader:
            good = _readable(batch, todo, entries, paths, config.skip_unreadable, skipped, skipped_paths)
            if good:
                _write_batch(writer, model, config, device, good, entries, relpaths)
            bar.update(task, advance=len(batch))
    return skipped, skipped_paths


def _readable(batch: list, todo: list[int], entries, paths, skip_unreadable: bool, skipped: list[str],
              skipped_paths: list[str]) -> list:
    """A decoded batch's images as ``(entry position, tensor, size)``; an unreadable one stops the run, or with
    ``skip_unreadable`` is appended to ``skipped`` (its key) and ``skipped_paths`` (its path and error)."""
    good = []
    for k, x, error, size in batch:
        if x is not None:
            good.append((todo[k], x, size))
        elif skip_unreadable:
            skipped.append(str(entries[todo[k]].key))
            skipped_paths.append(f"{paths[todo[k]]}: {error}")
        else:
            raise MaxMatchError(
                f"cannot read image {paths[todo[k]]} ({error}).",
                hint="replace or remove the file and re-run (finished images are kept), or pass "
                     "--skip-unreadable to leave such images out",
            )
    return good


def _write_captions(writer: StoreWriter, entries) -> None:
    """Captions and splits of the images written, in the store's image order (single-process runs)."""
    from maxmatch_cli.features.karpathy import captions_and_splits

    index = {key: i for i, key in enumerate(writer.written_ids())}
    texts, owners, splits = captions_and_splits(entries, index)
    writer.set_captions(texts, owners)
    for name, idx in splits.items():
        writer.add_split(name, idx)


def _write_batch(writer: StoreWriter, model, config: ExtractConfig, device, good, entries,
                 relpaths: list[str] | None = None) -> None:
    """Compute one batch's features (``good``: entry position, tensor, size) and append them to the store."""
    xs = [x for _, x, _ in good]
    ids = [entries[k].key for k, _, _ in good]
    sizes = [size for _, _, size in good]
    files = None if relpaths is None else [relpaths[k] for k, _, _ in good]
    if config.kind == "grid":
        writer.write_images(np.stack(grid_features(model, xs, device)), ids=ids, sizes=sizes, files=files)
    else:
        results = region_features(model, xs, device, num_boxes=config.num_boxes, min_boxes=config.min_boxes,
                                  max_boxes=config.max_boxes, score_threshold=config.score_threshold)
        writer.write_images([f for f, _ in results], ids=ids, boxes=[b for _, b in results], sizes=sizes,
                            files=files)
