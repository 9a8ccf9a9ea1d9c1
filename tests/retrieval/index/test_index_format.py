"""The index folder: what a build writes, what loads, and what is refused."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.retrieval.index import FORMAT_VERSION, Index, checkpoint_fingerprint, load_index

# Fixtures: ckpt, model, index_dir, faiss_index_dir in conftest.py; tiny_h5, trained in tests/conftest.py.


def test_index_holds_the_encoded_gallery(index_dir, model, ckpt, tiny_h5):
    index = load_index(index_dir)
    store = open_store(tiny_h5)
    images, _ = store.split("test")
    m = index.manifest
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "images" and m["split"] == "test"
    assert (m["n_items"], m["K"], m["D"]) == (len(images), model.num_embeds, model.embed_dim)
    assert m["similarity"] == model.similarity and m["engine"] == "exhaustive-exact" and m["element_index"] is None
    assert m["checkpoint"]["fingerprint"] == checkpoint_fingerprint(ckpt)
    assert isinstance(index.sets, np.memmap) and index.sets.dtype == np.float16
    assert index.ids == np.asarray(store.image_ids)[images].tolist()
    expected = F.normalize(model.encode_images(store, images), dim=-1)
    torch.testing.assert_close(torch.from_numpy(index.sets.astype(np.float32)), expected, rtol=0, atol=1e-3)


def test_a_manifest_of_an_earlier_release_loads(tmp_path, ckpt):
    # A format-1 folder as maxmatch 0.1.0 wrote it (before the index module became a package): it must keep
    # loading, and searching it must not need anything the old manifest lacks.
    folder = tmp_path / "old-index"
    folder.mkdir()
    sets = F.normalize(torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    np.save(folder / "sets.npy", sets.numpy().astype(np.float16))
    (folder / "ids.json").write_text(json.dumps([10, 11, 12]))
    manifest = {
        "format": "maxmatch-index", "format_version": 1, "kind": "images", "n_items": 3, "K": 4, "D": 8,
        "dtype": "float16", "normalized": True, "similarity": "maxmatch", "similarity_options": {},
        "engine": "exhaustive-exact", "element_index": None,
        "checkpoint": {"path": str(ckpt), "fingerprint": checkpoint_fingerprint(ckpt), "size": 1, "mtime_ns": 1},
        "data": "/somewhere/tiny.h5", "data_fingerprint": "4cf8f9ef3718e353", "split": "test",
        "image_extraction": None, "maxmatch_version": "0.1.0", "created": "2025-06-01T12:00:00+00:00",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    index = load_index(folder)
    assert isinstance(index, Index) and len(index) == 3 and index.ids == [10, 11, 12] and index.texts is None
    assert not index.has_element_index and index.similarity == "maxmatch"
    index.check_checkpoint(ckpt)
    ranking, engine = index.search(sets[1:2], k=2)
    assert engine == "exact" and ranking.indices[0, 0].item() == 1  # a set is its own best match


def test_a_killed_build_is_not_an_index(index_dir, tmp_path):
    # A build killed before its manifest was written leaves a hidden folder without one; even renamed by hand,
    # it is refused.
    partial = tmp_path / "partial"
    shutil.copytree(index_dir, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(MaxMatchError, match="not a complete maxmatch index"):
        load_index(partial)
