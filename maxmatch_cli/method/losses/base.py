"""Shared by the set regularisers: the shape check, the mask of element pairs ``j < k`` and their cosines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError


def check_sets(sets: Tensor, name: str) -> None:
    """Raise :class:`MaxMatchError` unless ``sets`` is ``(B, K, D)``."""
    if sets.dim() != 3:
        raise MaxMatchError(f"{name} must have shape (B, K, D), got {tuple(sets.shape)}")


def upper_pairs(k: int, device) -> Tensor:
    """``(K, K)`` bool, True above the diagonal: each unordered pair of distinct elements once."""
    return torch.triu(torch.ones(k, k, dtype=torch.bool, device=device), diagonal=1)


def pair_cosines(sets: Tensor, name: str, too_few: str) -> Tensor:
    """``(B, K (K - 1) / 2)``: the cosine of each unordered pair of distinct elements of every set.

    Args:
        sets: (B, K, D), any scale, K >= 2.
        name: the argument's name, for the shape message.
        too_few: the message when K < 2 (the loss needs pairs).
    """
    check_sets(sets, name)
    if sets.shape[1] < 2:
        raise MaxMatchError(too_few, "set its weight to 0 for K=1")
    unit = F.normalize(sets, dim=-1)
    return (unit @ unit.transpose(1, 2))[:, upper_pairs(sets.shape[1], sets.device)]
