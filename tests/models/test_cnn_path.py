"""Raw images for an end-to-end CNN: image-file stores, decoding and transforms, the frozen-then-trained trunk,
and train -> evaluate from the command line (ResNet-18 with random weights at 32 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.data.datasets import ImageDataset, PairDataset
from maxmatch_cli.data.images import RawImages, build_image_source, check_image_input, decode_image_file
from maxmatch_cli.data.tokenizers import build_tokenizer
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.pixels import index_images
from maxmatch_cli.features.store import open_store
from maxmatch_cli.config.recipes import load_recipe

runner = CliRunner()
SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
COLOURS = ["red", "green", "blue", "grey"]
SIZE = 32
# The demo recipe shrunk to seconds: ResNet-18 (random weights) at 32 px, tiny set heads, 5 steps per epoch.
CNN = {"model.image_encoder": "cnn", "model.cnn_backbone": "resnet18", "model.cnn_weights": "random",
       "model.cnn_freeze_epochs": "1", "data.image_size": str(SIZE), "model.embed_dim": "32", "model.word_dim": "16",
       "model.set_depth": "1", "model.set_heads": "2", "model.set_head_dim": "16", "model.set_ff_dim": "64",
       "data.vocab_min_count": "1", "train.batch_size": "4", "train.epochs": "2", "loss.warmup_epochs": "1",
       "eval.batch_size": "8", "eval.split": "test"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def overrides(**extra) -> list[str]:
    pairs = {**CNN, **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return [x for key, value in pairs.items() for x in ("--set", f"{key}={value}")]


@pytest.fixture()
def folder(tmp_path):
    """12 small images (JPEG and PNG, 40x40 and 48x36, one per colour class) in a sub-folder, and their json."""
    from PIL import Image

    root = tmp_path / "images"
    (root / "set").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k, split in enumerate(SPLITS):
        h, w = (40, 40) if k % 3 else (36, 48)
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        pixels[..., k % 3] += 150
        name = f"{k:04d}.{'png' if k % 2 else 'jpg'}"
        Image.fromarray(pixels).save(root / "set" / name)
        entries.append({"filepath": "set", "filename": name, "imgid": k, "split": split,
                        "sentences": [{"raw": f"a {COLOURS[k % 4]} square, photo {j}"} for j in range(5)]})
    captions = tmp_path / "dataset_test.json"
    captions.write_text(json.dumps({"images": entries}))
    return root, captions


@pytest.fixture()
def pixel_store(folder, tmp_path):
    root, captions = folder
    return index_images(root, captions, tmp_path / "pixels.h5", progress=False)


# --------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------


def test_index_images_from_the_command_line(folder, tmp_path):
    root, captions = folder
    out = tmp_path / "px.h5"
    result = invoke("extract-features", "--images", root, "--captions", captions, "--kind", "pixels", "--out", out)
    assert result.exit_code == 0, result.output
    assert "pixels" in result.output and "image_root" in result.output
    s = open_store(out)
    assert (s.feature_kind, s.layout, s.feature_dim, s.source) == ("pixels", "files", 3, "image-folder")
    assert s.image_root == str(root.resolve()) and s.n_images == 12 and s.n_captions == 60
    assert s.image_files[0] == "set/0000.jpg" and s.image_path(1) == root.resolve() / "set" / "0001.png"
    assert s.image_sizes.tolist()[:2] == [[48, 36], [40, 40]]
    assert [len(s.split(name)[0]) for name in ("train", "dev", "test")] == [8, 2, 2]
    assert s.captions_per_image("test") == 5 and s.max_regions == 0
    with pytest.raises(MaxMatchError, match="holds no features"):
        s.image_features(0)
    assert len(s.fingerprint()) == 16
    # A finished index is not redone; feature options are refused (the recipe chooses the CNN).
    again = invoke("extract-features", "--images", root, "--captions", captions, "--kind", "pixels", "--out", out)
    assert again.exit_code == 0 and "nothing to do" in again.output
    bad = invoke("extract-features", "--images", root, "--captions", captions, "--kind", "pixels",
                 "--backbone", "resnet152", "--out", tmp_path / "other.h5")
    assert bad.exit_code == 2 and "--backbone" in bad.output


def test_missing_or_broken_files_when_indexing(folder, tmp_path):
    root, captions = folder
    (root / "set" / "0003.png").unlink()
    (root / "set" / "0004.jpg").write_bytes(b"not an image")
    with pytest.raises(MaxMatchError, match="2 of 12 images cannot be read") as info:
        index_images(root, captions, tmp_path / "px.h5", progress=False)
    assert "0003.png (file not found)" in info.value.message and "0004.jpg" in info.value.message
    out = index_images(root, captions, tmp_path / "px.h5", skip_unreadable=True, progress=False)
    s = open_store(out)
    assert s.n_images == 10 and s.n_captions == 50 and s.metadata["skipped_images"] == ["3", "4"]
    assert "set/0003.png" not in list(s.image_files)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def test_raw_images_transforms_and_batches(pixel_store):
    store = open_store(pixel_store)
    recipe = load_recipe("demo", {k: v for k, v in CNN.items()})
    train_src, eval_src = build_image_source(store, recipe, train=True), build_image_source(store, recipe, False)
    assert isinstance(train_src, RawImages) and eval_src.image_size == SIZE
    x = eval_src.load(0)
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(x, eval_src.load(0))  # evaluation: resize + centre crop, deterministic
    # Image 0 is red-dominant: after ImageNet normalisation the red channel is the largest.
    assert x[0].mean() > x[1].mean() and x[0].mean() > x[2].mean()
    torch.manual_seed(0)
    crops = torch.stack([train_src.load(0) for _ in range(4)])
    assert crops.shape == (4, 3, SIZE, SIZE) and not torch.equal(crops[0], crops[1])  # random crops / flips

    tokenizer = build_tokenizer("bigru", captions=store.captions_text(), min_count=1)
    pairs = PairDataset(store, "train", tokenizer, train=True, word_dropout=0.2, image_source=train_src)
    batch = pairs.collate([pairs[i] for i in range(5)])
    assert batch.feats.shape == (5, 3, SIZE, SIZE) and batch.feat_mask is None
    assert batch.image_index.tolist() == [0] * 5 and batch.to(torch.device("cpu")).feat_mask is None
    images = ImageDataset(store, store.split("test")[0], eval_src)
    feats, mask = images.collate([images[i] for i in range(len(images))])
    assert feats.shape == (2, 3, SIZE, SIZE) and mask is None


def test_decoding_any_format_to_rgb(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")  # not a torchvision format: PIL decodes it
    assert torch.equal(decode_image_file(tmp_path / "a.bmp"), torch.from_numpy(rgb).permute(2, 0, 1))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    grey = decode_image_file(tmp_path / "grey.png")
    assert grey.shape == (3, 6, 5) and torch.equal(grey[0], grey[2])


def test_store_and_image_encoder_must_match(pixel_store, tmp_path):
    store = open_store(pixel_store)
    with pytest.raises(MaxMatchError, match="indexes image files"):
        check_image_input(store, "region")
    check_image_input(store, "cnn")
    tiny = tmp_path / "tiny.h5"
    assert invoke("extract-features", "--synthetic", "tiny", "--out", tiny).exit_code == 0
    with pytest.raises(MaxMatchError, match="trains on raw images") as info:
        check_image_input(open_store(tiny), "cnn")
    assert "--kind pixels" in info.value.hint
    # The training command says so before building anything.
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={pixel_store}", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "indexes image files" in result.output
    recipe = load_recipe("demo", {**CNN, "data.image_root": str(tmp_path / "elsewhere")})
    with pytest.raises(MaxMatchError, match="elsewhere.*does not exist"):
        build_image_source(store, recipe, train=True)


def test_unreadable_image_names_the_file_through_a_worker(pixel_store, folder):
    root, _ = folder
    (root / "set" / "0002.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "set" / "0005.png").unlink()
    store = open_store(pixel_store)
    source = build_image_source(store, load_recipe("demo", CNN), train=False)
    with pytest.raises(MaxMatchError, match=r"cannot decode image .*0002\.jpg"):
        source.load(2)
    images = ImageDataset(store, np.array([5]), source)
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=1, collate_fn=images.collate)
    message = hint = None
    try:
        next(iter(loader))
    except MaxMatchError as exc:
        message, hint = exc.message, exc.hint
        # torch's re-raise puts the iterator in a reference cycle through this traceback; left to the cyclic
        # garbage collector, its shutdown then waits 5 s for the worker.
        exc.__traceback__ = None
    # Message and hint arrive as raised in the worker, not as torch's wrapped traceback text.
    assert message is not None and message.startswith("cannot read image ")
    assert message.endswith("0005.png: No such file or directory") and "Traceback" not in message
    assert hint is not None and "data.image_root" in hint


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def test_trunk_gets_no_gradient_while_frozen_then_does(pixel_store):
    from maxmatch_cli.models import build_model
    from maxmatch_cli.training.trainer import loss_on_batch

    store = open_store(pixel_store)
    recipe = load_recipe("demo", CNN)
    tokenizer = build_tokenizer("bigru", captions=store.captions_text(), min_count=1)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer.words)
    pairs = PairDataset(store, "train", tokenizer, train=True,
                        image_source=build_image_source(store, recipe, train=True))
    batch = pairs.collate([pairs[i] for i in range(0, 40, 5)])  # one caption of each training image
    trunk = model.image_encoder.backbone
    running_mean = trunk[1].running_mean.clone()
    for epoch, frozen in ((0, True), (1, False)):
        model.set_epoch(epoch)
        model.train()
        model.zero_grad(set_to_none=True)
        loss, _ = loss_on_batch(model, batch, recipe, hardest=False)
        loss.backward()
        trunk_grads = [p.grad for p in trunk.parameters()]
        assert all(g is None for g in trunk_grads) == frozen
        assert model.image_encoder.project.fc.weight.grad.abs().sum() > 0  # the projection always learns
        if frozen:  # a frozen trunk also keeps its BatchNorm statistics
            assert torch.equal(trunk[1].running_mean, running_mean)
        else:
            assert sum(float(g.abs().sum()) for g in trunk_grads) > 0


def _trunk(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith("model.image_encoder.backbone.")
                or k.startswith("image_encoder.backbone.")}


@pytest.mark.slow
def test_train_frozen_epoch_then_fine_tune_then_evaluate(pixel_store, tmp_path):
    base = ["train", "--recipe", "demo", "--set", f"data.path={pixel_store}", "--set", "data.num_workers=1"]
    one_step, first_epoch = tmp_path / "one", tmp_path / "run"
    result = invoke(*base, *overrides(train__max_steps=1), "--out", one_step)
    assert result.exit_code == 0, result.output
    result = invoke(*base, *overrides(train__max_steps=2), "--out", first_epoch)  # 8 images / 4 = 1 epoch
    assert result.exit_code == 0, result.output
    after_one, after_epoch = _trunk(one_step / "last.safetensors"), _trunk(first_epoch / "last.safetensors")
    assert after_one and all(torch.equal(after_one[k], after_epoch[k]) for k in after_one)  # frozen: as built
    result = invoke(*base, *overrides(train__max_steps=4), "--out", first_epoch, "--resume")
    assert result.exit_code == 0, result.output
    tuned = _trunk(first_epoch / "last.safetensors")
    assert any(not torch.equal(after_epoch[k], tuned[k]) for k in tuned)  # unfrozen in epoch 2: it trains

    out = tmp_path / "metrics.json"
    result = invoke("evaluate", first_epoch / "last.safetensors", "--split", "test", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["protocol"] == "full" and 0 <= report["metrics"]["rsum"] <= 600


def test_image_files_encode_as_the_store_images(pixel_store, folder, tmp_path):
    """An end-to-end CNN checkpoint encodes image files itself (no extractor): the same decode and evaluation
    transform as its image-file store, so the same sets."""
    import maxmatch_cli

    run = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={pixel_store}", "--set", "data.num_workers=0",
                    *overrides(train__max_steps=1), "--out", run)
    assert result.exit_code == 0, result.output
    model = maxmatch_cli.load(run / "last.safetensors", device="cpu")
    store = open_store(pixel_store)
    root, _ = folder
    picked = [10, 3]
    files = [root / store.image_files[k] for k in picked]
    torch.testing.assert_close(model.encode_images(files), model.encode_images(store, picked))
    torch.testing.assert_close(model.encode_images(str(files[0])), model.encode_images(store, picked[:1]))
