"""Sample data and writers shared by the feature-store tests (each fixture returns a function to call)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maxmatch_cli.features.store import StoreWriter

D = 16  # feature dimension of every sample store


def _fixed_data(n: int = 9, r: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.random((n, r, D), dtype=np.float32) * 4
    boxes = rng.random((n, r, 4), dtype=np.float32) * 100
    sizes = rng.integers(100, 600, size=(n, 2))
    return feats, boxes, sizes


def _flat_data(n: int = 11, seed: int = 1):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=n)
    feats = [rng.standard_normal((int(c), D)).astype(np.float32) for c in counts]
    boxes = [rng.random((int(c), 4)).astype(np.float32) * 50 for c in counts]
    return feats, boxes


def _captions(n: int, per: int = 5):
    texts = [f"image {i} caption {k}" for i in range(n) for k in range(per)]
    return texts, np.repeat(np.arange(n), per)


def _write_fixed(path: Path, n: int = 9, batch: int = 4, **kw) -> tuple:
    feats, boxes, sizes = _fixed_data(n)
    texts, owners = _captions(n)
    options = dict(
        feature_kind="region", source="test:fixed", feature_dim=D, regions_per_image=feats.shape[1], n_images=n,
        with_boxes=True, with_sizes=True, metadata={"note": "unit test"}, args_fingerprint="fp-a",
    )
    options.update(kw)
    with StoreWriter(path, **options) as w:
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            w.write_images(feats[lo:hi], ids=100 + np.arange(lo, hi), boxes=boxes[lo:hi], sizes=sizes[lo:hi])
        w.set_captions(texts, owners, ids=np.arange(len(texts)) + 7)
        w.add_split("train", np.arange(0, n - 3))
        w.add_split("test", np.array([n - 1, n - 3, n - 2]))
    return feats, boxes, sizes, texts, owners


@pytest.fixture()
def fixed_data():
    """``fixed_data(n=9, r=5, seed=0) -> (features (n, r, D), boxes (n, r, 4), sizes (n, 2))``."""
    return _fixed_data


@pytest.fixture()
def flat_data():
    """``flat_data(n=11, seed=1) -> (features, boxes)``: lists of 1 to 8 rows per image."""
    return _flat_data


@pytest.fixture()
def captions():
    """``captions(n, per=5) -> (texts, owners)``: ``per`` captions of each of ``n`` images, in image order."""
    return _captions


@pytest.fixture()
def write_fixed():
    """``write_fixed(path, n=9, batch=4, **StoreWriter options)``: a finished fixed-layout store with two splits.

    Returns what it wrote: ``(features, boxes, sizes, texts, owners)``.
    """
    return _write_fixed
