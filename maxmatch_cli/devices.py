"""Choosing the torch device from a name, with a hint that fits the command that asked."""

from __future__ import annotations

import os

import torch

from maxmatch_cli.errors import MaxMatchError

def local_rank() -> int:
    """This process's GPU slot under torchrun (``LOCAL_RANK``); 0 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


OPTION_HINT = "use --device cpu or auto"
"""The fix for commands that take ``--device`` (evaluate, ensemble, analyze-collapse)."""


def resolve_device(name: str = "auto", hint: str = OPTION_HINT) -> torch.device:
    """'auto' picks CUDA (this process's local rank under torchrun) when available, else the CPU.

    Args:
        name: auto, cpu, cuda or cuda:N.
        hint: the fix to suggest when CUDA is asked for but not available (where the device was chosen: a command
            line option or a recipe field).

    Raises:
        MaxMatchError: an unknown device name, or CUDA without a CUDA device.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MaxMatchError(f"unknown device '{name}'", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaxMatchError(f"device '{name}' asked for, but no CUDA device is available", hint=hint)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MaxMatchError(f"device '{name}' asked for, but only {torch.cuda.device_count()} CUDA device(s) exist",
                            hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto")
    return device
