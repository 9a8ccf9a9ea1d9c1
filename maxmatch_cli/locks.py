"""One writer per run folder, index or feature file: a lock file that names its holder.

A command that writes a run folder (``train``), a feature file (``extract-features``, ``features merge``) or an
index folder (``index``) first creates a lock file with ``O_CREAT | O_EXCL``, so exactly one process can create
it, and writes into it who holds it: pid, host, start time and command line (git's ``index.lock``). A second
process that finds the lock gets one error naming the holder. The lock is removed when the holder finishes,
fails or is interrupted (Ctrl-C); a process killed outright (kill -9, power loss) leaves it behind, and the next
process on the same host sees that its pid is gone (or belongs to another process now) and takes it over with a
note. A lock written on another host cannot be checked from here and is never taken over: the error says how to
remove it.

Where the lock lies: :func:`lock_inside` (``FOLDER/.maxmatch.lock``, for a run folder that stays where it is) or
:func:`lock_beside` (``.NAME.lock`` next to a file or folder that is renamed into place when it is complete).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import pid_alive

__all__ = ["Holder", "LockHeld", "WriterLock", "acquire", "hold", "live_holder", "lock_beside", "lock_inside",
           "read_holder"]

FOLDER_LOCK = ".maxmatch.lock"
"""The lock file's name inside a locked folder (:func:`lock_inside`)."""

_UNREADABLE_GRACE_S = 1.0
"""How long a lock file may stay empty or unreadable before it counts as left by a process killed while taking it
(the holder writes its few bytes right after creating the file)."""

_HELD: dict[str, list] = {}
"""Locks this process holds: lock path -> [count, Holder]. Within one process a lock is re-entrant (counted, the
file removed when the count is back at zero): ``maxmatch train`` takes the run folder's lock before ``--overwrite``
removes anything and :func:`~maxmatch_cli.training.trainer.train` takes it again; one command is one process, and
what the lock keeps apart is processes."""


def lock_inside(folder: str | os.PathLike) -> Path:
    """The lock of a folder that stays in place (a run folder): ``FOLDER/.maxmatch.lock``."""
    return Path(folder) / FOLDER_LOCK


def lock_beside(target: str | os.PathLike) -> Path:
    """The lock of a file or folder that is renamed into place when complete: ``.NAME.lock`` next to it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says."""

    pid: int
    host: str
    started: str
    """Local time the lock was taken, ISO 8601 to the second."""
    command: str
    proc_start: int | None = None
    """The process's start time in clock ticks after boot (Linux), to tell a recycled pid from the holder."""

    def describe(self) -> str:
        """``pid 1234 on host H since T (maxmatch train ...)``."""
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()


class LockHeld(MaxMatchError):
    """Another process holds the lock of what this process wants to write."""

    def __init__(self, message: str, hint: str | None, holder: Holder | None):
        super().__init__(message, hint=hint)
        self.holder = holder


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0]).name
    argv[0] = "maxmatch" if prog in ("__main__.py", "maxmatch") else prog
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _proc_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time after boot), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _me() -> Holder:
    return Holder(pid=os.getpid(), host=socket.gethostname(), started=datetime.now().isoformat(timespec="seconds"),
                  command=_command(), proc_start=_proc_start(os.getpid()))


def read_holder(lock_file: str | os.PathLike) -> Holder | None:
    """The holder a lock file names; None when there is no lock file.

    Raises:
        ValueError: the file is empty or unreadable (being written this instant, or left by a killed process).
    """
    try:
        text = Path(lock_file).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(str(exc)) from None
    try:
        data = json.loads(text)
        return Holder(pid=int(data["pid"]), host=str(data["host"]), started=str(data["started"]),
                      command=str(data.get("command", "")), proc_start=data.get("proc_start"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable lock file ({exc})") from None


def _alive(holder: Holder) -> bool:
    """Whether the holder (on this host) still runs: its pid exists, is no zombie and is the same process."""
    if holder.pid <= 0:
        return False
    if holder.pid == os.getpid():  # this very process, but the lock is not in _HELD: an earlier process's pid
        return False
    if not pid_alive(holder.pid):
        return False
    try:
        stat = Path(f"/proc/{holder.pid}/stat").read_text(encoding="ascii", errors="replace")
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False  # killed, not yet reaped
    except (OSError, IndexError):
        pass
    now = _proc_start(holder.pid)
    return holder.proc_start is None or now is None or now == holder.proc_start


def live_holder(lock_file: str | os.PathLike) -> Holder | None:
    """The process holding ``lock_file`` if it is another live process (or one on another host); else None.

    A lock this process holds counts as free here: the caller is the writer.
    """
    key = _key(lock_file)
    if key in _HELD:
        return None
    try:
        holder = read_holder(lock_file)
    except ValueError:
        return None
    if holder is None or (holder.on_this_host() and not _alive(holder)):
        return None
    return holder


def _key(lock_file: str | os.PathLike) -> str:
    path = Path(lock_file)
    try:
        return str(path.parent.resolve() / path.name)
    except OSError:
        return str(path.absolute())


class WriterLock:
    """A lock this process holds; :meth:`release` removes the lock file (once every acquire of it in this process is
    released)."""

    def __init__(self, lock_file: Path, holder: Holder):
        self.path = lock_file
        self.holder = holder
        self._released = False

    def release(self) -> None:
        """Remove the lock file if it is still this process's (idempotent; a forked child never removes it)."""
        if self._released:
            return
        self._released = True
        key = _key(self.path)
        entry = _HELD.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _HELD[key]
        if os.getpid() != self.holder.pid:
            return
        try:
            still_mine = read_holder(self.path) == self.holder
        except ValueError:
            still_mine = False
        if still_mine:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _refusal(target: str, lock_file: Path, holder: Holder | None) -> LockHeld:
    if holder is None:
        return LockHeld(f"{target} is being locked by another process right now ({lock_file} is still empty)",
                        hint="wait for that command to finish, or stop it, then re-run", holder=None)
    message = f"{target} is being written by {holder.describe()}"
    if not holder.on_this_host():
        return LockHeld(f"{message}; that host's processes cannot be checked from here, so the lock is kept",
                        hint=f"wait for it, or stop it on {holder.host}; if it no longer runs there, remove "
                             f"{lock_file} and re-run", holder=holder)
    return LockHeld(message, hint=f"wait for it to finish, or stop it (kill {holder.pid}), then re-run",
                    holder=holder)


def _create(lock_file: Path, me: Holder) -> bool:
    """Create the lock file with ``me`` in it; False if it exists."""
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(me)) + "\n").encode("utf-8"))
    except BaseException:
        os.close(fd)
        lock_file.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialise take-overs of stale locks in one folder, so two processes never both remove one and each
    create their own (an advisory flock on the folder; where the filesystem has none, take-over is unguarded)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _note(text: str) -> None:
    from rich.markup import escape

    from maxmatch_cli.progress import console

    console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)


def _take_over_if_stale(lock_file: Path, target: str, me: Holder) -> bool:
    """Under the folder guard: if the lock's holder is dead (or the file stayed unreadable), replace the lock with
    ours and say so. Returns False when the lock is held (or was just taken by another process)."""
    with _folder_guard(lock_file.parent):
        try:
            holder = read_holder(lock_file)
        except ValueError:
            try:
                age = time.time() - lock_file.stat().st_mtime
            except FileNotFoundError:
                age = None
            if age is not None and age < _UNREADABLE_GRACE_S:
                return False
            holder = None
            reason = f"an unreadable lock file {lock_file} (left by a process killed while taking it)"
        else:
            if holder is None:  # released meanwhile
                return _create(lock_file, me)
            if not holder.on_this_host() or _alive(holder):
                return False
            reason = f"the stale lock of {holder.describe()}, which no longer runs"
        lock_file.unlink(missing_ok=True)
        if not _create(lock_file, me):
            return False
    _note(f"{target}: took over {reason}")
    return True


def acquire(lock_file: str | os.PathLike, target: str | os.PathLike | None = None) -> WriterLock:
    """Take the lock ``lock_file`` for writing ``target`` (named in messages; default the lock's folder).

    Args:
        lock_file: the lock's path (:func:`lock_inside` or :func:`lock_beside`); its folder must exist.
        target: what the lock guards, as messages name it.

    Raises:
        LockHeld: another live process (or one on another host) holds it; the message names it.
        MaxMatchError: the lock file cannot be created (a read-only folder).
    """
    lock_file = Path(lock_file)
    target = str(target if target is not None else lock_file.parent)
    key = _key(lock_file)
    if key in _HELD:  # this process holds it already
        _HELD[key][0] += 1
        return WriterLock(lock_file, _HELD[key][1])
    me = _me()
    for _ in range(40):  # bounded: each round either creates, refuses, or saw the lock vanish in between
        try:
            if _create(lock_file, me) or _take_over_if_stale(lock_file, target, me):
                _HELD[key] = [1, me]
                return WriterLock(lock_file, me)
        except OSError as exc:
            raise MaxMatchError(f"cannot create the lock file {lock_file} for {target}: {exc.strerror or exc}",
                                hint="choose a folder you can write to") from None
        try:
            holder = read_holder(lock_file)
        except ValueError:
            holder = None
            time.sleep(0.05)
            if lock_file.exists():
                continue
        if holder is not None:
            raise _refusal(target, lock_file, holder)
    raise _refusal(target, lock_file, None)


@contextlib.contextmanager
def hold(lock_file: str | os.PathLike, target: str | os.PathLike | None = None) -> Iterator[WriterLock]:
    """:func:`acquire` the lock for the block; it is released however the block ends (error and Ctrl-C too)."""
    lock = acquire(lock_file, target)
    try:
        yield lock
    finally:
        lock.release()
