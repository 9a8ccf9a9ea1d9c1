"""PVSE/SetDiv diversity regulariser on the slots, before the global is added."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses.base import check_sets, upper_pairs


def diversity_loss(slots: Tensor) -> Tensor:
    """PVSE/SetDiv diversity regulariser on the slots before the global is added.

    On L2-normalised slots: ``sum_{i<j} exp(-2 ||s_i - s_j||^2) / (K (K - 1) / 2)``, averaged over the batch.

    Args:
        slots: (B, K, D), K >= 2.

    Returns:
        Scalar.
    """
    check_sets(slots, "slots")
    if slots.shape[1] < 2:
        raise MaxMatchError("diversity loss needs at least 2 slots per set", "set its weight to 0 for K=1")
    unit = F.normalize(slots, dim=-1)
    # For unit vectors ||a - b||^2 = 2 - 2 cos(a, b).
    sq = (2.0 - 2.0 * (unit @ unit.transpose(1, 2))).clamp(min=0)
    pairs = sq[:, upper_pairs(slots.shape[1], slots.device)]
    return torch.exp(-2.0 * pairs).mean()
