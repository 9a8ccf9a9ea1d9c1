"""Feature extraction from an image folder with torchvision models (random weights, tiny images), shards, merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features import images as images_mod
from maxmatch_cli.features.images import ExtractConfig, extract_from_images
from maxmatch_cli.features.merge import merge_shards, shard_folder, shard_path
from maxmatch_cli.features.store import open_store, partial_path

SPLITS = ["train", "train", "restval", "val", "test"]
GRID = ExtractConfig(kind="grid", backbone="resnet152", image_size=64)
REGION = ExtractConfig(kind="region", backbone="fasterrcnn_resnet50_fpn", image_size=64, num_boxes=5)




pytestmark = pytest.mark.usefixtures("reuse_random_models")


@pytest.fixture()
def folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k, split in enumerate(SPLITS):
        w, h = (64, 48) if k % 2 else (40, 56)
        name = f"COCO_val2014_{k + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "val2014" / name)
        entries.append({"filepath": "val2014", "filename": name, "imgid": k, "cocoid": k + 1, "split": split,
                        "sentences": [{"raw": f"picture {k + 1} caption {j}"} for j in range(5)]})
    captions = tmp_path / "dataset_coco.json"
    captions.write_text(json.dumps({"images": entries}))
    return root, captions


def _extract(root, captions, out, config, **kw):
    kw.setdefault("num_workers", 0)
    return extract_from_images(root, captions, out, config=config, weights="random", device="cpu", batch_size=2,
                               progress=False, **kw)


def test_grid_features_splits_and_captions(folder, tmp_path):
    root, captions = folder
    out = _extract(root, captions, tmp_path / "grid.h5", GRID, num_workers=2)  # decoding in 2 workers
    s = open_store(out)
    assert (s.feature_kind, s.source, s.layout) == ("grid", "torchvision:resnet152", "fixed")
    assert (s.n_images, s.max_regions, s.feature_dim) == (5, 4, 2048)  # 64 px -> 2 x 2 cells
    assert s.image_ids.tolist() == [1, 2, 3, 4, 5]
    assert s.image_sizes.tolist()[:2] == [[40, 56], [64, 48]]
    assert s.splits == ["dev", "test", "train"]
    images, caps = s.split("train")
    assert s.image_ids[images].tolist() == [1, 2, 3]
    assert s.captions_text(caps)[5] == "picture 2 caption 0"
    np.testing.assert_array_equal(s.caption_image[caps], np.repeat(images, 5))
    # The stored cells are the trunk's feature map of the preprocessed image.
    trunk = images_mod.build_grid_model("resnet152", "random")
    x = images_mod.ImageFiles([root / "val2014" / "COCO_val2014_000000000002.jpg"], 64, crop=True)[0][1]
    with torch.no_grad():
        expected = trunk(x[None]).flatten(2).transpose(1, 2)[0].numpy()
    np.testing.assert_allclose(s.image_features(1), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("config", [GRID, REGION], ids=["grid", "region"])
def test_stores_record_the_image_folder_and_relative_paths(folder, tmp_path, monkeypatch, config):
    from maxmatch_cli.features.store import describe_store

    root, captions = folder
    # Image 4 lies at the top of the folder, not under its Karpathy filepath: found by its bare name.
    (root / "val2014" / "COCO_val2014_000000000004.jpg").rename(root / "COCO_val2014_000000000004.jpg")
    monkeypatch.chdir(tmp_path)  # a relative --images is recorded as the absolute folder
    s = open_store(_extract("images", captions, tmp_path / "f.h5", config))
    expected = [f"val2014/COCO_val2014_{k:012d}.jpg" for k in (1, 2, 3)] + ["COCO_val2014_000000000004.jpg",
                                                                          "val2014/COCO_val2014_000000000005.jpg"]
    assert s.image_root == str(root.resolve()) and s.image_files.tolist() == expected
    assert [s.image_path(i) for i in range(5)] == [root.resolve() / name for name in expected]
    assert s.image_path(3, "/elsewhere") == Path("/elsewhere/COCO_val2014_000000000004.jpg")
    info = describe_store(s.path)
    assert info["image_root"] == str(root.resolve()) and info["feature_shape"][0] == 5


def test_region_features_fixed_and_adaptive(folder, tmp_path):
    root, captions = folder
    s = open_store(_extract(root, captions, tmp_path / "r.h5", REGION))
    assert (s.feature_kind, s.layout, s.max_regions, s.feature_dim) == ("region", "fixed", 5, 1024)
    for i in range(s.n_images):
        boxes = s.image_boxes(i)
        w, h = s.image_sizes[i]
        assert boxes.shape == (5, 4)
        assert (boxes[:, 0] >= -1e-3).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    adaptive = ExtractConfig(kind="region", backbone="fasterrcnn_resnet50_fpn", image_size=64, num_boxes=0,
                             min_boxes=2, max_boxes=6, score_threshold=0.5)
    s2 = open_store(_extract(root, captions, tmp_path / "a.h5", adaptive))
    assert s2.layout == "flat" and all(2 <= c <= 6 for c in s2.region_counts)


def test_missing_weights_name_the_file(folder, tmp_path, monkeypatch):
    root, captions = folder
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MaxMatchError, match=r"torch_home/hub/checkpoints/resnet152-394f9c45\.pth does not exist") as err:
        extract_from_images(root, captions, tmp_path / "o.h5", config=GRID, device="cpu", progress=False)
    assert "nothing is downloaded" in err.value.hint
    with pytest.raises(MaxMatchError, match=r"fasterrcnn_resnet50_fpn_coco-258fb6c6\.pth does not exist") as err:
        extract_from_images(root, captions, tmp_path / "o.h5", config=REGION, device="cpu", progress=False)
    assert "download.pytorch.org" in err.value.hint
    with pytest.raises(MaxMatchError, match=r"--weights .*nope\.pth does not exist"):
        extract_from_images(root, captions, tmp_path / "o.h5", config=GRID, weights=str(tmp_path / "nope.pth"),
                            device="cpu", progress=False)
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


def test_unreadable_image_stops_or_is_skipped(folder, tmp_path):
    root, captions = folder
    bad = root / "val2014" / "COCO_val2014_000000000003.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MaxMatchError, match=r"cannot read image .*000000000003\.jpg") as err:
        _extract(root, captions, tmp_path / "g.h5", GRID)
    assert "--skip-unreadable" in err.value.hint
    assert partial_path(tmp_path / "g.h5").exists()  # the images before it are kept for a re-run
    s = open_store(_extract(root, captions, tmp_path / "g.h5", GRID.__class__(**{**vars(GRID), "skip_unreadable": True})))
    assert s.image_ids.tolist() == [1, 2, 4, 5]
    assert s.metadata["skipped_images"] == ["3"]
    assert s.n_captions == 20 and 3 not in s.image_ids[s.caption_image].tolist()


def _interrupt_second_batch(monkeypatch):
    """Make the extraction's second batch write raise KeyboardInterrupt (a Ctrl-C); returns the real writer."""
    real = images_mod._write_batch
    calls = {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(images_mod, "_write_batch", interrupted)
    return real


def test_resume_equals_uninterrupted(folder, tmp_path, monkeypatch):
    root, captions = folder
    whole = _extract(root, captions, tmp_path / "whole.h5", GRID)
    real = _interrupt_second_batch(monkeypatch)
    out = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        _extract(root, captions, out, GRID)
    assert open_store(partial_path(out), allow_incomplete=True).n_images == 2
    monkeypatch.setattr(images_mod, "_write_batch", real)
    _extract(root, captions, out, GRID)
    assert open_store(out).fingerprint() == open_store(whole).fingerprint()
    assert open_store(out).image_files.tolist() == open_store(whole).image_files.tolist()


def test_ranks_write_shards_and_merge_equals_single_process(folder, tmp_path):
    root, captions = folder
    single = _extract(root, captions, tmp_path / "single.h5", GRID)
    out = tmp_path / "multi.h5"
    assert _extract(root, captions, out, GRID, rank=1, world_size=2) == shard_path(out, 1, 2)
    assert open_store(shard_path(out, 1, 2)).image_ids.tolist() == [2, 4]
    merged = _extract(root, captions, out, GRID, rank=0, world_size=2, merge_timeout_s=5)
    assert merged == out and not shard_folder(out).exists()
    a, b = open_store(single), open_store(merged)
    assert a.fingerprint() == b.fingerprint()
    assert (b.image_root, b.image_files.tolist()) == (str(root.resolve()), a.image_files.tolist())
    assert b.metadata["merged_from"] == ["rank-000-of-002.h5", "rank-001-of-002.h5"]


def test_merge_refuses_overlap_and_lost_images(folder, tmp_path):
    root, captions = folder
    out = tmp_path / "m.h5"
    shard = _extract(root, captions, out, GRID, rank=1, world_size=3)
    with pytest.raises(MaxMatchError, match="is in both"):
        merge_shards([shard, shard], tmp_path / "x.h5", captions=captions, remove_shards=False)
    with pytest.raises(MaxMatchError, match=r"3 image\(s\) of .* are in none of the 1 shards"):
        merge_shards([shard], tmp_path / "y.h5", captions=captions, remove_shards=False)
    with pytest.raises(MaxMatchError, match=r"gave up waiting for 1 shard\(s\) .*rank-002-of-003\.h5"):
        _extract(root, captions, out, GRID, rank=0, world_size=3, merge_timeout_s=0)


def _small_store(path, first_id, n, D=8):
    from maxmatch_cli.features.store import StoreWriter

    feats = np.random.default_rng(first_id).random((n, 3, D), dtype=np.float32)
    with StoreWriter(path, feature_kind="region", source="t", feature_dim=D, regions_per_image=3) as w:
        w.write_images(feats, ids=np.arange(first_id, first_id + n))
        w.set_captions([f"{first_id + i} {k}" for i in range(n) for k in range(2)], np.repeat(np.arange(n), 2))
        w.add_split("test", np.arange(n))
    return path, feats


def test_merge_without_captions_concatenates(tmp_path):
    a, fa = _small_store(tmp_path / "a.h5", 100, 3)
    b, fb = _small_store(tmp_path / "b.h5", 200, 2)
    s = open_store(merge_shards([a, b], tmp_path / "ab.h5", remove_shards=False))
    assert s.image_ids.tolist() == [100, 101, 102, 200, 201]
    np.testing.assert_allclose(s.image_features(3), fb[0], rtol=1e-3, atol=1e-3)
    images, caps = s.split("test")
    assert images.tolist() == [0, 1, 2, 3, 4] and s.captions_text(caps)[6] == "200 0"
    np.testing.assert_array_equal(s.caption_image[caps], np.repeat(images, 2))
    with pytest.raises(MaxMatchError, match="is in both"):
        merge_shards([a, a], tmp_path / "aa.h5", remove_shards=False)
    c, _ = _small_store(tmp_path / "c.h5", 300, 2, D=4)
    with pytest.raises(MaxMatchError, match="cannot be merged"):
        merge_shards([a, c], tmp_path / "ac.h5", remove_shards=False)


def test_a_partial_begun_without_image_paths_resumes_as_it_began(folder, tmp_path, monkeypatch):
    """A .partial from a maxmatch that recorded no image paths resumes (with a warning) instead of being refused
    as "started with different arguments": the same command finishes it, with the same features, and no paths."""
    import h5py

    root, captions = folder
    whole = _extract(root, captions, tmp_path / "whole.h5", GRID)
    real_began = images_mod._as_partial_began
    real_write = _interrupt_second_batch(monkeypatch)
    monkeypatch.setattr(images_mod, "_as_partial_began", lambda target, files, fp: None)  # the old writer
    out = tmp_path / "old.h5"
    with pytest.raises(KeyboardInterrupt):
        _extract(root, captions, out, GRID)
    with h5py.File(partial_path(out), "r") as f:
        assert "image_root" not in f.attrs and "files" not in f["images"]
    monkeypatch.setattr(images_mod, "_write_batch", real_write)
    monkeypatch.setattr(images_mod, "_as_partial_began", real_began)
    with pytest.warns(UserWarning, match="begun by an older maxmatch"):
        _extract(root, captions, out, GRID)
    resumed, reference = open_store(out), open_store(whole)
    assert resumed.image_files is None and resumed.image_root is None
    with h5py.File(out, "r") as a, h5py.File(whole, "r") as b:
        assert np.array_equal(a["images/features"][:], b["images/features"][:])
        assert a["images/ids"][:].tolist() == b["images/ids"][:].tolist()
    # A partial begun with paths resumes with them, without a warning (test_resume_equals_uninterrupted), and
    # --overwrite starts over with paths.
    _extract(root, captions, out, GRID, overwrite=True)
    assert open_store(out).image_files.tolist() == reference.image_files.tolist()


def _gallery(folder: Path, names: list[str]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_merge_of_two_image_folders_keeps_every_image_path(tmp_path):
    """Stores extracted from two folders (train2014 and val2014, say) merge under the folders' common parent, each
    image's path rebased onto it, so every merged image still names its file; a store without paths drops them
    all, with a warning."""
    train = _gallery(tmp_path / "coco" / "train2014", ["t1.jpg", "t2.jpg"])
    val = _gallery(tmp_path / "coco" / "val2014", ["v1.jpg"])
    a = _extract(train, None, tmp_path / "train.h5", GRID)
    b = _extract(val, None, tmp_path / "val.h5", GRID)
    merged = open_store(merge_shards([a, b], tmp_path / "all.h5", remove_shards=False))
    assert Path(merged.image_root) == (tmp_path / "coco").resolve()
    assert sorted(merged.image_files.tolist()) == ["train2014/t1.jpg", "train2014/t2.jpg", "val2014/v1.jpg"]
    for i in range(merged.n_images):
        path = merged.image_path(i)
        assert path.is_file() and path.name == Path(str(merged.image_ids[i])).name

    old = tmp_path / "old.h5"  # as a maxmatch before image paths wrote it
    import shutil

    import h5py

    shutil.copy(b, old)
    with h5py.File(old, "r+") as f:
        del f["images/files"]
        del f.attrs["image_root"]
    with pytest.warns(UserWarning, match="record no image paths"):
        mixed = open_store(merge_shards([a, old], tmp_path / "mixed.h5", remove_shards=False))
    assert mixed.image_files is None and mixed.n_images == 3


def test_a_partial_that_is_not_an_old_extraction_keeps_the_image_paths(folder, tmp_path):
    """Only this extraction's own .partial begun without paths resumes without them: an empty or foreign HDF5
    file at the .partial path is started over by the writer, and the finished file records every path."""
    import h5py

    root, captions = folder
    out = tmp_path / "e.h5"
    with h5py.File(partial_path(out), "w"):
        pass  # killed right after the file was created, or not ours at all
    with pytest.warns(UserWarning, match="could not be resumed") as record:
        _extract(root, captions, out, GRID)
    assert not any("older maxmatch" in str(w.message) for w in record)
    store = open_store(out)
    assert store.image_files is not None and len(store.image_files) == len(SPLITS)


def test_a_gallery_file_name_that_reads_as_leaving_the_folder_is_refused_up_front(tmp_path, monkeypatch):
    """'zz\\..\\x.jpg' is a legal Linux file name that every reader takes for a path out of the folder: the listing
    refuses it, naming it, before any model is built."""
    gallery = _gallery(tmp_path / "g", ["a.jpg", "b.jpg"])
    (gallery / "zz\\..\\x.jpg").write_bytes((gallery / "a.jpg").read_bytes())
    monkeypatch.setattr(images_mod, "build_grid_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(MaxMatchError, match=r"1 image file name\(s\) under .* leave the folder") as err:
        _extract(gallery, None, tmp_path / "g.h5", GRID)
    assert "zz\\\\..\\\\x.jpg" in str(err.value)
    assert not partial_path(tmp_path / "g.h5").exists()


def test_merge_keeps_a_shared_root_as_recorded_and_drops_roots_it_cannot_place(tmp_path):
    """Stores sharing one recorded folder keep it verbatim (relative ones too); different folders that are not
    absolute here (written on another OS, say) leave no common folder: no paths, with a warning."""
    import h5py

    train = _gallery(tmp_path / "coco" / "train2014", ["t1.jpg"])
    val = _gallery(tmp_path / "coco" / "val2014", ["v1.jpg"])
    a = _extract(train, None, tmp_path / "a.h5", GRID)
    b = _extract(val, None, tmp_path / "b.h5", GRID)

    def set_root(path, root, prefix):
        with h5py.File(path, "r+") as f:
            f.attrs["image_root"] = root
            f["images/files"][:] = [f"{prefix}{x.decode() if isinstance(x, bytes) else x}"
                                    for x in f["images/files"][:]]

    set_root(a, "rel/coco", "train2014/")
    set_root(b, "rel/coco", "val2014/")
    shared = open_store(merge_shards([a, b], tmp_path / "shared.h5", remove_shards=False))
    assert shared.image_root == "rel/coco"
    assert sorted(shared.image_files.tolist()) == ["train2014/t1.jpg", "val2014/v1.jpg"]

    set_root(a, "C:\\coco\\train2014", "")
    set_root(b, "C:\\coco\\val2014", "")
    with pytest.warns(UserWarning, match="not all absolute paths on this machine"):
        placed = open_store(merge_shards([a, b], tmp_path / "elsewhere.h5", remove_shards=False))
    assert placed.image_files is None and placed.n_images == 2
