"""The HDF5 feature store: round trips, splits, validation messages, worker pickling, atomic and resumable writes."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import (
    FeatureStore,
    StoreWriter,
    args_fingerprint,
    open_store,
    partial_path,
    store_state,
)

D = 16


def _fixed_data(n: int = 9, r: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.random((n, r, D), dtype=np.float32) * 4
    boxes = rng.random((n, r, 4), dtype=np.float32) * 100
    sizes = rng.integers(100, 600, size=(n, 2))
    return feats, boxes, sizes


def _flat_data(n: int = 11, seed: int = 1):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=n)
    feats = [rng.standard_normal((int(c), D)).astype(np.float32) for c in counts]
    boxes = [rng.random((int(c), 4)).astype(np.float32) * 50 for c in counts]
    return feats, boxes


def _captions(n: int, per: int = 5):
    texts = [f"image {i} caption {k}" for i in range(n) for k in range(per)]
    return texts, np.repeat(np.arange(n), per)


def _write_fixed(path: Path, n: int = 9, batch: int = 4, **kw) -> tuple:
    feats, boxes, sizes = _fixed_data(n)
    texts, owners = _captions(n)
    options = dict(
        feature_kind="region", source="test:fixed", feature_dim=D, regions_per_image=feats.shape[1], n_images=n,
        with_boxes=True, with_sizes=True, metadata={"note": "unit test"}, args_fingerprint="fp-a",
    )
    options.update(kw)
    with StoreWriter(path, **options) as w:
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            w.write_images(feats[lo:hi], ids=100 + np.arange(lo, hi), boxes=boxes[lo:hi], sizes=sizes[lo:hi])
        w.set_captions(texts, owners, ids=np.arange(len(texts)) + 7)
        w.add_split("train", np.arange(0, n - 3))
        w.add_split("test", np.array([n - 1, n - 3, n - 2]))
    return feats, boxes, sizes, texts, owners


def test_fixed_round_trip(tmp_path):
    path = tmp_path / "f.h5"
    feats, boxes, sizes, texts, owners = _write_fixed(path)
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


def test_flat_round_trip_variable_regions(tmp_path):
    path = tmp_path / "flat.h5"
    feats, boxes = _flat_data()
    n = len(feats)
    texts, owners = _captions(n, per=2)
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


def test_splits_group_captions_by_image_in_split_order(tmp_path):
    path = tmp_path / "s.h5"
    feats, _, _ = _fixed_data(6)
    # Captions stored out of image order; a split must still list them grouped in its own image order.
    owners = np.array([2, 0, 1, 0, 2, 1, 3, 3, 4, 5, 4, 5])
    texts = [f"c{j}" for j in range(len(owners))]
    with StoreWriter(path, feature_kind="grid", source="t", feature_dim=D, regions_per_image=5, n_images=6) as w:
        w.write_images(feats)
        w.set_captions(texts, owners)
        w.add_split("a", [2, 0, 1])
        with pytest.raises(ValueError, match="grouped"):
            w.add_split("bad", [0, 1], caption_indices=[1, 2, 3, 5])
        with pytest.raises(ValueError, match="not in the split"):
            w.add_split("bad", [0], caption_indices=[1, 2])
        w.add_split("b", [4, 5, 3])
    with open_store(path) as s:
        images, captions = s.split("a")
        assert images.tolist() == [2, 0, 1]
        assert captions.tolist() == [0, 4, 1, 3, 2, 5]
        per = s.captions_per_image("a")
        assert per == 2
        assert [int(s.caption_image[c]) for c in captions] == [images[j // per] for j in range(len(captions))]
        assert s.split("b")[1].tolist() == [8, 10, 9, 11, 6, 7]


def test_unknown_split_lists_available(tmp_path):
    path = tmp_path / "f.h5"
    _write_fixed(path)
    with open_store(path) as s, pytest.raises(MaxMatchError) as err:
        s.split("testall")
    assert "testall" in err.value.message and "test, train" in err.value.message and str(path) in err.value.message


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("image_id\tfeatures\n"), "not an HDF5 file"),
        (lambda p: p.write_bytes(b""), "not an HDF5 file"),
    ],
    ids=["missing", "directory", "text", "empty"],
)
def test_open_errors_on_non_stores(tmp_path, make, expected):
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(MaxMatchError) as err:
        open_store(path)
    assert expected in err.value.message and str(path) in err.value.message and err.value.hint


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.h5"
    _write_fixed(good, n=20)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaxMatchError, match="truncated") as err:
        open_store(truncated)
    assert str(truncated) in err.value.message
    # Valid signature, garbage after it: corrupt.
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(data[:8] + bytes(range(256)) * 40)
    with pytest.raises(MaxMatchError, match="corrupt|truncated|not an HDF5"):
        open_store(corrupt)


def test_wrong_schema_version_and_foreign_hdf5(tmp_path):
    path = tmp_path / "f.h5"
    _write_fixed(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 7
    with pytest.raises(MaxMatchError, match="schema version 7") as err:
        open_store(path)
    assert "version 1" in err.value.message
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["features"] = np.zeros((2, 3))
    with pytest.raises(MaxMatchError, match="not a maxmatch feature store"):
        open_store(foreign)


def test_missing_group(tmp_path):
    path = tmp_path / "f.h5"
    _write_fixed(path)
    with h5py.File(path, "r+") as f:
        del f["captions"]
    with pytest.raises(MaxMatchError, match="captions/"):
        open_store(path)


def test_incomplete_flag_and_partial_files(tmp_path):
    path = tmp_path / "f.h5"
    _write_fixed(path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(MaxMatchError, match="incomplete"):
        open_store(path)
    assert open_store(path, allow_incomplete=True).n_images == 9

    # An interrupted writer leaves only a .partial; the final path does not exist and says so.
    path2 = tmp_path / "g.h5"
    feats, _, _ = _fixed_data(9)
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(path2, feature_kind="region", source="t", feature_dim=D, regions_per_image=5, n_images=9) as w:
            w.write_images(feats[:4])
            raise KeyboardInterrupt
    assert not path2.exists() and partial_path(path2).exists()
    with pytest.raises(MaxMatchError, match="not finished") as err:
        open_store(path2)
    assert "resume" in err.value.hint
    with pytest.raises(MaxMatchError, match="unfinished"):
        open_store(partial_path(path2))
    partial = open_store(partial_path(path2), allow_incomplete=True)
    assert partial.n_images == 4 and not partial.complete
    np.testing.assert_allclose(partial.image_features(3), feats[3], rtol=1e-3, atol=1e-3)
    assert store_state(path2) == "partial"


def test_finish_checks_counts_and_keeps_partial(tmp_path):
    path = tmp_path / "f.h5"
    feats, _, _ = _fixed_data(9)
    with pytest.raises(MaxMatchError, match="4 images written, 9 expected"):
        with StoreWriter(path, feature_kind="region", source="t", feature_dim=D, regions_per_image=5, n_images=9) as w:
            w.write_images(feats[:4])
    assert not path.exists() and partial_path(path).exists()


def test_bad_feature_values_and_shapes(tmp_path):
    path = tmp_path / "f.h5"
    with StoreWriter(path, feature_kind="region", source="t", feature_dim=D, regions_per_image=5) as w:
        bad = np.ones((2, 5, D), np.float32)
        bad[1, 2, 3] = np.nan
        with pytest.raises(MaxMatchError, match="image 1 .*non-finite"):
            w.write_images(bad)
        with pytest.raises(MaxMatchError, match="beyond the float16"):
            w.write_images(np.full((1, 5, D), 1e6, np.float32))
        with pytest.raises(MaxMatchError, match=r"shape \(5, 8\)"):
            w.write_images([np.ones((5, 8))])
        w.write_images(np.ones((1, 5, D), np.float16))
        with pytest.raises(MaxMatchError, match="non-finite"):
            w.write_images(np.full((1, 5, D), -np.inf, np.float16))
    assert open_store(path).n_images == 1


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "f.h5"
    _write_fixed(path)
    with pytest.raises(MaxMatchError, match="already exists"):
        _write_fixed(path)
    before = open_store(path).fingerprint()
    feats, *_ = _write_fixed(path, overwrite=True, source="test:other")
    assert open_store(path).source == "test:other" and open_store(path).fingerprint() != before
    assert store_state(path, "fp-a") == "complete"
    with pytest.raises(MaxMatchError, match="different arguments"):
        store_state(path, "fp-b")
    assert store_state(tmp_path / "nothing.h5") == "missing"


def test_fingerprint_is_stable_and_path_independent(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "sub" / "b.h5"
    _write_fixed(a)
    b.parent.mkdir()
    shutil.copy(a, b)
    assert open_store(a).fingerprint() == open_store(b).fingerprint()
    c = tmp_path / "c.h5"
    _write_fixed(c)  # same content written again
    assert open_store(c).fingerprint() == open_store(a).fingerprint()
    with h5py.File(c, "r+") as f:
        f["images/features"][4, 0, 0] = 123
    assert open_store(c).fingerprint() != open_store(a).fingerprint()


def test_args_fingerprint_ignores_order():
    assert args_fingerprint(a=1, b="x") == args_fingerprint(b="x", a=1) != args_fingerprint(a=2, b="x")


# -- resume ----------------------------------------------------------------------------------------------------


def _resumable_run(path: Path, feats, stop_after: int | None, flush_every: int = 2, fp: str = "fp"):
    """Write ``feats`` in batches of 2, resuming from whatever is on disk; raise after ``stop_after`` batches."""
    n = len(feats)
    with StoreWriter.open_or_resume(
        path, feature_kind="region", source="t", feature_dim=D, regions_per_image=feats.shape[1], n_images=n,
        args_fingerprint=fp, flush_every=flush_every,
    ) as w:
        done = 0
        for lo in range(w.n_written, n, 2):
            if stop_after is not None and done == stop_after:
                raise KeyboardInterrupt
            w.write_images(feats[lo : lo + 2], ids=np.arange(lo, min(n, lo + 2)))
            done += 1
        texts, owners = _captions(n)
        w.set_captions(texts, owners)
        w.add_split("all", np.arange(n))
    return w


def test_resumed_write_equals_uninterrupted(tmp_path):
    feats, _, _ = _fixed_data(11)
    whole = tmp_path / "whole.h5"
    _resumable_run(whole, feats, None)
    resumed = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(resumed, feats, stop_after=3)
    assert store_state(resumed) == "partial"
    w = _resumable_run(resumed, feats, None)
    assert w.resumed
    a, b = open_store(whole), open_store(resumed)
    assert a.fingerprint() == b.fingerprint()
    for i in range(11):
        np.testing.assert_array_equal(a.image_features(i), b.image_features(i))
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    # Re-running a finished extraction: store_state says so, and a writer refuses to clobber it.
    assert store_state(resumed, "fp") == "complete"


def test_resume_with_other_arguments_is_refused(tmp_path):
    feats, _, _ = _fixed_data(8)
    path = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(path, feats, stop_after=1)
    with pytest.raises(MaxMatchError, match="different arguments") as err:
        _resumable_run(path, feats, None, fp="other")
    assert "delete" in err.value.hint
    assert partial_path(path).exists()


def test_flat_resume_drops_unflushed_rows(tmp_path):
    feats, _ = _flat_data(10)
    path = tmp_path / "flat.h5"
    kw = dict(feature_kind="region", source="t", feature_dim=D, n_images=10, args_fingerprint="x", flush_every=4)
    w = StoreWriter(path, **kw)
    w.write_images(feats[:4])  # flushed (4 >= flush_every)
    w.write_images(feats[4:6])  # not flushed yet
    w.h5.attrs["n_written"] = 4  # as if the process had been killed before the next flush
    w.h5.flush()
    w.h5.close()
    with StoreWriter.open_or_resume(path, **kw) as w2:
        assert w2.n_written == 4
        w2.write_images(feats[4:])
        w2.set_captions([], [])
    s = open_store(path)
    assert s.region_counts.tolist() == [len(f) for f in feats]
    for i in range(10):
        np.testing.assert_allclose(s.image_features(i), feats[i], rtol=1e-3, atol=1e-3)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from maxmatch_cli.features.store import StoreWriter
    feats = np.load(sys.argv[2])
    w = StoreWriter(sys.argv[1], feature_kind="region", source="t", feature_dim=feats.shape[2],
                    regions_per_image=feats.shape[1], n_images=len(feats), args_fingerprint="fp", flush_every=2)
    for lo in range(0, 7, 2):
        w.write_images(feats[lo:lo + 2], ids=np.arange(lo, lo + 2))
    os._exit(3)  # killed: no close, no flush of the last batch's bookkeeping
    """
)


def test_resume_after_hard_kill(tmp_path):
    feats, _, _ = _fixed_data(11)
    np.save(tmp_path / "feats.npy", feats)
    path = tmp_path / "k.h5"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), str(tmp_path / "feats.npy")])
    assert proc.returncode == 3 and not path.exists() and partial_path(path).exists()
    with pytest.raises(MaxMatchError):
        open_store(path)
    _resumable_run(path, feats, None)  # resumes, or starts over with a warning if the kill broke the file
    whole = tmp_path / "whole.h5"
    _resumable_run(whole, feats, None)
    assert open_store(path).fingerprint() == open_store(whole).fingerprint()


# -- processes ---------------------------------------------------------------------------------------------------


def test_pickle_drops_handle_and_reopens(tmp_path):
    path = tmp_path / "f.h5"
    feats, *_ = _write_fixed(path)
    s = open_store(path)
    s.image_features(0)  # handle open in this process
    clone = pickle.loads(pickle.dumps(s))
    assert clone._file is None
    np.testing.assert_allclose(clone.image_features(8), feats[8], rtol=1e-3, atol=1e-3)
    assert clone.fingerprint() == s.fingerprint()


def _read_in_child(store: FeatureStore) -> np.ndarray:
    return store.image_features(5)


def test_read_in_spawned_process(tmp_path):
    path = tmp_path / "f.h5"
    feats, *_ = _write_fixed(path)
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


def test_dataloader_workers_read_lazily(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "f.h5"
    feats, *_ = _write_fixed(path)
    store = open_store(path)
    store.image_features(0)  # the parent holds an open handle before the fork
    loader = torch.utils.data.DataLoader(_StoreDataset(store), batch_size=2, num_workers=2)
    got, pids = [], set()
    for x, pid in loader:
        got.append(x.numpy())
        pids.update(pid.tolist())
    np.testing.assert_allclose(np.concatenate(got), feats, rtol=1e-3, atol=1e-3)
    assert len(pids) == 2


def test_read_paths_agree_float16_and_lzf(tmp_path):
    plain, packed = tmp_path / "plain.h5", tmp_path / "lzf.h5"
    feats, *_ = _write_fixed(plain)
    _write_fixed(packed, compression="lzf")
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


def test_full_disk_is_reported_and_resumable(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "f.h5"
    feats, _, _ = _fixed_data(6)
    kw = dict(feature_kind="region", source="t", feature_dim=D, regions_per_image=5, n_images=6, args_fingerprint="z")
    w = StoreWriter(path, **kw)
    w.write_images(feats[:2])
    w.flush()

    def full(n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w, "_ensure_capacity", full)
    with pytest.raises(MaxMatchError, match="disk is full") as err:
        with w:
            w.write_images(feats[2:4])
    assert "resumes" in err.value.hint and partial_path(path).exists()
    with StoreWriter.open_or_resume(path, **kw) as again:
        assert again.n_written == 2
        again.write_images(feats[2:])
    np.testing.assert_allclose(open_store(path).image_features(5), feats[5], rtol=1e-3, atol=1e-3)
