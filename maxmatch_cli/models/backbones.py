"""Torchvision CNN trunks for end-to-end image encoding, with weights from local files only.

Weights are never downloaded. ``cnn_weights`` may be:
- a path to a ``.pth`` state dict (torchvision's, the WSL-Images Instagram ResNeXt, or a dict holding one
  under ``state_dict``/``model``);
- empty: look in the torch hub cache, ``torch.hub.get_dir()/checkpoints/``, for the file the paper's model
  starts from (listed in :data:`BACKBONES`): torchvision's ImageNet ResNets, and for ResNeXt-101 32x8d the
  Instagram-pretrained WSL-Images file of App. E *only*; torchvision's ImageNet ResNeXt is a different model and is
  never taken in its place;
- ``"imagenet"``: torchvision's ImageNet weights from the hub cache, for any backbone. For ResNeXt this is an
  explicit departure from App. E, and the run records it (the value is part of the recipe saved with every
  checkpoint);
- ``"random"``: random initialisation (tests and smoke runs; never for real training).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from maxmatch_cli.errors import MaxMatchError

RANDOM_WEIGHTS = "random"
IMAGENET_WEIGHTS = "imagenet"
WSL_URL = "https://download.pytorch.org/models/ig_resnext101_32x8-c38310e5.pth"
"""The Instagram-pretrained ResNeXt-101 32x8d (Mahajan et al. 2018, facebookresearch/WSL-Images hub entry
``resnext101_32x8d_wsl``), App. E's backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision trunk and which weight files may be used for it."""

    build: Callable[..., nn.Module]
    """torchvision constructor (called with weights=None)."""
    files: tuple[str, ...]
    """Checkpoint file names in the hub cache that give the paper's model (the default), preferred first."""
    channels: int
    """Channels of the last feature map."""
    how_to_get: str
    """One-line instruction for fetching the preferred file on a machine with internet."""
    imagenet: tuple[str, ...] = ()
    """torchvision's ImageNet checkpoint names, taken from the hub cache only with ``cnn_weights = "imagenet"``."""
    pretraining: str = "ImageNet"
    """What the default files were trained on (for messages)."""
    url: str = ""
    """Where the preferred file comes from, when it is not a torchvision download (for messages)."""


def _names(enum) -> tuple[str, ...]:
    return tuple(os.path.basename(w.url) for w in enum)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet152": BackboneSpec(
        build=torchvision.models.resnet152,
        files=_names(torchvision.models.ResNet152_Weights),
        imagenet=_names(torchvision.models.ResNet152_Weights),
        channels=2048,
        how_to_get="python -c \"import torchvision; torchvision.models.resnet152(weights='IMAGENET1K_V1')\"",
    ),
    "resnext101_32x8d": BackboneSpec(
        build=torchvision.models.resnext101_32x8d,
        # The paper's (and SetDiv's) ResNeXt is the Instagram-pretrained WSL model (App. E); torchvision's ImageNet
        # ResNeXt has the same shapes and would load without complaint, so it is taken only when asked for by name.
        files=(os.path.basename(WSL_URL),),
        imagenet=_names(torchvision.models.ResNeXt101_32X8D_Weights),
        channels=2048,
        how_to_get="python -c \"import torch; torch.hub.load('facebookresearch/WSL-Images', "
                   "'resnext101_32x8d_wsl')\"",
        url=WSL_URL,
        pretraining="Instagram (WSL-Images)",
    ),
    # Not in the paper: a small trunk (11.7M parameters, 512 channels) for smoke runs and tests on a CPU.
    "resnet18": BackboneSpec(
        build=torchvision.models.resnet18,
        files=_names(torchvision.models.ResNet18_Weights),
        imagenet=_names(torchvision.models.ResNet18_Weights),
        channels=512,
        how_to_get="python -c \"import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')\"",
    ),
}


def hub_checkpoint_dir() -> Path:
    """Where torch keeps downloaded checkpoints (``$TORCH_HOME/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_cnn_weights(backbone: str, weights: str) -> Path:
    """The local weight file for ``backbone``: ``weights`` if a path, else the first match in the hub cache.

    Empty ``weights`` looks for the paper's checkpoint (:attr:`BackboneSpec.files`); ``"imagenet"`` looks for
    torchvision's ImageNet one (:attr:`BackboneSpec.imagenet`).

    Raises:
        MaxMatchError: naming the exact file that is missing, where it comes from and where to put it.
    """
    spec = BACKBONES[backbone]
    if weights and weights != IMAGENET_WEIGHTS:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MaxMatchError(f"CNN weights file {path} does not exist (model.cnn_weights)",
                                hint=f"copy the {backbone} checkpoint ({spec.files[0]}) there, leave "
                                     f"model.cnn_weights empty to use {hub_checkpoint_dir()}, or set it to "
                                     f"'{RANDOM_WEIGHTS}' for an untrained smoke test")
        return path
    folder = hub_checkpoint_dir()
    names = spec.imagenet if weights == IMAGENET_WEIGHTS else spec.files
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if weights == IMAGENET_WEIGHTS:
        raise MaxMatchError(f"no ImageNet {backbone} weights found (model.cnn_weights='{IMAGENET_WEIGHTS}'): "
                            f"expected {folder / names[0]}",
                            hint=f"nothing is downloaded at run time; on a machine with internet run python -c "
                                 f"\"import torchvision; torchvision.models.{backbone}(weights='IMAGENET1K_V1')\" "
                                 f"and copy {names[0]} into {folder}")
    raise MaxMatchError(
        f"no {spec.pretraining}-pretrained {backbone} weights found: expected {folder / spec.files[0]}"
        + (f" (or {', '.join(spec.files[1:])} in that folder)" if len(spec.files) > 1 else "")
        + _imagenet_note(spec, folder),
        hint=f"nothing is downloaded at run time; on a machine with internet run {spec.how_to_get}"
             + (f" (it downloads {spec.url})" if spec.url else "")
             + f" and copy {spec.files[0]} into {folder}, or set model.cnn_weights to a local .pth file"
             + (f"; --set model.cnn_weights={IMAGENET_WEIGHTS} trains from torchvision's ImageNet weights instead "
                f"(not the paper's model; the run records the choice)" if spec.imagenet != spec.files else ""))


def _imagenet_note(spec: BackboneSpec, folder: Path) -> str:
    """Says so when only torchvision's ImageNet file is there, which is not taken in the paper's file's place."""
    if spec.imagenet == spec.files:
        return ""
    found = [name for name in spec.imagenet if (folder / name).is_file()]
    return (f"; {found[0]} there is torchvision's ImageNet model, used only with "
            f"model.cnn_weights='{IMAGENET_WEIGHTS}'") if found else ""


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise MaxMatchError(f"{path} does not hold a state dict", hint="save it with torch.save(model.state_dict())")
    prefix = "module."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in obj.items()}


def build_cnn_trunk(backbone: str, weights: str = "") -> tuple[nn.Module, int]:
    """A torchvision trunk without avgpool and fc, mapping (B, 3, H, W) to (B, C, H/32, W/32).

    Args:
        backbone: a key of :data:`BACKBONES`.
        weights: local .pth path, empty for the paper's checkpoint in the torch hub cache, ``"imagenet"`` for
            torchvision's ImageNet checkpoint there, or ``"random"``.

    Returns:
        The trunk and its channel count C.
    """
    if backbone not in BACKBONES:
        raise MaxMatchError(f"unknown CNN backbone '{backbone}'",
                            hint=f"set model.cnn_backbone to one of: {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    path = None if weights == RANDOM_WEIGHTS else resolve_cnn_weights(backbone, weights)
    model = spec.build(weights=None)
    if path is not None:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or non-tensor pickle
            raise MaxMatchError(f"cannot read CNN weights {path}: {exc}",
                                hint=f"re-fetch {spec.files[0]}; the file may be truncated") from None
        state = {k: v for k, v in _state_dict(raw, path).items() if not k.startswith("fc.")}
        hint = f"model.cnn_backbone must match the checkpoint ({', '.join(spec.files)})"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise MaxMatchError(f"{path} does not fit {backbone}: {str(exc).splitlines()[-1].strip()}",
                                hint=hint) from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise MaxMatchError(f"{path} does not fit {backbone}: missing {missing[:3]}, unexpected {unexpected[:3]}",
                                hint=hint)
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                          model.layer1, model.layer2, model.layer3, model.layer4)
    return trunk, spec.channels
