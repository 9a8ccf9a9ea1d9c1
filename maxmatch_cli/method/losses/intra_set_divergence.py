"""Intra-Set Divergence loss (paper eq. 8): push the elements of one set apart."""

from __future__ import annotations

import torch
from torch import Tensor

from maxmatch_cli.method.losses.base import pair_cosines


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
    pairs = pair_cosines(sets, "sets", "intra-set divergence needs at least 2 elements per set")  # (B, K(K-1)/2)
    return torch.exp(scale * (pairs - margin)).mean()
