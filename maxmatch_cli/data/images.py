"""The image side of a dataset item: stored local features or image files decoded on the fly.

An :class:`ImageSource` supplies it: stored local features (:class:`StoredFeatures`, padded to (B, R, F) with a
mask) or, for an end-to-end CNN (``model.image_encoder = "cnn"``) over an image-file store, the image file decoded
and transformed on the fly (:class:`RawImages`, stacked to (B, 3, S, S) with mask None).
:func:`build_image_source` picks the one a recipe needs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from maxmatch_cli.data.batches import pad_regions
from maxmatch_cli.errors import MaxMatchError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSource(Protocol):
    """What a dataset reads for an image (by store index) and how a batch of those is collated."""

    def load(self, index: int) -> Any: ...

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class StoredFeatures:
    """Local features from the store as (R, F) arrays, with VSE-infinity's region dropout (training only).

    Args:
        store: an open :class:`~maxmatch_cli.features.store.FeatureStore` of region or grid features.
        region_dropout: probability of dropping each region (0 at evaluation); at least one is kept.
    """

    def __init__(self, store, region_dropout: float = 0.0):
        self.store = store
        self.region_dropout = region_dropout

    def load(self, index: int) -> np.ndarray:
        feats = self.store.image_features(index)
        if self.region_dropout > 0 and feats.shape[0] > 1:
            keep = torch.rand(feats.shape[0]) >= self.region_dropout
            if keep.any():
                feats = feats[keep.numpy()]
        return feats

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_regions(items)


def decode_image_file(path: Path) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W).

    torchvision's decoders (JPEG, PNG, GIF, WebP) are used while they exist: deprecated since torchvision 0.29 in
    favour of TorchCodec, they still decode a 640x480 JPEG and crop it in 2.8 ms against PIL's 4.8 ms here.
    PIL decodes every other format, and everything once torchvision drops them.

    Raises:
        MaxMatchError: naming the file, when it is missing or cannot be decoded.
    """
    hint = "replace the file, fix data.image_root, or re-index the images without it (extract-features images DIR " \
           "--kind pixels --skip-unreadable)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MaxMatchError(f"cannot read image {path}: {exc.strerror or exc}", hint=hint) from None
    try:
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, ValueError):
        pass  # no torchvision decoders, a format they do not read, or a damaged file: PIL decides
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise MaxMatchError(f"cannot decode image {path}: not an image in a known format, or damaged "
                            f"({len(data):,} bytes)", hint=hint) from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the path
        raise MaxMatchError(f"cannot decode image {path}: {type(exc).__name__}: {exc}", hint=hint) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def pixel_transform(image_size: int, train: bool):
    """uint8 (3, H, W) -> float (3, S, S) normalised with the ImageNet statistics.

    Training: a random resized crop (scale 0.08-1, aspect 3/4-4/3) to S and a horizontal flip, as VSE++ and
    PVSE fine-tune their CNNs. Evaluation: the shorter side resized to S x 8/7 (256 for 224), centre crop S.
    """
    from torchvision.transforms import v2

    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class RawImages:
    """The image files of an image-file store, decoded and transformed on the fly for an end-to-end CNN.

    Args:
        files: each image's path relative to ``root``, by store index.
        root: the image folder.
        image_size: S, the side of the square crop.
        train: random crops and flips (training) or a centre crop (evaluation).
    """

    def __init__(self, files: Sequence[str], root: str | Path, image_size: int, train: bool):
        self.files = files
        self.root = Path(root)
        self.image_size = image_size
        self.train = train
        self.transform = pixel_transform(image_size, train)

    def load(self, index: int) -> torch.Tensor:
        return self.transform(decode_image_file(self.root / self.files[index]))

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, None]:
        return torch.stack(items), None


def check_image_input(store, image_encoder: str) -> None:
    """Refuse a store whose image side the image encoder cannot read (image files <-> model.image_encoder='cnn')."""
    pixels = store.feature_kind == "pixels"
    if image_encoder == "cnn" and not pixels:
        raise MaxMatchError(
            f"model.image_encoder='cnn' trains on raw images, but {store.path} holds precomputed "
            f"{store.feature_kind} features",
            hint="index the images with `maxmatch extract-features images DIR --captions JSON --kind pixels "
                 "--out FILE.h5` and train on that file, or use model.image_encoder=region|grid on these features")
    if image_encoder != "cnn" and pixels:
        raise MaxMatchError(
            f"{store.path} indexes image files (no features), but model.image_encoder='{image_encoder}' reads "
            "precomputed features",
            hint="set model.image_encoder=cnn to fine-tune a CNN on the images, or extract features with "
                 "`maxmatch extract-features images DIR --captions JSON --kind grid|region`")


def build_image_source(store, recipe, train: bool) -> ImageSource:
    """The image side a recipe's model reads: decoded image files for ``model.image_encoder='cnn'`` (root:
    ``data.image_root``, else the store's), stored features otherwise (region dropout in training).

    Raises:
        MaxMatchError: the store does not fit the encoder, or the image folder does not exist.
    """
    check_image_input(store, recipe.model.image_encoder)
    if recipe.model.image_encoder != "cnn":
        return StoredFeatures(store, recipe.data.region_dropout if train else 0.0)
    root = Path(recipe.data.image_root or store.image_root)
    if not root.is_dir():
        where = "data.image_root" if recipe.data.image_root else f"the image_root of {store.path}"
        raise MaxMatchError(f"image folder {root} ({where}) does not exist",
                            hint="set data.image_root to where the images are (--set data.image_root=DIR), or "
                                 "re-index them there with extract-features images DIR --kind pixels")
    return RawImages(store.image_files, root, recipe.data.image_size, train)
