"""Bad content, never silently used: a feature file rewritten in place is not served stale cached embeddings
(issue 18, item 5); features with images of no regions and indexes whose sets are NaN are refused (item 11)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation import cache
from maxmatch_cli.evaluation.cache import checkpoint_embeddings, embeddings_cache_path
from maxmatch_cli.features.store import StoreWriter, open_store, partial_path
from maxmatch_cli.features.store.fingerprint import SIDECAR_SUFFIX
from maxmatch_cli.models.checkpoint import load_checkpoint
from maxmatch_cli.retrieval.index import load_index

CPU = torch.device("cpu")


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _independent_content_hash(path) -> str:
    """The content hash as defined (every dataset's dtype, shape and bytes), computed here from whole reads."""
    table = {}
    with h5py.File(path, "r") as f:
        names = []
        f.visit(names.append)
        for name in names:
            ds = f[name]
            if not isinstance(ds, h5py.Dataset):
                continue
            values = ds[()]
            if h5py.check_string_dtype(ds.dtype):
                raw = b"".join(len(v).to_bytes(8, "little") + v for v in np.atleast_1d(values).ravel())
            else:
                raw = np.ascontiguousarray(values).tobytes()
            table[name] = [str(ds.dtype), list(ds.shape), hashlib.sha256(raw).hexdigest()]
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def _recorded(path) -> str:
    with h5py.File(path, "r") as f:
        return str(f.attrs["content_sha256"])


def _copy_keeping_times(src, dst):
    shutil.copy2(src, dst)  # like cp -p / rsync -t: the recorded content hash stays valid
    return dst


# ----------------------------------------------------------------------------------------------- item 5


def test_recorded_hash_equals_an_independent_hash_of_the_datasets(tiny_h5, tmp_path):
    assert _recorded(tiny_h5) == _independent_content_hash(tiny_h5)  # synthetic: fixed layout, boxes, sizes
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 5, 2, 4, 6)]

    def flat(path, stop=None):
        with StoreWriter(path, feature_kind="region", source="test", feature_dim=8, id_kind="str",
                         with_boxes=True, flush_every=2, resume=True, args_fingerprint="x") as w:
            for i in range(w.n_written, len(feats)):
                if i == stop:
                    raise KeyboardInterrupt
                w.write_image(feats[i], id=f"im{i}", boxes=np.ones((len(feats[i]), 4)))
            w.set_captions([f"caption {i} é" for i in range(6)], list(range(6)))
            w.add_split("test", [0, 1, 2, 3, 4, 5])

    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    flat(whole)
    with pytest.raises(KeyboardInterrupt):
        flat(resumed, stop=5)  # 4 images flushed, the 5th cut away on resume
    assert partial_path(resumed).exists()
    flat(resumed)
    assert _recorded(whole) == _independent_content_hash(whole) == _recorded(resumed)
    assert open_store(whole).fingerprint() == open_store(resumed).fingerprint()


def test_in_place_rewrite_is_not_served_from_the_cache(trained, tiny_h5, tmp_path, monkeypatch):
    data = _copy_keeping_times(tiny_h5, tmp_path / "tiny.h5")
    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "a.safetensors")
    loaded = load_checkpoint(ckpt)
    encoded = []
    real = cache.load_for_eval
    monkeypatch.setattr(cache, "load_for_eval", lambda *a, **k: encoded.append(1) or real(*a, **k))

    def embeddings(**kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no full hash of the file while it is as written
            return checkpoint_embeddings(loaded, open_store(data), "test", CPU, show_progress=False, **kwargs)

    first = embeddings()
    old_cache = embeddings_cache_path(loaded, open_store(data), "test")
    assert len(encoded) == 1 and old_cache.is_file()
    again = embeddings()  # unchanged file: the cache is reused
    assert len(encoded) == 1 and torch.equal(again.images, first.images)

    test_images, _ = open_store(data).split("test")
    with h5py.File(data, "r+") as f:  # rewrite ONE image's features in place
        f["images/features"][test_images[0]] = f["images/features"][test_images[1]]
    with pytest.warns(UserWarning, match="modified after it was written"):
        store = open_store(data)
        store.fingerprint()
    assert (tmp_path / ("tiny.h5" + SIDECAR_SUFFIX)).is_file()  # hashed once, remembered beside it
    after = embeddings()
    assert len(encoded) == 2  # not the stale cache
    fresh = embeddings(cache=False)
    assert torch.equal(after.images, fresh.images) and torch.equal(after.captions, fresh.captions)
    assert not torch.equal(after.images[0], first.images[0]) and torch.equal(after.images[1:], first.images[1:])
    embeddings()  # the remembered hash: no warning, and the new cache is reused
    assert len(encoded) == 3

    # The CLI: the rewritten file's results equal --no-cache, the unchanged cache is not rewritten.
    shutil.rmtree(tmp_path / "embeddings")
    args = [ckpt, "--data", data, "--split", "test", "--device", "cpu"]
    assert _run("evaluate", *args, "--json", tmp_path / "c.json").exit_code == 0
    new_cache = embeddings_cache_path(loaded, open_store(data), "test")
    stamp = new_cache.stat().st_mtime_ns
    assert new_cache != old_cache and _run("evaluate", *args, "--json", tmp_path / "c2.json").exit_code == 0
    assert new_cache.stat().st_mtime_ns == stamp
    assert _run("evaluate", *args, "--no-cache", "--json", tmp_path / "n.json").exit_code == 0
    results = [json.loads((tmp_path / n).read_text()) for n in ("c.json", "c2.json", "n.json")]
    metrics = [{k: v for k, v in r.items() if k not in ("checkpoint", "data", "cache", "provenance")} for r in results]
    assert metrics[0] == metrics[1] == metrics[2]


def test_old_files_without_a_recorded_hash_still_load_and_keep_their_identity(tiny_h5, tmp_path):
    old = _copy_keeping_times(tiny_h5, tmp_path / "old.h5")
    with h5py.File(old, "r+") as f:  # as written before content hashes were recorded
        del f.attrs["content_sha256"], f.attrs["content_mtime_ns"]
    with pytest.warns(UserWarning, match="written before"):
        fp = open_store(old).fingerprint()
    assert fp == open_store(tiny_h5).fingerprint()  # the same content, the same identity
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_store(old).fingerprint() == fp  # remembered: not hashed again


def test_checkpoint_with_an_old_fingerprint_still_evaluates(trained, tiny_h5, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = trained / "best.safetensors"
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    prov = json.loads(meta["provenance"])
    prov["feature_fingerprint"] = "4cf8f9ef3718e353"  # an 8-image sampled fingerprint of an earlier version
    meta["provenance"] = json.dumps(prov)
    ckpt = tmp_path / "old.safetensors"
    save_file(load_file(str(src)), str(ckpt), metadata=meta)
    result = _run("evaluate", ckpt, "--data", tiny_h5, "--split", "test", "--device", "cpu")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------- item 11


def _flat_copy(src_path, out, empty: set[int]):
    """``src_path``'s images, captions and splits in the flat layout, with no regions for the images in ``empty``."""
    src = open_store(src_path)
    with StoreWriter(out, feature_kind="region", source="test:empty", feature_dim=src.feature_dim) as w:
        for i in range(src.n_images):
            f = src.image_features(i)
            w.write_image(f[:0] if i in empty else f, id=int(src.image_ids[i]))
        w.set_captions(src.captions_text(), src.caption_image)
        for name in src.splits:
            w.add_split(name, *src.split(name))
    return out, [int(src.image_ids[i]) for i in sorted(empty)]


def test_images_without_regions_are_refused(tiny_h5, trained, tiny_overrides, tmp_path):
    data, ids = _flat_copy(tiny_h5, tmp_path / "empty.h5", {3, 7})
    with pytest.raises(MaxMatchError, match=rf"2 of 72 images have no regions \(ids {ids[0]}; {ids[1]}\)"):
        open_store(data)
    assert open_store(data, allow_incomplete=True).region_counts.min() == 0  # `features info` still shows it
    assert _run("features", "info", data).exit_code == 0
    train = _run("train", "--recipe", "demo", "--set", f"data.path={data}", "--set", "train.max_steps=2",
                 *tiny_overrides, "--out", tmp_path / "run")
    assert train.exit_code == 2 and "have no regions" in train.output and str(data) in train.output
    assert not (tmp_path / "run" / "last.safetensors").exists()
    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "a.safetensors")
    evaluate = _run("evaluate", ckpt, "--data", data, "--device", "cpu")
    assert evaluate.exit_code == 2 and "have no regions" in evaluate.output


def test_a_region_axis_of_size_zero_is_refused(tiny_h5, tmp_path):
    data = _copy_keeping_times(tiny_h5, tmp_path / "zero.h5")
    with h5py.File(data, "r+") as f:
        n, _, d = f["images/features"].shape
        del f["images/features"], f["images/boxes"]
        f["images"].create_dataset("features", shape=(n, 0, d), dtype=np.float16)
        f.attrs["regions_per_image"] = 0
    with pytest.raises(MaxMatchError, match=r"stores 0 regions per image"):
        open_store(data)
    with pytest.raises(MaxMatchError, match="0 regions each cannot be stored"):
        StoreWriter(tmp_path / "w.h5", feature_kind="region", source="t", feature_dim=4, regions_per_image=0)


def test_index_build_refuses_sets_that_encode_to_nan(trained, tiny_h5, tmp_path):
    data = _copy_keeping_times(tiny_h5, tmp_path / "nan.h5")
    test_images, _ = open_store(data).split("test")
    bad = int(test_images[4])
    with h5py.File(data, "r+") as f:  # a NaN written into the features after extraction
        f["images/features"][bad, 0, 0] = np.nan
        bad_id = int(f["images/ids"][bad])
    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "a.safetensors")
    with pytest.warns(UserWarning):  # the file changed after it was written: hashed once
        result = _run("index", ckpt, "--data", data, "--split", "test", "--device", "cpu", "--batch-size", "8",
                      "--out", tmp_path / "idx")
    assert result.exit_code == 2, result.output
    assert f"images with ids {bad_id} of" in result.output and "NaN or inf" in result.output
    assert not (tmp_path / "idx").exists()


def test_index_with_nan_sets_is_refused_at_load(trained, tiny_h5, tmp_path):
    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "a.safetensors")
    out = tmp_path / "idx"
    built = _run("index", ckpt, "--data", tiny_h5, "--split", "test", "--device", "cpu", "--out", out)
    assert built.exit_code == 0, built.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sets_check"]["finite"] is True
    ok = _run("query", out, "--text", "a dog", "--device", "cpu")
    assert ok.exit_code == 0 and not re.search(r"\bnan\b", ok.output.lower())
    # An index built before the record: scanned at load, and clean.
    del manifest["sets_check"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(load_index(out)) == 20
    # Sets changed in place after the build (a new mtime): scanned, and the NaN rows named.
    sets = np.load(out / "sets.npy", mmap_mode="r+")
    sets[3, 0, 0] = np.nan
    sets[11, 1, 2] = np.inf
    sets.flush()
    del sets
    os.utime(out / "sets.npy")
    ids = json.loads((out / "ids.json").read_text())
    for m in (manifest, dict(manifest, sets_check={"finite": True, "size": 1, "mtime_ns": 1})):
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(MaxMatchError, match=rf"NaN or inf in rows 3 \(id {ids[3]}\); 11 \(id {ids[11]}\)"):
            load_index(out)
    query = _run("query", out, "--text", "a dog", "--device", "cpu")
    assert query.exit_code == 2 and "NaN or inf" in query.output
