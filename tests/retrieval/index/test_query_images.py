"""Image files as queries: features extracted as the feature file's were, encoded, searched against captions.

A grid feature file is extracted from 12 small images (ResNet-152 with seeded random weights at 64 px), a tiny
model is trained on it for two steps, and its test captions are indexed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import maxmatch_cli
from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.extract import extract_features
from maxmatch_cli.features.images import extraction_of, features_of_files
from maxmatch_cli.features.store import open_store
from maxmatch_cli.retrieval.index import load_index

pytestmark = pytest.mark.usefixtures("reuse_random_models")
SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
COLOURS = ["red", "green", "blue", "grey"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("photos")
    root = tmp / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k, split in enumerate(SPLITS):
        pixels = rng.integers(0, 60, (40 + 4 * (k % 3), 48, 3), dtype=np.uint8)
        pixels[..., k % 3] += 150
        name = f"{k:04d}.{'png' if k % 2 else 'jpg'}"
        Image.fromarray(pixels).save(root / name)
        entries.append({"filename": name, "imgid": k, "cocoid": 100 + k, "split": split,
                        "sentences": [{"raw": f"a {COLOURS[k % 4]} square number {j}"} for j in range(5)]})
    captions = tmp / "dataset.json"
    captions.write_text(json.dumps({"images": entries}))
    store = extract_features(tmp / "grid.h5", images=root, captions=captions, kind="grid", weights="random",
                             device="cpu", batch_size=4, num_workers=0, image_size=64, progress=False)
    return root, store


def test_features_of_files_repeat_the_extraction(photos, tiny_h5):
    root, path = photos
    store = open_store(path)
    extraction = extraction_of(store)
    assert extraction["config"]["kind"] == "grid" and extraction["weights"] == "random"
    order = [3, 0, 11]
    files = [root / f"{k:04d}.{'png' if k % 2 else 'jpg'}" for k in order]
    fresh = features_of_files(files, extraction, device="cpu")
    for k, feats in zip(order, fresh):
        stored = store.image_features(k)
        assert feats.shape == stored.shape == (4, 2048)  # 64 px / 32 = 2 x 2 cells
        # Stored as float16: the fresh float32 features round to within float16's precision of them.
        np.testing.assert_allclose(feats, stored, rtol=2e-3, atol=2e-3)
    # Synthetic (or imported) features carry no extraction to repeat.
    assert extraction_of(open_store(tiny_h5)) is None


@pytest.fixture(scope="module")
def captions_index(photos, tiny_overrides, tmp_path_factory):
    _, store = photos
    run = tmp_path_factory.mktemp("run")
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={store}", *tiny_overrides,
                    "--set", "model.image_feature_dim=2048", "--set", "train.max_steps=2", "--set",
                    "eval.split=test", "--out", run)
    assert result.exit_code == 0, result.output
    out = tmp_path_factory.mktemp("idx") / "captions"
    result = invoke("index", run / "last.safetensors", "--split", "test", "--kind", "captions", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_image_file_query_equals_api_and_stored_features(photos, captions_index):
    root, path = photos
    files = [root / "0010.jpg", root / "0011.png"]
    result = invoke("query", captions_index, "--image", files[0], "--image", files[1], "-k", 4, "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [q["image"] for q in record["queries"]] == [str(f) for f in files]
    index = load_index(captions_index)
    model = maxmatch_cli.load(index.checkpoint, device="cpu")
    store = open_store(path)
    queries = model.encode_images(files, extractor=store)
    ranking = model.rank(queries, torch.from_numpy(index.sets.astype(np.float32)), k=4, query_side="image")
    for q, entry in enumerate(record["queries"]):
        assert [h["row"] for h in entry["results"]] == ranking.indices[q].tolist()
        np.testing.assert_allclose([h["score"] for h in entry["results"]], ranking.scores[q].numpy(), rtol=1e-6)
    # The same images encoded from the feature file's float16 features give (almost) the same sets.
    stored = model.encode_images(store, [10, 11])
    cos = torch.nn.functional.cosine_similarity(queries, stored, dim=-1)
    assert cos.min().item() > 0.999


def test_image_file_errors(photos, captions_index, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    result = invoke("query", captions_index, "--image", broken, "--device", "cpu")
    assert result.exit_code == 2 and f"cannot decode image {broken}" in result.output
    result = invoke("query", captions_index, "--image", tmp_path / "missing.png", "--device", "cpu")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
    model = maxmatch_cli.load(load_index(captions_index).checkpoint, device="cpu")
    with pytest.raises(MaxMatchError, match="need the extractor"):
        model.encode_images([photos[0] / "0000.jpg"])
