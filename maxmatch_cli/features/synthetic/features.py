"""Region features: the seeded prototype table (the *world*) and the features of one block of images."""

from __future__ import annotations

import numpy as np

from maxmatch_cli.features.synthetic.plan import SyntheticPlan
from maxmatch_cli.features.synthetic.vocabulary import ATTRIBUTES, N_CLUTTER, OBJECTS, SCENES

BLOCK = 64
"""Images per feature block; each block has its own seeded stream, so the features do not depend on batching."""


def make_world(seed: int, dim: int) -> np.ndarray:
    """The prototype table: rows P (classes), Q (attributes), S (scenes), U (4 parts per class), clutter, then
    a row of zeros and a row of ones."""
    rng = np.random.default_rng([seed, 2])
    n_rows = len(OBJECTS) + len(ATTRIBUTES) + len(SCENES) + 4 * len(OBJECTS) + N_CLUTTER
    table = np.zeros((n_rows + 2, dim), dtype=np.float32)
    table[:n_rows] = rng.standard_normal((n_rows, dim), dtype=np.float32)
    table[-1] = 1.0
    return table


def block_features(plan: SyntheticPlan, world: np.ndarray, block: int) -> np.ndarray:
    """Region features ``(B, R, D)`` float16 of the images ``64 * block ...`` (deterministic per block).

    The signal of each region is a weighted sum of at most seven prototype rows (computed with one
    ``embedding_bag``); the noise is uniform with standard deviation ``config.noise``.
    """
    import torch

    c = plan.config
    lo, hi = block * BLOCK, min((block + 1) * BLOCK, c.n_images)
    rng = np.random.default_rng([plan.seed, 3, block])
    amplitude = float(c.noise) * 12**0.5  # uniform noise amplitude for standard deviation `noise`
    index, weight = _signal_bags(plan, lo, hi, len(world) - 2, 0.5 * amplitude + 0.5, rng)
    n = len(index)
    noise = rng.random((n, c.feature_dim), dtype=np.float32)
    scale = rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)

    # x = relu(signal + amplitude * (u - 0.5) - 0.5) * scale, in three passes over the block.
    x = torch.nn.functional.embedding_bag(
        torch.from_numpy(index),
        torch.from_numpy(world),
        per_sample_weights=torch.from_numpy(weight.astype(np.float32)),
        mode="sum",
    )
    x.add_(torch.from_numpy(noise), alpha=amplitude).clamp_(min=0).mul_(torch.from_numpy(scale))
    return x.to(torch.float16).numpy().reshape(hi - lo, c.n_regions, c.feature_dim)


def _signal_bags(
    plan: SyntheticPlan, lo: int, hi: int, zero: int, offset: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The 8 world rows each region of images ``lo:hi`` sums, ``(n, 8)`` int64, and their weights ``(n, 8)``.

    ``zero`` is the index of the table's row of zeros (the row of ones follows it); ``offset`` is subtracted
    through the row of ones. Draws each object region's gain from ``rng``.
    """
    n_cls, n_attr, n_scene = len(OBJECTS), len(ATTRIBUTES), len(SCENES)
    q0, s0 = n_cls, n_cls + n_attr
    u0 = s0 + n_scene
    c0 = u0 + 4 * n_cls
    obj = plan.region_object[lo:hi].reshape(-1)
    local = obj >= 0
    safe = np.maximum(obj, 0)
    cls, attr = plan.object_class[safe], plan.object_attr[safe]
    part = plan.region_part[lo:hi].reshape(-1)
    mix = plan.region_mix[lo:hi].reshape(-1)
    has_mix = mix >= 0
    mcls, mattr = plan.object_class[np.maximum(mix, 0)], plan.object_attr[np.maximum(mix, 0)]
    scene = np.repeat(plan.image_scene[lo:hi], plan.config.n_regions)
    n = len(obj)

    gain = np.where(local, rng.uniform(0.5, 1.2, size=n), 0.0)
    m = np.where(has_mix, 0.4, 0.0)
    index = np.stack(
        [
            np.where(local, cls, zero),
            np.where(local, q0 + attr, zero),
            np.where(local, u0 + 4 * cls + part, zero),
            s0 + scene,
            np.where(has_mix, mcls, zero),
            np.where(has_mix, q0 + mattr, zero),
            np.where(local, zero, c0 + part % N_CLUTTER),
            np.full(n, zero + 1),  # the constant row: centres the noise and shifts the ReLU threshold
        ],
        1,
    )
    weight = np.stack(
        [gain, 0.8 * gain, 0.5 * gain, np.full(n, 0.4), m, 0.8 * m, (~local).astype(float), np.full(n, -offset)], 1
    )
    return index, weight
