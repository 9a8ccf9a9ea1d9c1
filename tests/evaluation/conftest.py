"""Fixtures of the evaluation tests."""

import shutil

import pytest


@pytest.fixture
def ckpt(trained, tmp_path):
    """A private copy of the tiny checkpoint (its embedding cache and outputs land in tmp_path, not the shared run)."""
    return shutil.copy(trained / "best.safetensors", tmp_path / "a.safetensors")
