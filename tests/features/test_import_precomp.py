"""SCAN precomp import: splits, the x5 row repetition, ids, dedup across splits, bad input, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features import precomp
from maxmatch_cli.features.precomp import NpyRows, import_precomp
from maxmatch_cli.features.store import open_store, partial_path

R, D = 4, 8


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, R, D), dtype=np.float32)


def _write_split(folder: Path, name: str, feats: np.ndarray, ids=None, repeat: bool = False, ids_per_caption=False):
    arr = np.repeat(feats, 5, axis=0) if repeat else feats
    np.save(folder / f"{name}_ims.npy", arr)
    caps = [f"{name} image {i} caption {k}" for i in range(len(feats)) for k in range(5)]
    (folder / f"{name}_caps.txt").write_text("\n".join(caps) + "\n")
    if ids is not None:
        lines = np.repeat(ids, 5) if ids_per_caption else ids
        (folder / f"{name}_ids.txt").write_text("\n".join(str(x) for x in lines) + "\n")
    return caps


@pytest.fixture()
def coco(tmp_path):
    folder = tmp_path / "coco_precomp"
    folder.mkdir()
    train, dev, testall = _images(7, 0), _images(4, 1), _images(6, 2)
    data = {
        "train": (train, _write_split(folder, "train", train, ids=np.arange(100, 107))),
        # dev comes with each image repeated five times and ids per caption, as some releases do
        "dev": (dev, _write_split(folder, "dev", dev, ids=np.arange(200, 204), repeat=True, ids_per_caption=True)),
        "testall": (testall, _write_split(folder, "testall", testall, ids=np.arange(300, 306))),
        # test: the first 3 images of testall, same COCO ids, stored once
        "test": (testall[:3], _write_split(folder, "test", testall[:3], ids=np.arange(300, 303))),
    }
    return folder, data


def test_coco_import_round_trip(coco, tmp_path):
    folder, data = coco
    out = import_precomp(folder, tmp_path / "coco.h5", dataset="coco", progress=False, batch_images=3)
    s = open_store(out)
    assert s.splits == ["dev", "test", "testall", "train"]
    assert s.source == "scan-precomp:coco" and s.feature_kind == "region"
    assert s.n_images == 7 + 4 + 6  # test's images are testall's, stored once
    for name, (feats, caps) in data.items():
        images, captions = s.split(name)
        assert len(images) == len(feats) and s.captions_per_image(name) == 5
        for j, i in enumerate(images):
            np.testing.assert_allclose(s.image_features(i), feats[j], rtol=1e-3, atol=1e-3)
        assert s.captions_text(captions) == caps
        np.testing.assert_array_equal(s.caption_image[captions], np.repeat(images, 5))
    np.testing.assert_array_equal(s.split("test")[0], s.split("testall")[0][:3])
    assert s.image_ids[s.split("dev")[0]].tolist() == [200, 201, 202, 203]
    assert s.metadata["duplicated_rows"] == ["dev"]


def test_f30k_without_ids_and_selected_splits(tmp_path):
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    train, test = _images(5, 3), _images(2, 4)
    _write_split(folder, "train", train)
    _write_split(folder, "test", test, repeat=True)
    out = import_precomp(folder, tmp_path / "f.h5", dataset="f30k", splits=["test"], progress=False)
    s = open_store(out)
    assert s.splits == ["test"] and s.n_images == 2
    np.testing.assert_allclose(s.image_features(1), test[1], rtol=1e-3, atol=1e-3)
    assert s.image_ids.tolist() == [0, 1]


def test_resume_after_interrupt_and_rerun_is_noop(coco, tmp_path, monkeypatch):
    folder, _ = coco
    whole = import_precomp(folder, tmp_path / "whole.h5", progress=False, batch_images=2)
    out = tmp_path / "resumed.h5"
    real_read = NpyRows.read

    def flaky(self, rows):  # Ctrl-C while copying testall, after train and dev are written
        if self.path.name == "testall_ims.npy":
            raise KeyboardInterrupt
        return real_read(self, rows)

    monkeypatch.setattr(NpyRows, "read", flaky)
    with pytest.raises(KeyboardInterrupt):
        import_precomp(folder, out, progress=False, batch_images=2)
    assert partial_path(out).exists() and not out.exists()
    monkeypatch.setattr(NpyRows, "read", real_read)
    import_precomp(folder, out, progress=False, batch_images=2)
    assert open_store(out).fingerprint() == open_store(whole).fingerprint()
    mtime = out.stat().st_mtime_ns
    import_precomp(folder, out, progress=False, batch_images=2)  # finished: nothing to do
    assert out.stat().st_mtime_ns == mtime


def test_truncated_npy(coco, tmp_path):
    folder, _ = coco
    path = folder / "train_ims.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(MaxMatchError, match="truncated") as err:
        import_precomp(folder, tmp_path / "o.h5", progress=False)
    assert "train_ims.npy" in err.value.message and "6 complete rows" in err.value.message
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


def test_wrong_shape_and_not_npy(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    np.save(folder / "train_ims.npy", np.zeros((10, D), np.float32))
    (folder / "train_caps.txt").write_text("a\n" * 50)
    with pytest.raises(MaxMatchError, match=r"shape \(10, 8\)"):
        import_precomp(folder, tmp_path / "o.h5", progress=False)
    (folder / "train_ims.npy").write_text("not numpy")
    with pytest.raises(MaxMatchError, match="not a readable .npy"):
        import_precomp(folder, tmp_path / "o.h5", progress=False)


def test_captions_not_five_per_image(coco, tmp_path):
    folder, _ = coco
    caps = (folder / "train_caps.txt").read_text().splitlines()
    (folder / "train_caps.txt").write_text("\n".join(caps[:-2]) + "\n")
    with pytest.raises(MaxMatchError, match="33 captions for 7 image rows") as err:
        import_precomp(folder, tmp_path / "o.h5", progress=False)
    assert "train_caps.txt" in err.value.message


def test_rows_equal_captions_but_not_repeated(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    np.save(folder / "dev_ims.npy", _images(10, 0))
    (folder / "dev_caps.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    with pytest.raises(MaxMatchError, match="not copies of one image"):
        import_precomp(folder, tmp_path / "o.h5", dataset="f30k", progress=False)


def test_ids_that_do_not_line_up(coco, tmp_path):
    folder, _ = coco
    (folder / "train_ids.txt").write_text("\n".join(str(x) for x in range(9)) + "\n")
    with pytest.raises(MaxMatchError, match="9 ids for 7 images"):
        import_precomp(folder, tmp_path / "o.h5", progress=False)
    ids = np.repeat(np.arange(7), 5)
    ids[12] = 99
    (folder / "train_ids.txt").write_text("\n".join(str(x) for x in ids) + "\n")
    with pytest.raises(MaxMatchError, match="lines 11-15 should repeat one image id"):
        import_precomp(folder, tmp_path / "o.h5", progress=False)


def test_missing_inputs(tmp_path):
    with pytest.raises(MaxMatchError, match="does not exist"):
        import_precomp(tmp_path / "nope", tmp_path / "o.h5", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaxMatchError, match="holds no precomp split"):
        import_precomp(tmp_path / "empty", tmp_path / "o.h5", progress=False)
    folder = tmp_path / "p"
    folder.mkdir()
    np.save(folder / "train_ims.npy", _images(2, 0))
    with pytest.raises(MaxMatchError, match="train_caps.txt is missing"):
        import_precomp(folder, tmp_path / "o.h5", progress=False)
    with pytest.raises(MaxMatchError, match="unknown dataset"):
        import_precomp(folder, tmp_path / "o.h5", dataset="vg", progress=False)


def test_npy_rows_reads_runs_and_scattered_rows(tmp_path):
    arr = _images(20, 9)
    np.save(tmp_path / "a.npy", arr)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (20, R, D) and len(rows) == 20
    idx = [3, 4, 5, 10, 0, 19]
    np.testing.assert_array_equal(rows.read(idx), arr[idx])
    assert precomp.DATASET_SPLITS["coco"][-1] == "testall"
