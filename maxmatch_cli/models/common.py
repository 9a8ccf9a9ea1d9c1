"""Shared pieces of the encoders and heads: the output types, masked pooling, masked BatchNorm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn


@dataclass
class SetOutput:
    """What a modality's encoder + set head produce for a batch.

    Attributes:
        sets: (B, K, D) final set elements, LN(E^L) + LN(global) for SetDiv; not L2-normalised (similarities
            normalise inside).
        global_: (B, D) the global feature the set is offset from (the Global Discriminative loss uses it).
        slots: (B, K, D) the head's aggregation output before the global is added (the diversity loss uses it).
    """

    sets: Tensor
    global_: Tensor
    slots: Tensor

    def detach(self) -> "SetOutput":
        """A copy cut from the autograd graph (for caching embeddings)."""
        return SetOutput(self.sets.detach(), self.global_.detach(), self.slots.detach())

    def to(self, *args, **kwargs) -> "SetOutput":
        """Moves/casts every tensor like ``Tensor.to``."""
        return SetOutput(self.sets.to(*args, **kwargs), self.global_.to(*args, **kwargs),
                         self.slots.to(*args, **kwargs))


class Features(NamedTuple):
    """An encoder's output: local features, the global feature and which locals are real.

    Attributes:
        local: (B, N, D) local features (regions, grid cells or tokens) in the set head's input space.
        global_: (B, D) the pooled global feature.
        mask: (B, N) bool, True for real locals; padded locals hold zeros.
        key_pos: (B, N, C) positional encoding the set head adds to its keys only (DivE's text side), or None.
    """

    local: Tensor
    global_: Tensor
    mask: Tensor
    key_pos: Tensor | None = None


class Encoder(Protocol):
    """Seam every image/text encoder fits: inputs (+ mask) -> :class:`Features`."""

    def __call__(self, inputs: Tensor, mask: Tensor | None) -> Features: ...


class SetHead(Protocol):
    """Seam every set head fits: local + global features -> :class:`SetOutput`."""

    def __call__(self, local: Tensor, global_: Tensor, mask: Tensor, key_pos: Tensor | None = None) -> SetOutput: ...


def full_mask(x: Tensor) -> Tensor:
    """An all-True (B, N) mask for x of shape (B, N, ...)."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max over dim 1 of x (B, N, D) among positions where mask (B, N) is True -> (B, D).

    A row with no valid position yields zeros rather than -inf.
    """
    filled = x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min)
    out = filled.amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), out, torch.zeros_like(out))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of x (B, N, D) among positions where mask (B, N) is True -> (B, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over the feature axis of (B, N, C) inputs whose statistics come from valid positions only.

    Padded positions neither enter the batch statistics nor receive a value (they stay zero), so a sample's
    output does not depend on how much padding the batch holds.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        keep = mask.reshape(-1)
        if bool(keep.all()):
            return self.bn(flat).reshape(x.shape)
        idx = keep.nonzero().squeeze(1)
        out = flat.new_zeros(flat.shape)
        out = out.index_copy(0, idx, self.bn(flat.index_select(0, idx)).to(out.dtype))
        return out.reshape(x.shape)


def random_drop_mask(mask: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Drops each valid local with probability ``rate`` by clearing its mask bit, keeping >= 1 per row.

    Equivalent to deleting regions/cells (VSE-infinity's feature dropout) because every encoder and head
    ignores masked positions; vectorised, so it costs nothing next to the forward pass.

    Args:
        mask: (B, N) bool, True for real locals.
        rate: drop probability in [0, 1).
        generator: optional RNG for reproducibility (must live on mask's device).

    Returns:
        (B, N) bool mask, a subset of ``mask``.
    """
    if rate <= 0:
        return mask
    keep = torch.rand(mask.shape, device=mask.device, generator=generator) >= rate
    dropped = mask & keep
    # A row that lost everything keeps its first valid position.
    empty = ~dropped.any(dim=1)
    if bool(empty.any()):
        first = mask.float().argmax(dim=1)
        rescue = torch.zeros_like(mask)
        rescue[torch.arange(mask.shape[0], device=mask.device), first] = True
        dropped = dropped | (rescue & empty.unsqueeze(1) & mask)
    return dropped


def sine_positions(mask: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal encoding of token positions, normalised by each sequence's own length.

    Position p = 1..n of a sequence of n real tokens becomes the angle 2 pi p / n; channel 2i and 2i+1 hold
    sin and cos of that angle over 10000^(2i / dim) (DivE ``pos_encoding.py`` ``PositionEmbeddingSine1D`` with
    ``normalize=True``, which divides by the padded batch length instead: that makes a caption's embedding depend
    on the longest caption in its batch, so the real length is used here). Padded positions get zeros.

    Args:
        mask: (B, L) bool, True for real tokens (right padding).
        dim: C, the encoding width.

    Returns:
        (B, L, dim) float32.
    """
    mask = mask.to(torch.bool)
    pos = mask.cumsum(dim=1).to(torch.float32)
    length = mask.sum(dim=1, keepdim=True).clamp_min(1).to(torch.float32)
    angle = pos / length * (2 * torch.pi)
    i = torch.arange(dim, device=mask.device)
    freq = torch.pow(10000.0, (2 * torch.div(i, 2, rounding_mode="floor")).to(torch.float32) / dim)
    x = angle.unsqueeze(-1) / freq
    enc = torch.where(i % 2 == 0, torch.sin(x), torch.cos(x))
    return enc * mask.unsqueeze(-1)
