"""torchrun / DDP support: rank, world size and device come from the environment.

Set embeddings are gathered across processes *with* gradients (each process's slice of the gathered tensor
backpropagates into that process's encoder), so every process mines hardest negatives for its local queries
against the global batch. Without torchrun every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from maxmatch_cli.devices import local_rank


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def init() -> None:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1); idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (tdist.is_available() and tdist.is_initialized()):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, keeping gradients to each rank's own slice."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def barrier() -> None:
    if is_distributed():
        tdist.barrier()
