"""User-facing errors.

Every mistake a user can make (missing file, wrong shape, unknown recipe key, corrupt HDF5, bad checkpoint)
raises :class:`MaxMatchError`. The CLI catches it and prints one clear message plus the fix, with exit code 2
and no traceback. Library callers get an ordinary exception they can catch.
"""

from __future__ import annotations

# A DataLoader worker cannot pass its exception on: torch re-raises ``MaxMatchError(text)`` in the main process,
# where text is "Caught MaxMatchError in DataLoader worker process N.\nOriginal Traceback ...", ending in
# ``maxmatch_cli.errors.MaxMatchError: <str(exc)>``. The constructor recovers the message and hint from it.
_WORKER_PREFIX = "Caught MaxMatchError in DataLoader worker"
_HINT_SEPARATOR = "\n  hint: "


def _from_worker(text: str) -> tuple[str, str | None]:
    marker = f"\n{__name__}.MaxMatchError: "  # the traceback's last line starts with it
    if marker not in text:
        return text, None
    message, _, hint = text.rpartition(marker)[2].rstrip("\n").partition(_HINT_SEPARATOR)
    return message, hint or None


class MaxMatchError(Exception):
    """An error caused by user input, with a message naming the input and a hint naming the fix."""

    def __init__(self, message: str, hint: str | None = None):
        if hint is None and message.startswith(_WORKER_PREFIX):
            message, hint = _from_worker(message)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}{_HINT_SEPARATOR}{self.hint}"


def first_few(items: list[str], n: int = 3) -> str:
    """The first ``n`` items joined with '; ', and how many more there are: for messages about many bad inputs."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more
