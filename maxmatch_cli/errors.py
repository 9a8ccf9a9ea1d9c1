"""User-facing errors.

Every mistake a user can make (missing file, wrong shape, unknown recipe key, corrupt HDF5, bad checkpoint)
raises :class:`MaxMatchError`. The CLI catches it and prints one clear message plus the fix, with exit code 2
and no traceback. Library callers get an ordinary exception they can catch.
"""

from __future__ import annotations


class MaxMatchError(Exception):
    """An error caused by user input, with a message naming the input and a hint naming the fix."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
