"""Rich progress bars and console shared by every long-running command."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# Logs (CI, clusters) are not terminals: give tables room instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


class RateColumn(ProgressColumn):
    """Throughput in the task's own unit (``fields['unit']``, e.g. pairs/s or images/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s" if speed >= 10 else f"{speed:.2f} {unit}/s",
                    style="progress.data.speed")


def make_progress(transient: bool = False) -> Progress:
    """A progress bar with count, throughput, elapsed time, ETA and a free-text status field."""
    return Progress(
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
        # A transient bar outside a terminal would only leave blank lines in the log.
        disable=os.environ.get("MAXMATCH_NO_PROGRESS") == "1" or (transient and not console.is_terminal),
    )
