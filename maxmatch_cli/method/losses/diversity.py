"""PVSE/SetDiv diversity regulariser on the slots, before the global is added."""

from __future__ import annotations

import torch
from torch import Tensor

from maxmatch_cli.method.losses.base import pair_cosines


def diversity_loss(slots: Tensor) -> Tensor:
    """PVSE/SetDiv diversity regulariser on the slots before the global is added.

    On L2-normalised slots: ``sum_{i<j} exp(-2 ||s_i - s_j||^2) / (K (K - 1) / 2)``, averaged over the batch.

    Args:
        slots: (B, K, D), K >= 2.

    Returns:
        Scalar.
    """
    cos = pair_cosines(slots, "slots", "diversity loss needs at least 2 slots per set")
    # For unit vectors ||a - b||^2 = 2 - 2 cos(a, b).
    sq = (2.0 - 2.0 * cos).clamp(min=0)
    return torch.exp(-2.0 * sq).mean()
