"""What a file must hold to open: the checks of the schema and their messages (path, what is wrong, the fix)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, open_store, partial_path, store_state

D = 16  # the sample stores' feature size (conftest.py)


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


def test_truncated_and_corrupt_files(tmp_path, write_fixed):
    good = tmp_path / "good.h5"
    write_fixed(good, n=20)
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


def test_wrong_schema_version_and_foreign_hdf5(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    write_fixed(path)
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


def test_missing_group(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    write_fixed(path)
    with h5py.File(path, "r+") as f:
        del f["captions"]
    with pytest.raises(MaxMatchError, match="captions/"):
        open_store(path)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda f: f.attrs.__setitem__("layout", "files"), "layout='files'; expected one of"),
        (lambda f: f.__delitem__("images/ids"), "not a complete maxmatch feature store"),
        (lambda f: f["captions/image"].__setitem__(0, 99), "captions/image points outside the image range"),
        (lambda f: f["splits/train/images"].__setitem__(0, 99), "split 'train' holds indices outside"),
    ],
    ids=["kind-layout", "no-ids", "caption-owner", "split-index"],
)
def test_inconsistent_fixed_stores(tmp_path, write_fixed, edit, expected):
    path = tmp_path / "f.h5"
    write_fixed(path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(MaxMatchError, match=expected) as err:
        open_store(path)
    assert str(path) in err.value.message and "re-create" in err.value.hint


def test_inconsistent_flat_offsets(tmp_path, flat_data):
    path = tmp_path / "flat.h5"
    feats, _ = flat_data(4)
    with StoreWriter(path, feature_kind="region", source="t", feature_dim=D) as w:
        w.write_images(feats)
    rows = sum(len(x) for x in feats)
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r+") as f:
        f["images/offsets"][1] = rows + 5
    with pytest.raises(MaxMatchError, match="not a non-decreasing list"):
        open_store(bad)
    with h5py.File(bad, "r+") as f:
        f["images/offsets"][1] = len(feats[0])
        f["images/offsets"][4] = rows - 1
    with pytest.raises(MaxMatchError, match=f"ends at {rows - 1} but there are {rows} rows"):
        open_store(bad)


def test_incomplete_flag_and_partial_files(tmp_path, write_fixed, fixed_data):
    path = tmp_path / "f.h5"
    write_fixed(path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(MaxMatchError, match="incomplete"):
        open_store(path)
    assert open_store(path, allow_incomplete=True).n_images == 9

    # An interrupted writer leaves only a .partial; the final path does not exist and says so.
    path2 = tmp_path / "g.h5"
    feats, _, _ = fixed_data(9)
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
