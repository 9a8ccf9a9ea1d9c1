"""Shared by the set regularisers: the shape check and the mask of element pairs ``j < k``."""

from __future__ import annotations

import torch
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError


def check_sets(sets: Tensor, name: str) -> None:
    """Raise :class:`MaxMatchError` unless ``sets`` is ``(B, K, D)``."""
    if sets.dim() != 3:
        raise MaxMatchError(f"{name} must have shape (B, K, D), got {tuple(sets.shape)}")


def upper_pairs(k: int, device) -> Tensor:
    """``(K, K)`` bool, True above the diagonal: each unordered pair of distinct elements once."""
    return torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)
