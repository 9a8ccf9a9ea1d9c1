"""Which CNN weights a recipe starts from: the paper's file or a refusal naming it, never a silent substitute.

ResNeXt-101 32x8d in App. E is the Instagram-pretrained WSL model. torchvision's ImageNet ResNeXt has the same
shapes, so it would load without complaint; it is taken only with ``model.cnn_weights = "imagenet"``, which the
run records in its recipe. The ResNeXt trunk itself is too slow to build in a test, so the ResNeXt entry is kept
(file names, messages) with a ResNet-18 constructor in its place.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models import backbones
from maxmatch_cli.models.checkpoint import load_checkpoint

WSL = "ig_resnext101_32x8-c38310e5.pth"
IMAGENET = "resnext101_32x8d-8ba56ff5.pth"  # torchvision's IMAGENET1K_V1 file


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and the ResNeXt entry built by ResNet-18's constructor (same file names)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = backbones.BACKBONES["resnext101_32x8d"]
    monkeypatch.setitem(backbones.BACKBONES, "resnext101_32x8d",
                        dataclasses.replace(spec, build=torchvision.models.resnet18, channels=512))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _save_weights(path, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), path)
    return model.conv1.weight.detach().clone()


def test_the_paper_files_are_named():
    assert backbones.BACKBONES["resnext101_32x8d"].files == (WSL,)
    assert backbones.WSL_URL.endswith("/" + WSL)
    assert IMAGENET in backbones.BACKBONES["resnext101_32x8d"].imagenet
    # The ResNets of the paper are ImageNet models: their default is torchvision's file.
    assert backbones.BACKBONES["resnet152"].files == backbones.BACKBONES["resnet152"].imagenet


def test_only_imagenet_resnext_cached_is_refused_naming_the_wsl_file(hub):
    (hub / IMAGENET).write_bytes(b"not read")
    with pytest.raises(MaxMatchError) as err:
        backbones.build_cnn_trunk("resnext101_32x8d", "")
    message, hint = str(err.value), err.value.hint
    assert str(hub / WSL) in message and "Instagram" in message
    assert f"{IMAGENET} there is torchvision's ImageNet model" in message
    assert backbones.WSL_URL in hint and "resnext101_32x8d_wsl" in hint
    assert "model.cnn_weights=imagenet" in hint


def test_explicit_imagenet_loads_torchvision_file_and_default_prefers_wsl(hub):
    imagenet = _save_weights(hub / IMAGENET, seed=1)
    trunk, _ = backbones.build_cnn_trunk("resnext101_32x8d", backbones.IMAGENET_WEIGHTS)
    torch.testing.assert_close(trunk[0].weight, imagenet)
    wsl = _save_weights(hub / WSL, seed=2)
    trunk, _ = backbones.build_cnn_trunk("resnext101_32x8d", "")
    torch.testing.assert_close(trunk[0].weight, wsl)
    trunk, _ = backbones.build_cnn_trunk("resnext101_32x8d", backbones.IMAGENET_WEIGHTS)
    torch.testing.assert_close(trunk[0].weight, imagenet)


def test_explicit_imagenet_with_no_file_names_it(hub):
    with pytest.raises(MaxMatchError, match=IMAGENET) as err:
        backbones.build_cnn_trunk("resnext101_32x8d", backbones.IMAGENET_WEIGHTS)
    assert "IMAGENET1K_V1" in err.value.hint


def test_training_refuses_then_records_the_explicit_override(hub, pixel_h5, tmp_path):
    torch.set_num_threads(1)
    _save_weights(hub / IMAGENET, seed=1)
    sets = {"data.path": pixel_h5, "model.image_encoder": "cnn", "model.cnn_backbone": "resnext101_32x8d",
            "data.image_size": 32, "model.embed_dim": 16, "model.word_dim": 8, "model.set_depth": 1,
            "model.set_heads": 2, "model.set_head_dim": 8, "model.set_ff_dim": 16, "data.vocab_min_count": 1,
            "data.num_workers": 0, "train.batch_size": 4, "train.max_steps": 1, "loss.warmup_epochs": 0,
            "train.val_max_images": 2}
    args = ["train", "--recipe", "demo", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and WSL in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "refused" / "last.safetensors").exists()
    run = tmp_path / "run"
    done = CliRunner().invoke(app, [*args, "--set", "model.cnn_weights=imagenet", "--out", str(run)])
    assert done.exit_code == 0, done.output
    assert 'cnn_weights = "imagenet"' in (run / "recipe.toml").read_text()
    assert load_checkpoint(run / "last.safetensors").recipe.model.cnn_weights == "imagenet"
