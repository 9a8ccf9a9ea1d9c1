"""The training sampler: a seeded shuffle per epoch, split over ranks, resumable inside an epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from maxmatch_cli.errors import MaxMatchError


class EpochSampler(Sampler[int]):
    """Seeded shuffle per epoch, split over ranks, resumable from a step inside the epoch.

    Each epoch draws one permutation from ``seed + epoch``; rank r of w takes every w-th index (so the global
    batch is the same whatever the world size), and ``start_step`` skips the batches a resumed run already saw.
    The tail that does not fill a whole global batch is dropped so every step has equal-sized batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise MaxMatchError(f"the training split has {n} training items, fewer than one global batch "
                                f"({batch_size} x {world_size} processes)",
                                hint="lower train.batch_size or use a larger training split")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        global_bs = self.batch_size * self.world_size
        perm = perm[self.start_step * global_bs: self.steps_per_epoch * global_bs]
        return iter(perm[self.rank:: self.world_size].tolist())

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0) * self.batch_size  # a resume past the end: empty
