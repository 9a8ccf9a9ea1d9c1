"""`maxmatch index`: a captions gallery, refusals, and builds that are atomic and resume after a crash."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import maxmatch_cli
from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.retrieval.api import Model
from maxmatch_cli.retrieval.index import load_index

# Fixtures: ckpt, model, index_dir, faiss_index_dir in conftest.py; tiny_h5, trained in tests/conftest.py.


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_captions_index(ckpt, model, tiny_h5, tmp_path):
    out = tmp_path / "caps"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--out", out)
    assert result.exit_code == 0, result.output
    index = load_index(out)
    store = open_store(tiny_h5)
    _, captions = store.split("test")
    assert index.ids == captions.tolist() and index.texts == store.captions_text(captions)
    expected = F.normalize(model.encode_texts(index.texts), dim=-1)
    torch.testing.assert_close(torch.from_numpy(index.sets.astype(np.float32)), expected, rtol=0, atol=1e-3)
    result = invoke("query", out, "--text", "a dog")
    assert result.exit_code == 2 and "holds captions" in result.output


def test_existing_index_needs_overwrite(index_dir, ckpt, tiny_h5):
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", index_dir)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output


def _fail_on_call(monkeypatch, n):
    """Make the n-th call of Model.encode_images raise, as a crash mid-build would."""
    original, calls = Model.encode_images, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash mid-build")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Model, "encode_images", failing)
    return calls


def test_interrupted_build_leaves_no_index_and_resumes(index_dir, ckpt, tiny_h5, tmp_path, monkeypatch):
    calls = _fail_on_call(monkeypatch, 3)
    out = tmp_path / "index"
    args = ["index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4]
    result = invoke(*args)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert len(calls) == 3  # it failed after two chunks had been written
    # Only the hidden partial folder is left, with the two chunks recorded.
    assert [p.name for p in tmp_path.iterdir()] == [".index.partial"]
    assert json.loads((tmp_path / ".index.partial" / "progress.json").read_text())["done"] == 8
    with pytest.raises(MaxMatchError, match="does not exist"):
        load_index(out)
    # The same command resumes: only the remaining rows are encoded, and the index equals a clean build.
    monkeypatch.undo()
    encoded = []
    original = Model.encode_images
    monkeypatch.setattr(Model, "encode_images",
                        lambda self, store, rows, **kw: encoded.extend(rows) or original(self, store, rows, **kw))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    images, _ = open_store(tiny_h5).split("test")
    assert encoded == images[8:].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    np.testing.assert_array_equal(np.load(out / "sets.npy"), np.load(index_dir / "sets.npy"))
    assert load_index(out).ids == load_index(index_dir).ids


def test_partial_build_of_another_checkpoint_starts_afresh(ckpt, trained, tiny_h5, tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, 2)
    out = tmp_path / "index"
    assert invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4).exit_code
    monkeypatch.undo()
    other = tmp_path / "other.safetensors"
    shutil.copy2(trained / "last.safetensors", other)
    result = invoke("index", other, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    model = maxmatch_cli.load(other, device="cpu")
    store = open_store(tiny_h5)
    expected = F.normalize(model.encode_images(store, store.split("test")[0]), dim=-1)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "sets.npy").astype(np.float32)), expected,
                               rtol=0, atol=1e-3)


def test_interrupted_overwrite_keeps_the_old_index(index_dir, ckpt, tiny_h5, tmp_path, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(index_dir, out)
    before = (out / "manifest.json").read_text()
    _fail_on_call(monkeypatch, 2)
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4,
                    "--overwrite")
    assert result.exit_code != 0
    assert (out / "manifest.json").read_text() == before and len(load_index(out)) == len(load_index(index_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.partial", "index"]  # the rows so far, to resume
    monkeypatch.undo()
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_nlist_is_checked_before_encoding(ckpt, tiny_h5, tmp_path):
    for value, message in ((0, "nlist must be a positive integer"), (10**9, "must lie in 1..")):
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "i",
                        "--engine", "faiss", "--nlist", value)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not list(tmp_path.iterdir())  # nothing encoded, no partial build
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "i", "--nlist", 4)
    assert result.exit_code == 2 and "add --engine faiss" in result.output
