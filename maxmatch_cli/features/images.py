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

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes every WORLD_SIZE-th image and writes its own shard
``<out>.shards/rank-<r>-of-<w>.h5``; rank 0 then waits for all shards and merges them into ``<out>`` (see
:mod:`maxmatch_cli.features.merge`), in the caption file's image order, so the result does not depend on the
number of ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.captions_file import load_entries
from maxmatch_cli.features.karpathy import KarpathyImage
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, store_state

RANDOM_WEIGHTS = "random"
GRID_BACKBONES = ("resnet152", "resnext101_32x8d")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorSpec:
    build: Any
    files: tuple[str, ...]
    url: str


def _detectors() -> dict[str, DetectorSpec]:
    from torchvision.models import detection as det

    def spec(build, enum) -> DetectorSpec:
        return DetectorSpec(build, tuple(os.path.basename(w.url) for w in enum), next(iter(enum)).url)

    return {
        "fasterrcnn_resnet50_fpn": spec(det.fasterrcnn_resnet50_fpn, det.FasterRCNN_ResNet50_FPN_Weights),
        "fasterrcnn_resnet50_fpn_v2": spec(det.fasterrcnn_resnet50_fpn_v2, det.FasterRCNN_ResNet50_FPN_V2_Weights),
    }


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(arch: str, weights: str | None, files: tuple[str, ...], how_to_get: str) -> Path | None:
    """The local checkpoint for ``arch``; ``None`` for random weights.

    Raises:
        MaxMatchError: naming the exact missing file and where to put it (nothing is downloaded).
    """
    if weights == RANDOM_WEIGHTS:
        return None
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MaxMatchError(f"--weights {path} does not exist.",
                                hint=f"pass the {arch} checkpoint ({files[0]}), or leave --weights out to use "
                                     f"{_hub_dir() / files[0]}")
        return path
    for name in files:
        if (_hub_dir() / name).is_file():
            return _hub_dir() / name
    raise MaxMatchError(
        f"no weights for {arch}: {_hub_dir() / files[0]} does not exist.",
        hint=f"nothing is downloaded at run time: on a machine with internet, {how_to_get}, then copy {files[0]} "
             f"to {_hub_dir()}/ (or pass --weights PATH)",
    )


def _load_state(model: torch.nn.Module, path: Path, arch: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise MaxMatchError(f"cannot read weights {path}: {exc}", hint="fetch the checkpoint again") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise MaxMatchError(f"{path} does not fit {arch}: {str(exc).splitlines()[0]}",
                            hint=f"pass a checkpoint of {arch}") from None


def build_grid_model(backbone: str, weights: str | None) -> torch.nn.Module:
    """ResNet trunk mapping (B, 3, H, W) to (B, 2048, H/32, W/32)."""
    from maxmatch_cli.models.backbones import BACKBONES, build_cnn_trunk

    if backbone not in GRID_BACKBONES:
        raise MaxMatchError(f"unknown grid backbone '{backbone}'.", hint=f"use one of: {', '.join(GRID_BACKBONES)}")
    spec = BACKBONES[backbone]
    path = resolve_weights(backbone, weights, spec.files, f"run {spec.how_to_get}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every process: an index can encode query images
        trunk, _ = build_cnn_trunk(backbone, RANDOM_WEIGHTS if path is None else str(path))
    if path is None:
        # Untrained residual branches compound over 50 blocks beyond float16's range; starting them at zero
        # (torchvision's zero_init_residual) keeps smoke-test activations storable.
        from torchvision.models.resnet import Bottleneck

        for block in trunk.modules():
            if isinstance(block, Bottleneck):
                torch.nn.init.zeros_(block.bn3.weight)
    return trunk.eval()


def build_detector(arch: str, weights: str | None, image_size: int) -> torch.nn.Module:
    """A torchvision Faster R-CNN whose images are resized to ``image_size`` (shorter side)."""
    detectors = _detectors()
    if arch not in detectors:
        raise MaxMatchError(f"unknown detector '{arch}'.", hint=f"use one of: {', '.join(detectors)}")
    spec = detectors[arch]
    path = resolve_weights(arch, weights, spec.files, f"download {spec.url}")
    # 300 proposals per image at test time, as the bottom-up-attention detector (torchvision: 1000).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every process (see build_grid_model)
        model = spec.build(weights=None, weights_backbone=None, num_classes=91, min_size=image_size,
                           max_size=max(image_size, int(image_size * 1333 / 800)), rpn_post_nms_top_n_test=300)
    if path is not None:
        _load_state(model, path, arch)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Decodes images in DataLoader workers; an unreadable file becomes an error string, not an exception."""

    def __init__(self, paths: list[Path], image_size: int, crop: bool):
        self.paths = paths
        self.image_size = image_size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, str, tuple[int, int]]:
        from PIL import Image
        from torchvision.transforms import functional as F

        path = self.paths[k]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                size = im.size
                if self.crop:
                    im = F.center_crop(F.resize(im, self.image_size), [self.image_size, self.image_size])
                x = F.to_tensor(im)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the path
            return k, None, f"{type(exc).__name__}: {exc}", (0, 0)
        if self.crop:
            x = F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return k, x, "", size


def _collate(batch: list) -> list:
    return batch


# --------------------------------------------------------------------------------------------------------------
# Feature functions
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def grid_features(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device) -> list[np.ndarray]:
    """(h*w, 2048) float32 per image."""
    x = torch.stack(images).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        fmap = model(x)
    cells = fmap.float().flatten(2).transpose(1, 2)  # (B, h*w, C)
    return list(cells.cpu().numpy())


@torch.no_grad()
def region_features(
    model: torch.nn.Module, images: list[torch.Tensor], device: torch.device, *, num_boxes: int = 36,
    min_boxes: int = 10, max_boxes: int = 100, score_threshold: float = 0.2,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Box-head features and boxes (original pixels) of each image's top detections.

    Returns:
        Per image ``(features (n, 1024) float32, boxes (n, 4) float32)``: n = ``num_boxes`` if it is > 0, else
        between ``min_boxes`` and ``max_boxes``.
    """
    xs = [x.to(device, non_blocking=True) for x in images]
    original = [tuple(x.shape[-2:]) for x in xs]
    batch, _ = model.transform(xs)
    feats = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, feats)
    heads = model.roi_heads
    heads.score_thresh = 0.0 if num_boxes > 0 else score_threshold
    heads.detections_per_img = max(num_boxes, max_boxes)
    detections, _ = heads(feats, proposals, batch.image_sizes)
    chosen = []
    for det, props in zip(detections, proposals):
        boxes, scores = det["boxes"], det["scores"]
        if num_boxes > 0:
            want = num_boxes
        else:
            keep = scores >= score_threshold
            boxes = boxes[keep][:max_boxes]
            want = max(min_boxes, len(boxes))
        if len(boxes) < want:  # too few detections: add the best remaining proposals (RPN order)
            boxes = torch.cat([boxes, props[: want - len(boxes)]])
            while len(boxes) < want:  # fewer proposals than boxes (tiny images): repeat the last
                boxes = torch.cat([boxes, boxes[-1:]])
        chosen.append(boxes[:want])
    pooled = heads.box_roi_pool(feats, chosen, batch.image_sizes)
    vectors = heads.box_head(pooled).float()
    out = []
    start = 0
    for boxes, resized, orig in zip(chosen, batch.image_sizes, original):
        ratio = torch.tensor([orig[1] / resized[1], orig[0] / resized[0]] * 2, device=boxes.device)
        out.append((vectors[start : start + len(boxes)].cpu().numpy(), (boxes * ratio).float().cpu().numpy()))
        start += len(boxes)
    return out


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ExtractConfig:
    """What to extract (everything that changes the output; used for the resume fingerprint)."""

    kind: str = "grid"  # grid | region
    backbone: str = "resnet152"  # grid: resnet152 | resnext101_32x8d; region: fasterrcnn_resnet50_fpn[_v2]
    image_size: int = 224  # grid: crop size; region: shorter side given to the detector
    num_boxes: int = 36  # region: fixed count; 0 = adaptive
    min_boxes: int = 10
    max_boxes: int = 100
    score_threshold: float = 0.2
    captions_per_image: int = 5
    skip_unreadable: bool = False


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
    if config.kind not in ("grid", "region"):
        raise MaxMatchError(f"unknown feature kind '{config.kind}'.", hint="use grid or region")
    backbones = GRID_BACKBONES if config.kind == "grid" else tuple(_detectors())
    if config.backbone not in backbones:  # before the images are listed and the model is built
        raise MaxMatchError(f"unknown {config.kind} backbone '{config.backbone}'.",
                            hint=f"use --backbone {' or '.join(backbones)}")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise MaxMatchError(f"image folder {images_dir} does not exist.", hint="pass --images DIR")
    loaded = load_entries(images_dir, captions, captions_per_image=config.captions_per_image, split=split,
                          skip_missing=config.skip_unreadable)
    entries = loaded.images
    if world_size > 1 and loaded.format != "karpathy":
        raise MaxMatchError("extraction over several ranks needs a Karpathy json (--captions) for the merge.",
                            hint="run a gallery or a plain captions file in one process")
    paths = [_find_image(images_dir, im) for im in entries]
    # skip_unreadable does not change any stored feature: a run may resume with it switched on.
    defining = {k: v for k, v in vars(config).items() if k != "skip_unreadable"}
    source_id = str(Path(captions).resolve()) if captions is not None else "gallery"
    extra = {} if loaded.format == "karpathy" else {"split": loaded.metadata["split"]}
    fp = args_fingerprint(kind="images", images=str(images_dir.resolve()), captions=source_id,
                          n=len(entries), weights=str(weights), config=defining, **extra)
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


def extraction_of(store) -> dict[str, Any] | None:
    """How a feature file's images were turned into features, when `extract-features --images` wrote it:
    ``{"config": ExtractConfig fields, "weights": ...}``; ``None`` for synthetic, precomputed or BUTD files."""
    meta = getattr(store, "metadata", None) or {}
    config, extractor = meta.get("config"), str(meta.get("extractor", ""))
    if not isinstance(config, dict) or not extractor.startswith("torchvision:"):
        return None
    known = set(ExtractConfig.__dataclass_fields__)
    return {"config": {k: v for k, v in config.items() if k in known}, "weights": meta.get("weights", "None")}


def features_of_files(paths: list[str | os.PathLike], extraction: dict[str, Any],
                      device: str = "auto") -> list[np.ndarray]:
    """Local features of image files, computed exactly as `extract-features --images` computed a feature file's.

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
    dev = _resolve_device(device)
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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaxMatchError(f"--device {name} asked for, but no CUDA device is available.", hint="use --device cpu")
    return device


def _extract_part(entries, paths, mine, target: Path, config: ExtractConfig, weights, device_name, batch_size,
                  num_workers, overwrite, progress, fp, *, final: bool, captions: str,
                  extra_metadata: dict | None = None, image_files: tuple[Path, list[str]] | None = None) -> None:
    """Extract the images ``mine`` (positions in ``entries``) into ``target``; ``image_files`` = (the absolute
    image folder, each entry's path relative to it) is recorded in the store."""
    from maxmatch_cli.features.karpathy import captions_and_splits
    from maxmatch_cli.progress import make_progress

    device = _resolve_device(device_name)
    if config.kind == "grid":
        model = build_grid_model(config.backbone, weights).to(device)
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, config.image_size, config.image_size, device=device))
        feature_dim, regions = probe.shape[1], probe.shape[2] * probe.shape[3]
    else:
        model = build_detector(config.backbone, weights, config.image_size).to(device)
        feature_dim = model.roi_heads.box_predictor.cls_score.in_features  # the box head's output size
        regions = config.num_boxes if config.num_boxes > 0 else None
    source = f"torchvision:{config.backbone}"
    writer = StoreWriter(
        target, feature_kind=config.kind, source=source, feature_dim=feature_dim, regions_per_image=regions,
        id_kind="int" if all(isinstance(e.key, int) for e in entries) else "str",
        with_boxes=config.kind == "region", with_sizes=True, args_fingerprint=fp, resume=True, overwrite=overwrite,
        chunk_rows=max(8, min(128, config.max_boxes // 2)), flush_every=max(64, 4 * batch_size),
        metadata={"extractor": source, "config": vars(config), "device": str(device), "captions": captions,
                  "weights": str(weights), **(extra_metadata or {})},
        image_root=None if image_files is None else image_files[0],
    )
    relpaths = None if image_files is None else image_files[1]
    with writer:
        done = set(writer.written_ids())
        todo = [k for k in mine if entries[k].key not in done]
        skipped: list[str] = []
        skipped_paths: list[str] = []
        workers = num_workers if num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
        loader = DataLoader(ImageFiles([paths[k] for k in todo], config.image_size, crop=config.kind == "grid"),
                            batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda")
        t0 = time.perf_counter()
        with make_progress(transient=True) as bar:
            task = bar.add_task(f"{config.kind} features", total=len(mine), completed=len(mine) - len(todo),
                                unit="images", status=str(device), visible=progress)
            for batch in loader:
                good = []
                for k, x, error, size in batch:
                    if x is not None:
                        good.append((todo[k], x, size))
                    elif config.skip_unreadable:
                        skipped.append(str(entries[todo[k]].key))
                        skipped_paths.append(f"{paths[todo[k]]}: {error}")
                    else:
                        raise MaxMatchError(
                            f"cannot read image {paths[todo[k]]} ({error}).",
                            hint="replace or remove the file and re-run (finished images are kept), or pass "
                                 "--skip-unreadable to leave such images out",
                        )
                if good:
                    _write_batch(writer, model, config, device, good, entries, relpaths)
                bar.update(task, advance=len(batch))
        writer.set_metadata(skipped_images=skipped, skipped_files=skipped_paths[:1000],
                            seconds=round(time.perf_counter() - t0, 2))
        if final:
            index = {key: i for i, key in enumerate(writer.written_ids())}
            texts, owners, splits = captions_and_splits(entries, index)
            writer.set_captions(texts, owners)
            for name, idx in splits.items():
                writer.add_split(name, idx)


def _write_batch(writer: StoreWriter, model, config: ExtractConfig, device, good, entries,
                 relpaths: list[str] | None = None) -> None:
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
