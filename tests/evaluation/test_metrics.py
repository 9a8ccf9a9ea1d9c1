"""Retrieval metrics against a full-argsort reference (SCAN's evaluation loop) and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.metrics import METRIC_KEYS, coco_1k_folds, retrieval_metrics, validate_sims


def reference_metrics(sims: np.ndarray, cpi: int) -> dict[str, float]:
    """Sort every row and column in full, as SCAN's i2t / t2i do."""
    n_images = sims.shape[0]
    i2t = np.zeros(n_images)
    for i in range(n_images):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(cpi * i, cpi * (i + 1)))
    t2i = np.zeros(n_images * cpi)
    for j in range(n_images * cpi):
        order = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(order == j // cpi)[0][0]

    def summary(r, prefix):
        out = {f"{prefix}_r{k}": 100.0 * len(np.where(r < k)[0]) / len(r) for k in (1, 5, 10)}
        out[f"{prefix}_medr"] = np.floor(np.median(r)) + 1
        out[f"{prefix}_meanr"] = r.mean() + 1
        return out

    out = {**summary(i2t, "i2t"), **summary(t2i, "t2i")}
    out["rsum"] = sum(out[k] for k in out if "_r" in k and "med" not in k and "mean" not in k)
    return out


def _random_sims(n_images, cpi, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, n_images * cpi)).astype(np.float32)
    # Some signal so recalls are neither 0 nor 100.
    sims[np.arange(n_images * cpi) // cpi, np.arange(n_images * cpi)] += signal
    return sims


def _assert_metrics_close(got, expected):
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert math.isclose(got[key], expected[key], rel_tol=1e-9, abs_tol=1e-9), key


@pytest.mark.parametrize("cpi", [5, 1])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_matches_full_argsort(cpi, chunk_size):
    sims = _random_sims(40, cpi, seed=cpi)
    expected = reference_metrics(sims, cpi)
    _assert_metrics_close(retrieval_metrics(sims, cpi, chunk_size=chunk_size), expected)
    _assert_metrics_close(retrieval_metrics(torch.from_numpy(sims), cpi, chunk_size=chunk_size), expected)


def test_float64_and_float16_inputs():
    sims = _random_sims(20, 5, seed=3)
    expected = reference_metrics(sims, 5)
    _assert_metrics_close(retrieval_metrics(sims.astype(np.float64)), expected)
    half = sims.astype(np.float16)
    _assert_metrics_close(retrieval_metrics(torch.from_numpy(half)), reference_metrics(half.astype(np.float32), 5))


def test_hand_computed_example():
    # 2 images x 2 captions each; captions 0, 1 -> image 0; captions 2, 3 -> image 1.
    sims = np.array(
        [
            [0.1, 0.9, 0.5, 0.2],  # image 0: its best caption (0.9) is first -> rank 0
            [0.8, 0.7, 0.3, 0.6],  # image 1: best own 0.6, beaten by 0.8 and 0.7 -> rank 2
        ],
        dtype=np.float32,
    )
    # t2i: cap0 0.1 vs 0.8 -> 1; cap1 0.9 vs 0.7 -> 0; cap2 0.3 vs 0.5 -> 1; cap3 0.6 vs 0.2 -> 0.
    m = retrieval_metrics(sims, 2)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 2.0  # median of [0, 2] = 1 -> floor + 1
    assert m["i2t_meanr"] == 2.0
    assert m["t2i_r1"] == 50.0 and m["t2i_r5"] == 100.0
    assert m["t2i_medr"] == 1.0  # median of [1, 0, 1, 0] = 0.5 -> floor 0 + 1
    assert m["t2i_meanr"] == 1.5
    assert m["rsum"] == 50 + 100 + 100 + 50 + 100 + 100


def test_ties_count_against_the_query():
    sims = np.zeros((3, 6), dtype=np.float32)
    m = retrieval_metrics(sims, 2)
    # A constant matrix: every negative ties with the positive, so every rank is the worst possible.
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0
    assert m["i2t_meanr"] == 5.0  # 4 negative captions -> 0-based rank 4
    assert m["t2i_meanr"] == 3.0  # 2 negative images -> 0-based rank 2
    # A tie between two captions of the same image does not hurt.
    sims = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    assert retrieval_metrics(sims, 2)["rsum"] == 600.0


def test_coco_1k_folds_equals_manual_slicing():
    cpi, n_folds, size = 5, 5, 12
    sims = _random_sims(n_folds * size, cpi, seed=11)
    mean, folds = coco_1k_folds(sims, cpi, n_folds=n_folds)
    assert len(folds) == n_folds
    for f, fold in enumerate(folds):
        part = sims[f * size : (f + 1) * size, f * size * cpi : (f + 1) * size * cpi]
        _assert_metrics_close(fold, reference_metrics(part, cpi))
    for key in METRIC_KEYS:
        assert math.isclose(mean[key], np.mean([fold[key] for fold in folds]))
    mean_t, _ = coco_1k_folds(torch.from_numpy(sims), cpi, n_folds=n_folds, chunk_size=5)
    _assert_metrics_close(mean_t, mean)


@pytest.mark.parametrize(
    "sims, cpi, match",
    [
        (np.zeros((3, 14)), 5, "does not fit"),
        (np.zeros((15, 3)), 5, "transposed"),
        (np.zeros((3, 15, 1)), 5, "2-D"),
        (np.zeros((3, 15), dtype=np.int64), 5, "floating"),
        (np.zeros((0, 0)), 5, "does not fit"),
        (np.zeros((3, 15)), 0, "captions_per_image"),
        ([[0.0]], 1, "numpy"),
        (np.full((2, 2), np.nan), 1, "NaN"),
    ],
)
def test_validation_errors(sims, cpi, match):
    with pytest.raises(MaxMatchError, match=match):
        retrieval_metrics(sims, cpi)


def test_fold_errors():
    with pytest.raises(MaxMatchError, match="folds"):
        coco_1k_folds(np.zeros((7, 35)), 5, n_folds=5)
    assert validate_sims(np.zeros((2, 10), dtype=np.float32)).shape == (2, 10)


def test_large_matrix_is_fast():
    import time

    sims = torch.randn(1000, 5000)
    start = time.perf_counter()
    m = retrieval_metrics(sims, 5)
    assert time.perf_counter() - start < 5.0
    assert 0 <= m["rsum"] <= 600
