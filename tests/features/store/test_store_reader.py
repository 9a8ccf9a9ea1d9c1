"""Reading a feature store: round trips of both layouts, splits, captions, worker pickling and the read paths."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import FeatureStore, StoreWriter, open_store, partial_path

D = 16  # the sample stores' feature size (conftest.py)


def test_fixed_round_trip(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    feats, boxes, sizes, texts, owners = write_fixed(path)
    assert not partial_path(path).exists()
    with open_store(path) as s:
        assert (s.schema_version, s.feature_kind, s.source, s.feature_dim) == (1, "region", "test:fixed", D)
        assert (s.n_images, s.n_captions, s.max_regions, s.layout) == (9, 45, 5, "fixed")
        assert s.splits == ["test", "train"]
        assert s.metadata == {"note": "unit test"}
        for i in range(9):
            got = s.image_features(i)
            assert got.dtype == np.float32 and got.shape == (5, D)
            np.testing.assert_allclose(got, feats[i], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(s.image_boxes(i), boxes[i])
            assert s.n_regions(i) == 5
        np.testing.assert_array_equal(s.image_ids, 100 + np.arange(9))
        np.testing.assert_array_equal(s.image_sizes, sizes)
        assert s.captions_text() == texts
        assert s.captions_text([3, 0]) == [texts[3], texts[0]]
        np.testing.assert_array_equal(s.caption_image, owners)
        np.testing.assert_array_equal(s.caption_ids, np.arange(45) + 7)
        batch, counts = s.image_features_batch([2, 7])
        assert batch.shape == (2, 5, D) and counts.tolist() == [5, 5]
        info = s.describe()
        assert info["splits"]["test"] == {"images": 3, "captions": 15, "captions_per_image": 5}
        assert info["feature_dtype"] == "float16" and info["chunks"] == [1, 5, D] and info["complete"]
        assert info["size_bytes"] > 0
        with pytest.raises(IndexError):
            s.image_features(9)


def test_flat_round_trip_variable_regions(tmp_path, flat_data, captions):
    path = tmp_path / "flat.h5"
    feats, boxes = flat_data()
    n = len(feats)
    texts, owners = captions(n, per=2)
    with StoreWriter(
        path, feature_kind="region", source="test:flat", feature_dim=D, id_kind="str", with_boxes=True,
        flush_every=3,
    ) as w:  # n_images unknown: the file grows
        for lo in range(0, n, 3):
            w.write_images(feats[lo : lo + 3], ids=[f"COCO_{i:06d}.jpg" for i in range(lo, min(n, lo + 3))],
                           boxes=boxes[lo : lo + 3])
        w.set_captions(texts, owners)
        w.add_split("all", np.arange(n))
    with open_store(path) as s:
        assert s.layout == "flat" and s.n_images == n
        assert s.region_counts.tolist() == [len(f) for f in feats]
        assert s.max_regions == max(len(f) for f in feats)
        assert s.image_ids[4] == "COCO_000004.jpg"
        for i in range(n):
            np.testing.assert_allclose(s.image_features(i), feats[i], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(s.image_boxes(i), boxes[i])
        batch, counts = s.image_features_batch([0, 1, 2])
        assert batch.shape == (3, counts.max(), D)
        for row, i in enumerate([0, 1, 2]):
            np.testing.assert_allclose(batch[row, : counts[row]], feats[i], rtol=1e-3, atol=1e-3)
            assert not batch[row, counts[row] :].any()
        assert s.captions_per_image("all") == 2


def test_unknown_split_lists_available(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    write_fixed(path)
    with open_store(path) as s, pytest.raises(MaxMatchError) as err:
        s.split("testall")
    assert "testall" in err.value.message and "test, train" in err.value.message and str(path) in err.value.message


def test_read_paths_agree_float16_and_lzf(tmp_path, write_fixed):
    plain, packed = tmp_path / "plain.h5", tmp_path / "lzf.h5"
    feats, *_ = write_fixed(plain)
    write_fixed(packed, compression="lzf")
    a, b = open_store(plain), open_store(packed)
    a.image_features(0)
    b.image_features(0)
    assert a._direct and not b._direct  # one chunk read without HDF5 selection vs the general path
    for i in range(9):
        np.testing.assert_array_equal(a.image_features(i), b.image_features(i))
        half = a.image_features(i, dtype=np.float16)
        assert half.dtype == np.float16 and half.flags.writeable
        np.testing.assert_array_equal(half, feats[i].astype(np.float16))
        np.testing.assert_array_equal(a.image_features(i), feats[i].astype(np.float16).astype(np.float32))
    assert b.describe()["compression"] == "lzf"


# -- processes ---------------------------------------------------------------------------------------------------


def test_pickle_drops_handle_and_reopens(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    feats, *_ = write_fixed(path)
    s = open_store(path)
    s.image_features(0)  # handle open in this process
    clone = pickle.loads(pickle.dumps(s))
    assert clone._file is None
    np.testing.assert_allclose(clone.image_features(8), feats[8], rtol=1e-3, atol=1e-3)
    assert clone.fingerprint() == s.fingerprint()


def _read_in_child(store: FeatureStore) -> np.ndarray:
    return store.image_features(5)


def test_read_in_spawned_process(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    feats, *_ = write_fixed(path)
    s = open_store(path)
    s.image_features(0)
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_read_in_child, (s,))
    np.testing.assert_allclose(got, feats[5], rtol=1e-3, atol=1e-3)


class _StoreDataset:
    def __init__(self, store: FeatureStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.n_images

    def __getitem__(self, i: int):
        import os

        return self.store.image_features(i), os.getpid()


def test_dataloader_workers_read_lazily(tmp_path, write_fixed):
    torch = pytest.importorskip("torch")
    path = tmp_path / "f.h5"
    feats, *_ = write_fixed(path)
    store = open_store(path)
    store.image_features(0)  # the parent holds an open handle before the fork
    loader = torch.utils.data.DataLoader(_StoreDataset(store), batch_size=2, num_workers=2)
    got, pids = [], set()
    for x, pid in loader:
        got.append(x.numpy())
        pids.update(pid.tolist())
    np.testing.assert_allclose(np.concatenate(got), feats, rtol=1e-3, atol=1e-3)
    assert len(pids) == 2
