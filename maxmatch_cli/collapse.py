"""Set-collapse diagnostics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

__all__ = ["circular_variance"]


def circular_variance(sets: torch.Tensor) -> torch.Tensor:
    """Circular variance of each set: ``1 - ||mean of the L2-normalised elements||^2``.

    0 when all elements point the same way (a collapsed set); ``1 - 1/K`` for K orthonormal elements; at most 1.
    Zero-norm elements count as zero vectors.

    Args:
        sets: (N, K, D) set elements, any scale.

    Returns:
        (N,) circular variance per set, in the input's floating dtype.
    """
    if not isinstance(sets, torch.Tensor) or sets.dim() != 3 or sets.shape[1] == 0:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise MaxMatchError(f"sets must be a (N, K, D) tensor with K >= 1, got {shape}")
    if not sets.is_floating_point():
        sets = sets.float()
    mean = F.normalize(sets, dim=-1).mean(dim=1)
    return 1.0 - mean.pow(2).sum(dim=-1)
