"""Writing result files: whole or not at all, and with the permissions any other file would get.

Every file maxmatch writes (checkpoints, evaluation JSON/CSV, embedding caches, collapse reports, feature stores)
is first written under a temporary name in the target folder and then renamed onto its path, so a reader never
sees half a file. :func:`tempfile.mkstemp` creates its file with mode 0600 whatever the umask; :func:`publish`
gives it ``0o666 & ~umask`` before the rename, as ``open(path, "w")`` would have.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from maxmatch_cli.errors import MaxMatchError

__all__ = ["atomic_write", "current_umask", "file_mode", "publish", "write_text"]


def current_umask() -> int:
    """The process's umask, read without a window in which it is relaxed.

    Linux reports it in /proc/self/status. Elsewhere it can only be read by setting it; the value set meanwhile is
    0o077, so a file another thread creates in that instant gets narrower permissions, never wider ones.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a new regular file gets under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~current_umask()


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give a finished temporary file ordinary permissions and rename it onto ``path`` (atomic on one filesystem)."""
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return Path(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then :func:`publish` the temporary file onto ``path``.

    The temporary file lies in ``path``'s folder (created if needed) and is removed if ``write`` fails.

    Raises:
        MaxMatchError: the folder cannot be created or written to.
    """
    path = Path(path)
    if path.is_dir():
        raise MaxMatchError(f"{path} is a folder; an output file cannot replace it",
                            hint=f"give a file name, e.g. {path / 'results'}{path.suffix or ''}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MaxMatchError(f"cannot write to {path.parent}: {exc.strerror}",
                            hint="choose an output path in a folder you can write to") from None
    os.close(fd)
    try:
        write(Path(tmp))
        return publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
