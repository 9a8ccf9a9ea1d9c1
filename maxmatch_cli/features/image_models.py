"""The torchvision extractors of :mod:`maxmatch_cli.features.images`: what to extract, and the models.

:class:`ExtractConfig` holds every setting that changes the stored features. :func:`build_grid_model` builds a
ResNet trunk, :func:`build_detector` a Faster R-CNN. Weights come from a local ``.pth`` or torch's hub cache and are
never downloaded (:func:`resolve_weights`); ``"random"`` builds untrained models for tests and smoke runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maxmatch_cli.errors import MaxMatchError

RANDOM_WEIGHTS = "random"
GRID_BACKBONES = ("resnet152", "resnext101_32x8d")


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


@dataclass(frozen=True)
class DetectorSpec:
    """How to build one torchvision detector and the checkpoint file names it accepts."""

    build: Any
    files: tuple[str, ...]
    url: str


def detector_specs() -> dict[str, DetectorSpec]:
    """The region extractors by name (torchvision is imported only when one is asked for)."""
    from torchvision.models import detection as det

    def spec(build, enum) -> DetectorSpec:
        return DetectorSpec(build, tuple(os.path.basename(w.url) for w in enum), next(iter(enum)).url)

    return {
        "fasterrcnn_resnet50_fpn": spec(det.fasterrcnn_resnet50_fpn, det.FasterRCNN_ResNet50_FPN_Weights),
        "fasterrcnn_resnet50_fpn_v2": spec(det.fasterrcnn_resnet50_fpn_v2, det.FasterRCNN_ResNet50_FPN_V2_Weights),
    }


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
    detectors = detector_specs()
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


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"`` as a device; CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaxMatchError(f"--device {name} asked for, but no CUDA device is available.", hint="use --device cpu")
    return device
