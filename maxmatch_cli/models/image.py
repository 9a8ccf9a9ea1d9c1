"""Image encoders: precomputed BUTD regions, precomputed grid cells, or a torchvision CNN on raw pixels.

All three project each local feature to D with a linear layer (a 1x1 convolution for grid cells) plus,
by default, VSE-infinity's two-layer MLP branch (D -> D/2 -> D with BatchNorm and ReLU) added as a residual
(MaxMatch App. B: "a two-layer MLP with residual connections"). The global feature pools the projected
locals over the valid positions: max for regions, mean for grid cells.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from maxmatch_cli.models.common import Features, MaskedBatchNorm1d, full_mask, masked_max, masked_mean

Pool = Callable[[Tensor, Tensor], Tensor]


class LocalProjection(nn.Module):
    """fc(x) + MLP(fc(x)) per local feature, with masked BatchNorm so padding never enters the statistics.

    Args:
        in_dim: stored feature width F.
        dim: output width D.
        mlp: add the D -> D/2 -> D MLP branch as a residual (False: fc only, a plain 1x1 projection).
        dropout: dropout on the projected features (DivE ``img_1x1_dropout`` 0.1).
    """

    def __init__(self, in_dim: int, dim: int, mlp: bool = True, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, dim)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.use_mlp = mlp
        if mlp:
            hidden = max(dim // 2, 1)
            self.mlp_in = nn.Linear(dim, hidden)
            self.mlp_bn = MaskedBatchNorm1d(hidden)
            self.mlp_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, N, F), mask (B, N) -> (B, N, D); padded positions come out as zeros."""
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = self.fc(x)
        if self.use_mlp:
            h = h + self.mlp_out(torch.relu(self.mlp_bn(self.mlp_in(h), mask)))
        return self.dropout(h).masked_fill(~mask.unsqueeze(-1), 0.0)


class PrecomputedEncoder(nn.Module):
    """Encoder over stored local features: BUTD regions (max-pooled global) or grid cells (mean-pooled).

    Args:
        in_dim: stored feature width F (2048 for BUTD and ResNet grids).
        dim: D.
        pool: 'max' (regions) or 'mean' (grid cells) for the global feature.
        mlp: use the MLP residual branch in the projection.
    """

    POOLS: dict[str, Pool] = {"max": masked_max, "mean": masked_mean}

    def __init__(self, in_dim: int, dim: int, pool: str = "max", mlp: bool = True, dropout: float = 0.0):
        super().__init__()
        self.project = LocalProjection(in_dim, dim, mlp, dropout)
        self.pool_name = pool
        self.pool = self.POOLS[pool]

    def forward(self, feats: Tensor, mask: Tensor | None) -> Features:
        """feats (B, R, F) float, mask (B, R) bool (True = real; None = all real) -> Features."""
        if feats.dim() == 4:  # (B, h, w, F) grid maps
            feats = feats.flatten(1, 2)
        if feats.dim() != 3:
            raise ValueError(f"expected image features (B, R, F), got shape {tuple(feats.shape)}")
        mask = full_mask(feats) if mask is None else mask.to(torch.bool)
        # Stored features may arrive as float16; compute in the weights' dtype (autocast still applies).
        local = self.project(feats.to(self.project.fc.weight.dtype), mask)
        return Features(local, self.pool(local, mask), mask)


class CNNEncoder(nn.Module):
    """End-to-end grid encoder: CNN trunk (no avgpool/fc) -> h*w cells of C channels -> projection -> mean.

    Args:
        trunk: module mapping (B, 3, H, W) pixels to (B, C, h, w) feature maps.
        channels: C (2048 for ResNet-152 / ResNeXt-101).
        dim: D.
        mlp: use the MLP residual branch in the projection.
        freeze_epochs: the trunk is frozen (no gradients, BatchNorm statistics fixed) while epoch < this
            (0-based epochs, see :meth:`set_epoch`).
        dropout: dropout on the projected cells.
        pool: 'mean' (the average pooling of the CNN, default) or 'max' for the global feature.
    """

    backbone_lr_group = "cnn"
    """The trunk trains at lr x optim.lr_scale_cnn once unfrozen."""

    def __init__(self, trunk: nn.Module, channels: int, dim: int, mlp: bool = True, freeze_epochs: int = 0,
                 dropout: float = 0.0, pool: str = "mean"):
        super().__init__()
        self.backbone = trunk
        self.pool = PrecomputedEncoder.POOLS[pool]
        self.project = LocalProjection(channels, dim, mlp, dropout)
        self.freeze_epochs = freeze_epochs
        self.frozen = False
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Freezes the trunk for 0-based epochs < freeze_epochs and unfreezes it afterwards.

        Freezing runs the trunk under no_grad (its parameters get no gradient, so AdamW skips them, weight
        decay included) and in eval mode. ``requires_grad`` is deliberately left True: DistributedDataParallel
        registers only parameters that require grad when it is built, so toggling it would leave an unfrozen
        trunk unsynchronised across ranks (the DDP wrapper must use find_unused_parameters=True meanwhile).
        """
        self.frozen = epoch < self.freeze_epochs
        if self.frozen:
            self.backbone.eval()
        elif self.training:
            self.backbone.train()

    def train(self, mode: bool = True) -> "CNNEncoder":
        super().train(mode)
        if self.frozen:
            # A frozen trunk must not drift through its BatchNorm running statistics either.
            self.backbone.eval()
        return self

    def forward(self, pixels: Tensor, mask: Tensor | None = None) -> Features:
        """pixels (B, 3, H, W) normalised images; mask must be None -> Features with N = h*w cells."""
        if pixels.dim() != 4:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(pixels.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone(pixels)
        cells = maps.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cell_mask = full_mask(cells)
        local = self.project(cells, cell_mask)
        return Features(local, self.pool(local, cell_mask), cell_mask)
