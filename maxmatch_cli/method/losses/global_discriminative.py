"""Global Discriminative loss (paper eq. 7): keep set elements from collapsing onto the sample's global."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses.base import check_sets


def global_discriminative_loss(sets: Tensor, global_: Tensor, margin: float = 0.6, scale: float = 0.5) -> Tensor:
    """Global Discriminative loss for one modality (one half of paper eq. 7).

    ``mean_{b,k} exp(scale * (cos(sets[b, k], global_[b]) - margin))``. The total GD term of eq. 7 is the mean
    of the image and the text terms.

    Args:
        sets: (B, K, D) set elements (any scale; cosines are taken).
        global_: (B, D) global embedding of each sample.
        margin: delta_2.
        scale: s.

    Returns:
        Scalar.
    """
    check_sets(sets, "sets")
    if global_.shape != (sets.shape[0], sets.shape[2]):
        raise MaxMatchError(f"global_ must have shape {(sets.shape[0], sets.shape[2])}, got {tuple(global_.shape)}")
    cos = torch.einsum("bkd,bd->bk", F.normalize(sets, dim=-1), F.normalize(global_, dim=-1))
    return torch.exp(scale * (cos - margin)).mean()
