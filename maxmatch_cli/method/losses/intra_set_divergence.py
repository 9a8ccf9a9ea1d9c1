"""Intra-Set Divergence loss (paper eq. 8): push the elements of one set apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses.base import check_sets, upper_pairs


def intra_set_divergence_loss(sets: Tensor, margin: float = 0.6, scale: float = 0.5) -> Tensor:
    """Intra-Set Divergence loss for one modality (one half of paper eq. 8).

    ``2 / (K (K - 1)) * sum_{j<k} exp(scale * (cos(sets[b, j], sets[b, k]) - margin))``, averaged over the batch.
    Eq. 8 adds the image and the text terms.

    Args:
        sets: (B, K, D) set elements (any scale; cosines are taken), K >= 2.
        margin: delta_3.
        scale: s.

    Returns:
        Scalar.
    """
    check_sets(sets, "sets")
    if sets.shape[1] < 2:
        raise MaxMatchError("intra-set divergence needs at least 2 elements per set", "set its weight to 0 for K=1")
    unit = F.normalize(sets, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    pairs = cos[:, upper_pairs(sets.shape[1], sets.device)]  # (B, K(K-1)/2)
    return torch.exp(scale * (pairs - margin)).mean()
