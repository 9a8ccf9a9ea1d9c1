"""Decoding image files and computing their features: grid cells of a ResNet trunk, box-head vectors of a detector.

Used by :mod:`maxmatch_cli.features.images` for whole folders and for single query images, so both compute the
same features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def collate_list(batch: list) -> list:
    """Keep a DataLoader batch as the list of samples (sizes differ and unreadable files have no tensor)."""
    return batch


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
