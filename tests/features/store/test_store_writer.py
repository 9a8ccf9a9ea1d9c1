"""Writing a feature store: splits grouped by image, the checks on finishing, bad values, overwrite, full disk."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, open_store, partial_path, store_state
from maxmatch_cli.features.store.float16 import to_float16, to_float32
from maxmatch_cli.features.store.splits import captions_of, check_grouping

D = 16  # the sample stores' feature size (conftest.py)


def test_splits_group_captions_by_image_in_split_order(tmp_path, fixed_data):
    path = tmp_path / "s.h5"
    feats, _, _ = fixed_data(6)
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


def test_split_grouping_helpers():
    owners = np.array([2, 0, 1, 0, 2, 1, 1])
    captions = captions_of(owners, np.array([1, 2]))
    assert captions.tolist() == [2, 5, 6, 0, 4]  # image 1's captions, then image 2's, each in caption order
    assert check_grouping(owners, np.array([1, 2]), captions, "s") == 0  # 3 and 2 captions: uneven
    assert check_grouping(owners, np.array([2, 0]), np.array([0, 4, 1, 3]), "s") == 2
    assert captions_of(owners, np.zeros(0, np.int64)).tolist() == []
    with pytest.raises(ValueError, match="lists an image twice"):
        check_grouping(owners, np.array([1, 1]), captions, "s")


def test_float16_encoding_refuses_what_it_cannot_hold_and_decodes_exactly():
    x = np.array([[0.5, -2.0, 65504.0]], np.float32)
    assert to_float16(x).dtype == np.float16 and to_float16(x).tolist() == x.tolist()
    assert to_float16(np.array([70000.0], np.float32)) is None
    assert to_float16(np.array([1.0, np.nan], np.float16)) is None
    assert to_float16(np.array([-np.inf], np.float16)) is None
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(to_float32(every), every.astype(np.float32))  # NaNs compare equal here


def test_finish_checks_counts_and_keeps_partial(tmp_path, fixed_data):
    path = tmp_path / "f.h5"
    feats, _, _ = fixed_data(9)
    with pytest.raises(MaxMatchError, match="4 images written, 9 expected"):
        with StoreWriter(path, feature_kind="region", source="t", feature_dim=D, regions_per_image=5, n_images=9) as w:
            w.write_images(feats[:4])
    assert not path.exists() and partial_path(path).exists()


def test_finish_checks_captions_and_splits_against_the_images(tmp_path, fixed_data):
    feats, _, _ = fixed_data(3)
    kw = dict(feature_kind="region", source="t", feature_dim=D, regions_per_image=5)
    with pytest.raises(MaxMatchError, match="a caption belongs to image 5, but only 3"):
        with StoreWriter(tmp_path / "c.h5", **kw) as w:
            w.write_images(feats)
            w.set_captions(["x"], [5])
    with pytest.raises(MaxMatchError, match="split 's' refers to image 4, beyond the 3 written"):
        with StoreWriter(tmp_path / "s.h5", **kw) as w:
            w.write_images(feats)
            w.set_captions(["x"], [0])
            w.add_split("s", [4])
    assert partial_path(tmp_path / "s.h5").exists() and not (tmp_path / "s.h5").exists()


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


def test_existing_output_needs_overwrite(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    write_fixed(path)
    with pytest.raises(MaxMatchError, match="already exists"):
        write_fixed(path)
    before = open_store(path).fingerprint()
    feats, *_ = write_fixed(path, overwrite=True, source="test:other")
    assert open_store(path).source == "test:other" and open_store(path).fingerprint() != before
    assert store_state(path, "fp-a") == "complete"
    with pytest.raises(MaxMatchError, match="different arguments"):
        store_state(path, "fp-b")
    assert store_state(tmp_path / "nothing.h5") == "missing"


def test_full_disk_is_reported_and_resumable(tmp_path, monkeypatch, fixed_data):
    path = tmp_path / "f.h5"
    feats, _, _ = fixed_data(6)
    kw = dict(feature_kind="region", source="t", feature_dim=D, regions_per_image=5, n_images=6, args_fingerprint="z")
    w = StoreWriter(path, **kw)
    w.write_images(feats[:2])
    w.flush()

    def full(n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w, "_ensure_capacity", full)
    # An ENOSPC from inside HDF5 leaves its file inconsistent (a resume would read garbage, and h5py may crash
    # closing it): the .partial is removed and the same command starts over. The writer's own space checks stop
    # it before HDF5 meets a full disk, keeping the .partial resumable (tests/faults/test_full_disk.py).
    with pytest.raises(MaxMatchError, match="not enough disk space to write") as err:
        with w:
            w.write_images(feats[2:4])
    assert "run the same command again" in err.value.hint and not partial_path(path).exists()
    with StoreWriter.open_or_resume(path, **kw) as again:
        assert again.n_written == 0
        again.write_images(feats)
    np.testing.assert_allclose(open_store(path).image_features(5), feats[5], rtol=1e-3, atol=1e-3)
