"""The learning-rate schedule: a factor of each parameter group's base learning rate at every step.

Linear warm-up over ``optim.warmup_steps``, then ``optim.schedule``: 'cosine' per iteration over the run's total
steps (SetDiv's schedule; the warm-up does not shift it), 'step' (× ``gamma`` every ``step_epochs`` epochs, the
paper's Appendix B) or 'constant'. The factor is a pure function of the global step, so a resumed run needs no
scheduler state: its step and the run's length give the same factor as in the run that stopped.
"""

from __future__ import annotations

import math

import torch

from maxmatch_cli.config.recipes import Recipe

__all__ = ["lr_factor", "remember_base_lr", "set_lr"]


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Learning-rate multiplier at a global step: linear warm-up, then cosine / step / constant.

    Args:
        step: Global step about to be taken, from 0.
        total_steps: Steps of the whole run (the cosine's length).
        steps_per_epoch: Steps in one epoch (the step schedule counts epochs).
        recipe: Reads ``optim.warmup_steps``, ``optim.schedule``, ``optim.gamma`` and ``optim.step_epochs``.

    Returns:
        The factor by which each parameter group's base learning rate is multiplied.
    """
    o = recipe.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if o.schedule == "step":
        return o.gamma ** ((step // max(steps_per_epoch, 1)) // o.step_epochs)
    return 1.0


def remember_base_lr(optimizer: torch.optim.Optimizer) -> None:
    """Keep each group's learning rate as ``base_lr`` (it travels in the optimiser's state dict, so a resumed run
    scales the same bases)."""
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its base times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
