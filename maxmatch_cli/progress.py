"""Rich progress bars and console shared by every long-running command."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# Logs (CI, clusters) are not terminals: give tables room instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
_log = Console(stderr=True, highlight=False)
"""Where the plain progress lines go: stderr, so that stdout stays a command's result (``query --json``)."""


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (``fields['unit']``, e.g. pairs/s or images/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s" if speed >= 10 else f"{speed:.2f} {unit}/s",
                    style="progress.data.speed")


LOG_INTERVAL_S = 10.0
"""Seconds between the plain progress lines of a long step where the output is no terminal
(``MAXMATCH_LOG_INTERVAL`` overrides it)."""


class _LoggedProgress(Progress):
    """A transient bar that, where the output is no terminal (a log), prints a plain line when a task starts,
    every :data:`LOG_INTERVAL_S` seconds and when it ends (on stderr), instead of nothing for minutes."""

    def __init__(self, *columns, plain_lines: bool = False, **kwargs):
        super().__init__(*columns, **kwargs)
        self._plain_lines = plain_lines
        self._interval = float(os.environ.get("MAXMATCH_LOG_INTERVAL", LOG_INTERVAL_S))
        self._last_line: dict = {}

    def add_task(self, description, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        if self._plain_lines and self._tasks[task_id].visible:
            total = self._tasks[task_id].total
            unit = self._tasks[task_id].fields.get("unit", "")
            _log.print(f"{description}: started" + (f", {total:,.0f} {unit}".rstrip() if total else ""),
                               soft_wrap=True, markup=False, highlight=False)
            self._last_line[task_id] = time.monotonic()
        return task_id

    def update(self, task_id, *args, **kwargs):
        super().update(task_id, *args, **kwargs)
        self._maybe_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)

    def _maybe_line(self, task_id) -> None:
        if not self._plain_lines or task_id not in self._last_line:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if not task.finished and now - self._last_line[task_id] < self._interval:
            return
        if task.finished:
            del self._last_line[task_id]  # one closing line
        else:
            self._last_line[task_id] = now
        unit = task.fields.get("unit", "it")
        text = f"{task.description}: {task.completed:,.0f}"
        if task.total:
            text += f"/{task.total:,.0f} {unit} ({100 * task.completed / task.total:.0f}%)"
        speed = task.finished_speed or task.speed
        if speed:
            text += f"  {speed:,.0f} {unit}/s"
        if task.finished:
            text += f"  done in {task.elapsed or 0:.0f} s"
        elif speed and task.total:
            text += f"  eta {(task.total - task.completed) / speed:.0f} s"
        status = str(task.fields.get("status", "")).strip()
        _log.print(text + (f"  {status}" if status else ""), soft_wrap=True, markup=False, highlight=False)


def make_progress(transient: bool = False) -> Progress:
    """A progress bar with count, throughput, elapsed time, ETA and a free-text status field.

    A transient bar is hidden outside a terminal, which gets a plain line now and then instead
    (:class:`_LoggedProgress`); training prints its own lines."""
    quiet = os.environ.get("MAXMATCH_NO_PROGRESS") == "1"
    return _LoggedProgress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
        # A transient bar outside a terminal would only leave blank lines in the log: plain lines instead.
        disable=quiet or (transient and not console.is_terminal),
        plain_lines=transient and not quiet and not console.is_terminal,
    )
