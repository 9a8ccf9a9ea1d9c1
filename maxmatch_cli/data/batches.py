"""Collated batches and the padding that makes them: regions to (B, R, F) and token ids to (B, L), with masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Batch:
    """A collated batch of Bi images and Bt captions. Masks are True for real regions / tokens.

    Image-centric batches hold Bi distinct images and Bt = Bi x c captions, caption j of image row j // c;
    pair batches hold Bi = Bt rows, caption j of row j (the same image may fill several rows).
    """

    feats: torch.Tensor  # (Bi, R, F) float32, or (Bi, 3, H, W) normalised pixels for a CNN
    feat_mask: torch.Tensor | None  # (Bi, R) bool; None for pixels
    tokens: torch.Tensor  # (Bt, L) long
    token_mask: torch.Tensor  # (Bt, L) bool
    image_index: torch.Tensor  # (Bi,) long, image index in the store of each image row
    caption_index: torch.Tensor  # (Bt,) long, caption index in the store
    caption_owner: torch.Tensor | None = None  # (Bt,) long, image row of each caption; None: caption j <-> row j

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(*(None if t is None else t.to(device, non_blocking=nb)
                       for t in (self.feats, self.feat_mask, self.tokens, self.token_mask, self.image_index,
                                 self.caption_index, self.caption_owner)))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the copy to the GPU can overlap compute (DataLoader(pin_memory=True) calls it)."""
        return Batch(*(None if t is None else t.pin_memory()
                       for t in (self.feats, self.feat_mask, self.tokens, self.token_mask, self.image_index,
                                 self.caption_index, self.caption_owner)))


def pad_regions(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (R_i, F) arrays into (B, Rmax, F) zeros-padded plus a (B, Rmax) validity mask."""
    rmax = max(max(a.shape[0] for a in arrays), 1)
    feats = torch.zeros(len(arrays), rmax, arrays[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(arrays), rmax, dtype=torch.bool)
    for i, a in enumerate(arrays):
        feats[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        mask[i, : a.shape[0]] = True
    return feats, mask


def pad_tokens(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (B, L) plus a (B, L) mask."""
    lmax = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), lmax), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), lmax, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return tokens, mask
