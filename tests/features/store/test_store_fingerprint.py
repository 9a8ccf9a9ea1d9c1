"""Identities of a store's contents (provenance) and of the arguments that made it (resume checks)."""

from __future__ import annotations

import shutil

import h5py
import pytest

from maxmatch_cli.features.store import args_fingerprint, describe_store, open_store, partial_path


def test_fingerprint_is_stable_and_path_independent(tmp_path, write_fixed):
    a, b = tmp_path / "a.h5", tmp_path / "sub" / "b.h5"
    write_fixed(a)
    b.parent.mkdir()
    shutil.copy(a, b)  # a copy without its modification time: the recorded hash is not trusted, the file is hashed
    with pytest.warns(UserWarning, match="no valid recorded content hash"):
        assert open_store(a).fingerprint() == open_store(b).fingerprint()
    c = tmp_path / "c.h5"
    write_fixed(c)  # same content written again
    assert open_store(c).fingerprint() == open_store(a).fingerprint()
    with h5py.File(c, "r+") as f:
        f["images/features"][4, 0, 0] = 123
    with pytest.warns(UserWarning, match="no valid recorded content hash"):
        assert open_store(c).fingerprint() != open_store(a).fingerprint()


def test_args_fingerprint_ignores_order():
    assert args_fingerprint(a=1, b="x") == args_fingerprint(b="x", a=1) != args_fingerprint(a=2, b="x")


def test_describe_store_reads_a_partial_file_when_the_store_is_unfinished(tmp_path, write_fixed):
    path = tmp_path / "f.h5"
    write_fixed(path)
    finished = describe_store(path)
    assert finished["complete"] and finished["fingerprint"] == open_store(path).fingerprint()
    path.rename(partial_path(path))
    with h5py.File(partial_path(path), "r+") as f:
        f.attrs["complete"] = False
        f.attrs["n_written"] = 4
    unfinished = describe_store(path)
    assert unfinished["path"] == str(partial_path(path)) and not unfinished["complete"]
    assert unfinished["images_written"] == 4 and unfinished["n_images"] == 4
