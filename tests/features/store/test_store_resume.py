"""Resuming an interrupted write from its ``.partial`` file: same result, other arguments refused, kills survived."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, open_store, partial_path, store_state

D = 16  # the sample stores' feature size (conftest.py)


@pytest.fixture()
def resumable_run(captions):
    """``resumable_run(path, feats, stop_after, flush_every=2, fp="fp")``: see :func:`_resumable_run`."""

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
            texts, owners = captions(n)
            w.set_captions(texts, owners)
            w.add_split("all", np.arange(n))
        return w

    return _resumable_run


def test_resumed_write_equals_uninterrupted(tmp_path, fixed_data, resumable_run):
    feats, _, _ = fixed_data(11)
    whole = tmp_path / "whole.h5"
    resumable_run(whole, feats, None)
    resumed = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        resumable_run(resumed, feats, stop_after=3)
    assert store_state(resumed) == "partial"
    w = resumable_run(resumed, feats, None)
    assert w.resumed
    a, b = open_store(whole), open_store(resumed)
    assert a.fingerprint() == b.fingerprint()
    for i in range(11):
        np.testing.assert_array_equal(a.image_features(i), b.image_features(i))
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    # Re-running a finished extraction: store_state says so, and a writer refuses to clobber it.
    assert store_state(resumed, "fp") == "complete"


def test_resume_with_other_arguments_is_refused(tmp_path, fixed_data, resumable_run):
    feats, _, _ = fixed_data(8)
    path = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        resumable_run(path, feats, stop_after=1)
    with pytest.raises(MaxMatchError, match="different arguments") as err:
        resumable_run(path, feats, None, fp="other")
    assert "delete" in err.value.hint
    assert partial_path(path).exists()


def test_flat_resume_drops_unflushed_rows(tmp_path, flat_data):
    feats, _ = flat_data(10)
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


def test_unreadable_partial_starts_over_with_a_warning(tmp_path, fixed_data):
    feats, _, _ = fixed_data(2)
    path = tmp_path / "b.h5"
    partial_path(path).write_bytes(b"\x89HDF\r\n\x1a\n" + b"x" * 100)  # an HDF5 signature and nothing usable
    with pytest.warns(UserWarning, match="could not be resumed") as caught:
        w = StoreWriter(path, feature_kind="region", source="t", feature_dim=D, regions_per_image=5, resume=True)
    assert caught[0].filename == __file__  # the warning points at the code that made the writer
    assert not w.resumed and w.n_written == 0
    w.write_images(feats)
    w.finish()
    assert open_store(path).n_images == 2


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


def test_resume_after_hard_kill(tmp_path, fixed_data, resumable_run):
    feats, _, _ = fixed_data(11)
    np.save(tmp_path / "feats.npy", feats)
    path = tmp_path / "k.h5"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), str(tmp_path / "feats.npy")])
    assert proc.returncode == 3 and not path.exists() and partial_path(path).exists()
    with pytest.raises(MaxMatchError):
        open_store(path)
    resumable_run(path, feats, None)  # resumes, or starts over with a warning if the kill broke the file
    whole = tmp_path / "whole.h5"
    resumable_run(whole, feats, None)
    assert open_store(path).fingerprint() == open_store(whole).fingerprint()


def _files_run(path: Path, feats, stop: int | None = None, image_root: str | None = "/data/images"):
    """A flat store of features extracted from image files (``image_root`` + ``images/files``), one image per
    write, flushed every 2; interrupted before image ``stop``."""
    with StoreWriter(path, feature_kind="region", source="t", feature_dim=D, id_kind="str", flush_every=2,
                     resume=True, args_fingerprint="x", image_root=image_root) as w:
        for i in range(w.n_written, len(feats)):
            if i == stop:
                raise KeyboardInterrupt
            w.write_image(feats[i], id=f"im{i}", file=None if image_root is None else f"sub/im{i}.jpg")
        w.set_captions([], [])


def test_image_files_of_extracted_features_survive_a_resume(tmp_path, flat_data):
    from maxmatch_cli.features.store.fingerprint import content_hash, dataset_digests

    feats, _ = flat_data(7)
    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    _files_run(whole, feats)
    with pytest.raises(KeyboardInterrupt):
        _files_run(resumed, feats, stop=5)  # 4 images flushed, the 5th cut away on resume
    _files_run(resumed, feats)
    a, b = open_store(whole), open_store(resumed)
    assert a.image_root == b.image_root == "/data/images"
    assert a.image_files.tolist() == b.image_files.tolist() == [f"sub/im{i}.jpg" for i in range(7)]
    assert a.image_path(6) == Path("/data/images/sub/im6.jpg")
    with h5py.File(resumed, "r") as f:  # the writer's recorded hash covers the file list, as read back
        assert str(f.attrs["content_sha256"]) == content_hash(dataset_digests(f))
    assert a.fingerprint() == b.fingerprint()


def test_resume_refuses_a_partial_without_image_files(tmp_path, flat_data):
    feats, _ = flat_data(5)
    path = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        _files_run(path, feats, stop=3, image_root=None)  # as an older maxmatch started it: no files
    with pytest.raises(MaxMatchError, match="image_root: None there, '/data/images' now"):
        _files_run(path, feats)
    with pytest.raises(ValueError, match="files= exactly when"):
        with StoreWriter(tmp_path / "x.h5", feature_kind="grid", source="t", feature_dim=D, regions_per_image=2,
                         image_root="/data") as w:
            w.write_images(np.zeros((1, 2, D)))


@pytest.mark.parametrize("name", ["a\\..\\b.png", "../b.png", "/abs/b.png", "sub/../../b.png"])
def test_writer_refuses_image_paths_the_reader_would_refuse(tmp_path, flat_data, name):
    """A name that reads as leaving the folder (a legal Linux file name such as 'a\\..\\b.png' included) is
    refused when written, naming it, instead of a file every later open refuses."""
    feats, _ = flat_data(2)
    with pytest.raises(MaxMatchError, match="would leave the image folder") as err:
        with StoreWriter(tmp_path / "g.h5", feature_kind="grid", source="t", feature_dim=D, id_kind="str",
                         image_root="/data/images") as w:
            w.write_image(feats[0], id="ok", file="ok.jpg")
            w.write_image(feats[1], id="bad", file=name)
    assert repr(name) in str(err.value)
    with pytest.raises(MaxMatchError, match="would leave the image folder"):
        with StoreWriter(tmp_path / "p.h5", feature_kind="pixels", source="t", feature_dim=3, id_kind="str",
                         image_root="/data/images") as w:
            w.write_files([name], ids=["bad"])
