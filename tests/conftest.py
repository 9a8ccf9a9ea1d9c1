"""Shared fixtures: a tiny synthetic feature file and a model trained on it in seconds, made once per session."""

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

# A model small enough to train in seconds on 2 CPU cores.
TINY = ["--set", "model.embed_dim=32", "--set", "model.word_dim=16", "--set", "model.set_depth=1",
        "--set", "model.set_heads=2", "--set", "model.set_head_dim=16", "--set", "model.set_ff_dim=64",
        "--set", "data.num_workers=0", "--set", "train.batch_size=4", "--set", "data.vocab_min_count=1",
        "--set", "eval.batch_size=64", "--set", "model.image_feature_dim=32", "--set", "loss.warmup_epochs=1"]


_BUILT: dict = {}


@pytest.fixture()
def reuse_random_models(monkeypatch):
    """Build each random torchvision model once per session (ResNet-152's initialisation alone takes seconds);
    models with real weights are built as asked."""
    import torch

    from maxmatch_cli.features import images as images_mod

    real_grid, real_det = images_mod.build_grid_model, images_mod.build_detector

    def grid(backbone, weights):
        if weights != "random":
            return real_grid(backbone, weights)
        if ("grid", backbone) not in _BUILT:
            torch.manual_seed(0)
            _BUILT["grid", backbone] = real_grid(backbone, weights)
        return _BUILT["grid", backbone]

    def detector(arch, weights, image_size):
        if weights != "random":
            return real_det(arch, weights, image_size)
        if ("det", arch, image_size) not in _BUILT:
            torch.manual_seed(0)
            _BUILT["det", arch, image_size] = real_det(arch, weights, image_size)
        return _BUILT["det", arch, image_size]

    monkeypatch.setattr(images_mod, "build_grid_model", grid)
    monkeypatch.setattr(images_mod, "build_detector", detector)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_overrides():
    """The --set overrides of the tiny model (a fresh list for each use)."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    result = _invoke("extract-features", "--synthetic", "tiny", "--out", path)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def trained(tiny_h5, tmp_path_factory):
    """A run folder trained for 6 steps. Tests that write next to its checkpoints should copy them first."""
    out = tmp_path_factory.mktemp("run")
    result = _invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                     "--set", "train.max_steps=6", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (with the reason) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh where one is)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pixel_h5(tmp_path_factory):
    """An image-file store of 12 small PNGs (8 train, 2 val, 2 test), 5 captions each, one colour per class."""
    import json

    import numpy as np
    from PIL import Image

    from maxmatch_cli.features.pixels import index_images

    tmp = tmp_path_factory.mktemp("pixels")
    colours = ["red", "green", "blue"]
    rng = np.random.default_rng(0)
    entries = []
    for k, split in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 2):
        pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        pixels[..., k % 3] += 150
        Image.fromarray(pixels).save(tmp / f"{k:02d}.png")
        entries.append({"filepath": "", "filename": f"{k:02d}.png", "imgid": k, "split": split,
                        "sentences": [{"raw": f"a {colours[k % 3]} square, photo {j}"} for j in range(5)]})
    (tmp / "captions.json").write_text(json.dumps({"images": entries}))
    return index_images(tmp, tmp / "captions.json", tmp / "pixels.h5", progress=False)
