"""What a training run reports as it goes, in one place: ``steps.jsonl`` (one raw record per step),
``metrics.jsonl`` (one record per epoch, with the validation metrics), the trackers of ``train.report_to``, the
progress bar, and plain lines where the output is no terminal (CI, clusters).

Only rank 0 writes; on the other ranks a :class:`RunLog` keeps the smoothed losses and otherwise does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.progress import Progress

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import read_jsonl, write_text
from maxmatch_cli.progress import console
from maxmatch_cli.training.tracking import Trackers

__all__ = ["RunLog", "cut_history", "flush_steps"]


def cut_history(out_dir: Path, global_step: int, history: list[dict]) -> list[str]:
    """Cut a resumed run's history back to its checkpoint, so that no step or epoch is logged twice.

    A run killed (kill -9, power loss) after its last checkpoint leaves in ``steps.jsonl`` the steps past it, in
    ``metrics.jsonl`` perhaps an epoch whose checkpoint was never written, and in either a torn last line (the
    resumed run would glue its first record onto it). ``steps.jsonl`` keeps its whole records up to
    ``global_step``; ``metrics.jsonl`` becomes the checkpoint's own ``history``. Each is rewritten whole (temporary
    file and rename), and only when it changes.

    Returns:
        One line per file cut, saying what was dropped.
    """
    notes = []
    steps_path, metrics_path = out_dir / "steps.jsonl", out_dir / "metrics.jsonl"
    if steps_path.exists():
        records, torn = read_jsonl(steps_path)
        kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= global_step]
        if torn or len(kept) < len(records):
            write_text(steps_path, "".join(json.dumps(r) + "\n" for r in kept))
            notes.append(f"{steps_path}: dropped {len(records) - len(kept)} record(s) past step {global_step}"
                         + (f" and {len(torn)} torn line(s)" if torn else ""))
    if metrics_path.exists() or history:
        text = "".join(json.dumps(r) + "\n" for r in history)
        old = metrics_path.read_text(encoding="utf-8", errors="replace") if metrics_path.exists() else ""
        if old != text:
            records, torn = read_jsonl(metrics_path)
            write_text(metrics_path, text)
            notes.append(f"{metrics_path}: kept the checkpoint's {len(history)} epoch record(s) of "
                         f"{len(records)}" + (f", dropped {len(torn)} torn line(s)" if torn else ""))
    return notes


def flush_steps(pending: list[tuple[int, float, dict[str, torch.Tensor]]], running: dict[str, float], epoch: int,
                steps_path: Path | None, trackers: Trackers | None = None) -> None:
    """Read back the loss parts of the steps since the last log step (one device sync), check them, update the
    smoothed values in ``running`` and append one raw record per step to ``steps.jsonl`` (and the same values,
    ``lr`` and ``loss/<part>`` at the step, to ``trackers``).

    Raises:
        MaxMatchError: a loss became NaN or infinite (the step is named; no checkpoint of it is written).
    """
    names = list(pending[0][2])
    values = torch.stack([torch.stack([parts[n].float() for n in names]) for _, _, parts in pending]).tolist()
    lines, logged = [], []
    for (step, lr, _), row in zip(pending, values):
        record = dict(zip(names, row))
        if not math.isfinite(record["total"]):
            raise MaxMatchError(f"loss became {record['total']} at step {step}",
                                hint="lower optim.lr or enable optim.grad_clip")
        for k, v in record.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        scalars = {"lr": lr, **{f"loss/{k}": v for k, v in record.items()}}
        lines.append(json.dumps({"step": step, "epoch": epoch + 1, **scalars}))
        logged.append((step, scalars))
    if steps_path is not None:
        with steps_path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    if trackers:
        for step, scalars in logged:
            trackers.log(scalars, step)


class RunLog:
    """The run's logs: per-step losses, per-epoch records, validation lines and the progress bar.

    Args:
        out_dir: The run folder (``steps.jsonl`` and ``metrics.jsonl`` go there).
        trackers: Opened trackers (an empty :class:`Trackers` on ranks other than 0).
        is_main: Whether this process writes (rank 0).
        total_steps: Steps of the whole run.
        epochs: ``train.epochs``.
        log_every: ``train.log_every``: steps between read-backs of the losses.
        global_batch: Items per step over all ranks (the progress bar counts items).
        unit: 'images' or 'pairs', what an item is.
        start_step: The global step the run starts (or resumes) from.
    """

    def __init__(self, out_dir: Path, trackers: Trackers, *, is_main: bool, total_steps: int, epochs: int,
                 log_every: int, global_batch: int, unit: str, start_step: int):
        self.trackers = trackers
        self.is_main = is_main
        self.total_steps, self.epochs, self.log_every = total_steps, epochs, log_every
        self.global_batch, self.unit, self.start_step = global_batch, unit, start_step
        self.steps_path = out_dir / "steps.jsonl"
        self.history_path = out_dir / "metrics.jsonl"
        self.start_time = time.time()
        self.running: dict[str, float] = {}
        """Smoothed loss parts of the current epoch."""
        self._pending: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # steps not yet read back
        self._progress: Progress | None = None
        self._task = None

    def elapsed(self) -> float:
        """Seconds since the run (or this resumed part of it) started."""
        return time.time() - self.start_time

    def attach(self, progress: Progress, visible: bool, completed_steps: int) -> None:
        """Show the run on ``progress`` (a bar counting items, with the epoch and smoothed loss as status)."""
        self._progress = progress
        self._task = progress.add_task("training", total=self.total_steps * self.global_batch,
                                       completed=completed_steps * self.global_batch, unit=self.unit, status="",
                                       visible=visible and self.is_main)

    def start_epoch(self, running: dict[str, float] | None = None) -> None:
        """Start the smoothed losses afresh, or from ``running`` (a run resumed mid-epoch: the saved values)."""
        self.running = dict(running or {})
        self._pending = []

    def record(self, step: int, lr: float, parts: dict[str, torch.Tensor]) -> None:
        """Keep a finished step's losses (part of the step itself: a Ctrl-C after it still writes them)."""
        self._pending.append((step, lr, parts))

    def step(self, step: int, epoch: int, last_step: bool) -> None:
        """After a :meth:`record`-ed step: its losses stay on the device until the next log step (or
        ``last_step``): reading them every step would make the host wait for the GPU at every step."""
        if step % self.log_every == 0 or last_step:
            self._flush(epoch)
            self._progress.update(self._task, status=f"epoch {epoch + 1}/{self.epochs} "
                                  f"loss {self.running['total']:.3f}")
        self._progress.update(self._task, advance=self.global_batch)
        if not console.is_terminal and self.is_main and step % self.log_every == 0:
            # Logs (CI, clusters) get a plain line where a terminal gets the live bar.
            elapsed = max(self.elapsed(), 1e-9)
            done = step - self.start_step
            eta = (self.total_steps - step) * elapsed / max(done, 1)
            console.print(f"step {step}/{self.total_steps}  epoch {epoch + 1}  "
                          f"loss {self.running['total']:.4f}  {done * self.global_batch / elapsed:,.0f} "
                          f"{self.unit}/s  eta {eta / 60:.1f} min")

    def end_epoch(self, epoch: int) -> None:
        """Record the steps not yet read back (an epoch cut short by ``train.max_steps`` or a Ctrl-C has some)."""
        if self._pending:
            self._flush(epoch)

    def _flush(self, epoch: int) -> None:
        flush_steps(self._pending, self.running, epoch, self.steps_path if self.is_main else None, self.trackers)
        self._pending = []

    def validation(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        """Send the validation metrics to the trackers and print them."""
        self.trackers.log({f"val/{k}": v for k, v in metrics.items()}, step)
        self._progress.console.print(
            f"epoch {epoch:>3}  step {step:>6}  "
            f"loss {self.running.get('total', float('nan')):.4f}  val rsum {metrics['rsum']:.2f}  "
            f"i2t R@1 {metrics['i2t_r1']:.1f}  t2i R@1 {metrics['t2i_r1']:.1f}")

    def epoch_record(self, epoch: int, step: int, lr: float) -> dict[str, float]:
        """The epoch's record for ``metrics.jsonl`` (validation metrics are added to it)."""
        return {"epoch": epoch, "step": step, "lr": lr, **{f"loss/{k}": v for k, v in self.running.items()}}

    def write_record(self, record: dict[str, float]) -> None:
        """Append an epoch's record to ``metrics.jsonl``."""
        if self.is_main:
            with self.history_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Close the trackers (flushes their files; also after Ctrl-C or an error)."""
        self.trackers.close()
