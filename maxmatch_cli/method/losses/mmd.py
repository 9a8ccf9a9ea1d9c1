"""MMD between the image and the text set elements of a batch (SetDiv's kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError


def _safe_sqrt(x: Tensor) -> Tensor:
    # d/dx sqrt(x) is infinite at 0; the inner where keeps the unused branch finite so no NaN leaks into the
    # gradient, and the outer one gives distance 0 a zero (sub)gradient.
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _pairwise_distance(a: Tensor, b: Tensor | None) -> Tensor:
    """Euclidean distances (Na, Nb) by one matmul; b=None means a against itself with an exact zero diagonal."""
    other = a if b is None else b
    sq = (a * a).sum(-1, keepdim=True) + (other * other).sum(-1).unsqueeze(0) - 2.0 * a @ other.t()
    sq = sq.clamp(min=0)
    if b is None:
        sq = sq.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), 0.0)
    return _safe_sqrt(sq)


def mmd_loss(x: Tensor, y: Tensor, gamma: float = 0.5) -> Tensor:
    """Biased MMD estimate between two point clouds with SetDiv's kernel ``k(u, v) = exp(-gamma * ||u - v||)``.

    ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``; the gradient at zero distance is zero, never NaN.
    Distances come from one matmul per block (memory O(N M), not O(N M D)); self-distances are exactly zero,
    while cross distances below ~sqrt(machine eps) * ||x|| carry that much rounding error.

    Args:
        x: (N, D) all image set elements of the batch (e.g. ``img_sets.flatten(0, 1)``).
        y: (M, D) all text set elements.
        gamma: kernel rate (SetDiv: 0.5).

    Returns:
        Scalar.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise MaxMatchError(f"mmd_loss needs (N, D) and (M, D) inputs, got {tuple(x.shape)} and {tuple(y.shape)}")

    def kernel_mean(a: Tensor, b: Tensor | None) -> Tensor:
        return torch.exp(-gamma * _pairwise_distance(a, b)).mean()

    return kernel_mean(x, None) + kernel_mean(y, None) - 2.0 * kernel_mean(x, None if y is x else y)


def set_mmd(img_sets: Tensor, txt_sets: Tensor, gamma: float = 0.5) -> Tensor:
    """MMD between all image and all text set elements, each L2-normalised first (DivE ``loss.py``).

    Unnormalised LN(E) + LN(global) elements have norm ~sqrt(2 D) (45 at D = 1024): the kernel
    exp(-gamma ||x - y||) is then ~0 between any two distinct elements, the loss a constant and its gradient
    ~0. On the unit sphere distances lie in [0, 2] and the kernel in [exp(-2 gamma), 1].

    Args:
        img_sets: (Bi, K, D) image sets (any scale).
        txt_sets: (Bt, K, D) text sets (any scale).
        gamma: kernel rate.

    Returns:
        Scalar.
    """
    return mmd_loss(F.normalize(img_sets.flatten(0, 1), dim=-1), F.normalize(txt_sets.flatten(0, 1), dim=-1), gamma)
