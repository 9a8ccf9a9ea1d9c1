"""Fixtures of the index tests: a private checkpoint, its model, and an exact and a faiss index of the tiny
test split (tiny_h5 and trained live in tests/conftest.py)."""

import shutil

import pytest
from typer.testing import CliRunner

import maxmatch_cli
from maxmatch_cli.cli.app import app


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(trained, tmp_path_factory):
    """A private copy of the trained checkpoint (other tests may resume training in the run folder)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    shutil.copy2(trained / "best.safetensors", path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return maxmatch_cli.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def index_dir(ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "test-images"
    result = _invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 6,
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


@pytest.fixture(scope="module")
def faiss_index_dir(ckpt, tiny_h5, tmp_path_factory):
    pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("indexes") / "test-faiss"
    result = _invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--engine", "faiss")
    assert result.exit_code == 0, result.output
    assert "faiss element index" in result.output
    return out
