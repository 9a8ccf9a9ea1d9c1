"""What a run saves to resume, and how it is put back: the one place that defines ``--resume``.

``last.safetensors`` holds, besides the recipe and the vocabulary:

- the weights and the optimiser state (its parameter groups carry each group's ``base_lr``);
- :class:`TrainState`: epoch, step within the epoch, global step, best validation RSUM and the metric history.
  The learning rate is not stored: it is a function of the global step (:mod:`maxmatch_cli.training.schedule`);
  nor is the data order: the sampler's permutation is a function of the seed and the epoch, and it starts at the
  saved step within the epoch;
- the RNG states at the last step boundary (:func:`rng_state`): the CPU's and the training GPU's.

A resumed run takes the checkpoint's recipe (only the run's length and ``train.report_to`` may change), and
restores the RNG states at the same point of the loop as the interrupted run reached them (see
:func:`restore_training_state`). Under torchrun the checkpoint holds rank 0's states; the other ranks derive
their own streams from them (:func:`decorrelate_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maxmatch_cli.config.recipes import Recipe
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models.checkpoint import Checkpoint, load_checkpoint, load_model_state
from maxmatch_cli.progress import console
from maxmatch_cli.training import distributed as dist

__all__ = ["TrainState", "Resumed", "load_resume", "restore_training_state", "rng_state", "set_rng_state",
           "decorrelate_ranks"]


@dataclass
class TrainState:
    """Where a run stands; saved as a checkpoint's ``train_state`` (field order is the JSON's key order)."""

    epoch: int = 0
    """Epochs completed."""
    step_in_epoch: int = 0
    """Steps taken in the current epoch (0 at an epoch boundary)."""
    global_step: int = 0
    """Steps taken in the whole run."""
    best_rsum: float | None = None
    """Best validation RSUM so far (None before the first validation)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One record per epoch (or per run cut short by ``train.max_steps``), as written to ``metrics.jsonl``."""
    running_loss: dict[str, float] = field(default_factory=dict)
    """Mid-epoch: the epoch's smoothed loss parts so far (its ``metrics.jsonl`` record continues them)."""
    epoch_end_due: bool = False
    """The epoch's steps are done (``epoch`` and ``step_in_epoch`` already count them) but its end is not: a run
    interrupted during its validation or checkpoint saving. A resumed run does the end first (validation, the
    ``metrics.jsonl`` record, ``best`` and ``last``). Checkpoints without the key (older ones) mean False."""

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``train_state`` (``epoch_end_due`` only when set, so other checkpoints stay as they
        were)."""
        saved = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "best_rsum": self.best_rsum, "history": self.history, "running_loss": self.running_loss}
        return {**saved, "epoch_end_due": True} if self.epoch_end_due else saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """A checkpoint's ``train_state``; keys it lacks keep their defaults."""
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class Resumed:
    """A run to continue: the checkpoint's recipe, vocabulary, state and the checkpoint itself."""

    recipe: Recipe
    vocab_json: str | None
    state: TrainState
    checkpoint: Checkpoint


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def load_resume(last_path: Path, recipe: Recipe) -> Resumed:
    """Read ``last.safetensors`` to continue a run; warn where this run's recipe or world size differ.

    Raises:
        MaxMatchError: there is no checkpoint to resume from.
    """
    if not last_path.is_file():
        raise MaxMatchError(f"--resume given but {last_path} does not exist",
                            hint="start without --resume, or point --out at the run to continue")
    ckpt = load_checkpoint(last_path)
    # The checkpoint's recipe, seed and step win; only the length of the run may change (to extend it), and
    # where its curves go (train.report_to: this run's value, which changes no result).
    resumed = ckpt.recipe.replace(**{"train.epochs": recipe.train.epochs,
                                     "train.max_steps": recipe.train.max_steps,
                                     "train.report_to": recipe.train.report_to})
    differing = _differences(resumed.to_dict(), recipe.to_dict())
    if differing:
        console.print(f"[yellow]warning:[/] ignoring recipe values that differ from the checkpoint's "
                      f"({', '.join(differing)}); resuming with the checkpoint's recipe")
    saved_world = ckpt.provenance.get("world_size", 1)
    if saved_world != dist.world_size():
        console.print(f"[yellow]warning:[/] the checkpoint was trained by {saved_world} process(es), this run has "
                      f"{dist.world_size()}: train.batch_size is per process, so the global batch, the steps per "
                      f"epoch and the data order change from here on")
    return Resumed(resumed, ckpt.vocab_json, TrainState.from_dict(ckpt.train_state), ckpt)


def restore_training_state(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           device: torch.device, state: TrainState) -> dict[str, torch.Tensor] | None:
    """Load the weights and the optimiser state, and restore the RNG states or say when to.

    The RNG states are those at the checkpoint's step boundary. At an epoch boundary they come before the
    epoch's DataLoader iterator is made (which draws a seed from the CPU generator), so they are restored now;
    mid-epoch, after it, as in the run that was interrupted: then they are returned, for the trainer to restore
    once it has made the iterator.
    """
    load_model_state(model, ckpt)
    try:
        optimizer.load_state_dict(ckpt.optim_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise MaxMatchError(f"checkpoint {ckpt.path}: its optimiser state does not fit the model of its recipe "
                            f"({exc})", hint="the file is damaged; start the run afresh in another --out folder") \
            from None
    if state.step_in_epoch == 0:
        set_rng_state(ckpt.rng_state, device)
        return None
    return ckpt.rng_state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a training step draws from: the CPU's (data augmentation with num_workers=0, dropout on the
    CPU) and the training GPU's (dropout on the GPU), named as in a checkpoint's ``rng.`` tensors."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        states[f"cuda{index}"] = torch.cuda.get_rng_state(index)
    return states


def set_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore a checkpoint's states (rank 0's), then give the other ranks their own streams."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if f"cuda{index}" in states:
            torch.cuda.set_rng_state(states[f"cuda{index}"], index)
    decorrelate_ranks()


def decorrelate_ranks() -> None:
    """Every rank holds the same RNG state (one seed, or rank 0's checkpoint); without this each rank would draw the
    same dropout masks and, through the DataLoader workers' seeds, the same word and region dropout as every
    other rank. Ranks other than 0 reseed from a draw plus their rank; rank 0, and so a single process, keeps its
    stream."""
    if dist.rank():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + dist.rank())
