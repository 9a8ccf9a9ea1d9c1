"""Experiment tracking without a network: training curves for TensorBoard and (offline) Weights & Biases.

``metrics.jsonl`` and ``steps.jsonl`` stay the source of truth; the trackers here receive the same values
(``train.report_to``): the raw loss parts of every step (``loss/<part>``) and its learning rate (``lr``) at the
global step, read back from the device once per ``train.log_every`` steps like ``steps.jsonl``, and each
validation's metrics (``val/<metric>``). Only rank 0 logs. Missing packages fail when the run starts, before
any training, with the command that installs them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

from maxmatch_cli.errors import MaxMatchError

BACKENDS = ("jsonl", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker(Protocol):
    """Receives scalars keyed by tag at a global step."""

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def backends(report_to: str) -> list[str]:
    """The backends of a ``train.report_to`` value besides jsonl (which is always written), in order, once each."""
    names = [name.strip() for name in report_to.split(",")]
    for name in names:
        if name not in BACKENDS:
            raise MaxMatchError(f"recipe value train.report_to names an unknown backend '{name}'",
                                hint=f"use a comma-separated list of {', '.join(BACKENDS)}")
    return [name for name in dict.fromkeys(names) if name != "jsonl"]


def tracker_folders(report_to: str, out_dir: Path) -> list[Path]:
    """The folders under ``out_dir`` that the trackers of ``report_to`` wrote (those that exist): each writes
    ``OUT/<its name>`` (TensorBoard's log_dir; wandb.init(dir=OUT) makes OUT/wandb)."""
    folders = [Path(out_dir) / name for name in backends(report_to)]
    return [folder for folder in folders if folder.is_dir()]


def check_available(report_to: str) -> list[str]:
    """The extra backends ``report_to`` asks for, after checking that their packages are installed.

    Raises:
        MaxMatchError: a backend's package is missing (the hint names the pip command).
    """
    names = backends(report_to)
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise MaxMatchError(f"train.report_to asks for {name} but the '{_PACKAGES[name]}' package is not "
                                f"installed", hint=f"pip install {_PACKAGES[name]} (or drop {name} from "
                                f"train.report_to; metrics.jsonl and steps.jsonl are always written)")
    return names


class TensorBoardTracker:
    """Event files under ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``).

    ``purge_step``: a resumed run's first step; events a crashed run logged from there on are hidden.
    """

    def __init__(self, out_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(out_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbTracker:
    """An offline Weights & Biases run in ``OUT/wandb`` (upload it later with ``wandb sync OUT/wandb/offline-run-*``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any] | None = None, name: str | None = None):
        import wandb

        os.environ["WANDB_MODE"] = "offline"
        self._run = wandb.init(mode="offline", dir=str(out_dir), config=config, name=name, project="maxmatch")

    def log(self, values: Mapping[str, float], step: int) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """Every tracker a run opened, as one; with none (jsonl only, or ranks other than 0) it does nothing.

    Each tracker is closed even when another one's close fails.
    """

    def __init__(self, trackers: list[Tracker] | None = None):
        self._trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tracker in self._trackers:
            tracker.log(values, step)

    def close(self) -> None:
        trackers, self._trackers = self._trackers, []
        error = None
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as exc:  # close the others first
                error = error or exc
        if error is not None:
            raise error


def open_trackers(names: list[str], out_dir: Path, config: dict[str, Any] | None = None,
                  name: str | None = None, purge_step: int | None = None) -> Trackers:
    """Open the trackers of ``names`` (from :func:`check_available`) writing under ``out_dir``."""
    opened: list[Tracker] = []
    try:
        for backend in names:
            if backend == "tensorboard":
                opened.append(TensorBoardTracker(out_dir, purge_step=purge_step))
            elif backend == "wandb":
                opened.append(WandbTracker(out_dir, config=config, name=name))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
