"""Writing result files: whole or not at all, and with the permissions any other file would get.

Every file maxmatch writes (checkpoints, evaluation JSON/CSV, embedding caches, collapse reports, feature stores)
is first written under a temporary name in the target folder and then renamed onto its path, so a reader never
sees half a file. :func:`tempfile.mkstemp` creates its file with mode 0600 whatever the umask; :func:`publish`
gives it ``0o666 & ~umask`` before the rename, as ``open(path, "w")`` would have.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from maxmatch_cli.errors import MaxMatchError

__all__ = ["atomic_write", "current_umask", "DiskFullError", "escapes_folder", "file_inside",
           "file_mode", "format_bytes", "free_space", "is_disk_full", "pid_alive", "publish", "read_history",
           "read_jsonl", "remove_stale_temps", "require_space", "stale_temp", "reserve_space", "TEMP_NAME", "write_text"]


def escapes_folder(name: str) -> bool:
    """Whether ``name``, a path a file (manifest, feature file, caption file) gives relative to a folder, could
    leave that folder as written: empty, absolute (``/x``, ``C:\\x``, ``\\\\host\\x``) or with a ``..`` part.

    Cheap (no file system access), for checking many names at once; :func:`file_inside` also follows links.
    """
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        return True
    unified = name.replace("\\", "/")
    drive = len(unified) > 2 and unified[0].isalpha() and unified[1:3] == ":/"
    return unified.startswith("/") or drive or ".." in unified.split("/")


def file_inside(folder: str | os.PathLike, name: str, *, named_by: str, hint: str,
                follow_links: bool = True) -> Path:
    """``folder / name`` where ``name`` is a path that ``named_by`` (a manifest, a feature file, a caption file)
    gives relative to ``folder``: refused unless it stays inside the folder.

    Args:
        folder: the folder the name is relative to.
        name: the relative path as the file gives it.
        named_by: what names it, for the message (e.g. ``"the manifest of index runs/idx"``).
        hint: the fix, for the message.
        follow_links: also resolve symbolic links and refuse a path whose links lead out of the folder (for
            folders that are shipped artefacts, such as an index); the folder itself may be a link.

    Raises:
        MaxMatchError: ``name`` is empty, absolute, has a ``..`` part, or (``follow_links``) resolves outside.
    """
    if escapes_folder(name):
        raise MaxMatchError(f"{named_by} names the file {name!r}, which is not a path inside {folder}",
                            hint=hint)
    path = Path(folder) / name
    if follow_links:
        root = Path(folder).resolve()
        try:
            path.resolve().relative_to(root)
        except ValueError:
            raise MaxMatchError(f"{named_by} names the file {name!r}, a link that leads out of {folder} "
                                f"(to {path.resolve()})", hint=hint) from None
    return path


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], size: int | None = None) -> Path:
    """Call ``write(tmp_path)``, then :func:`publish` the temporary file onto ``path``.

    The temporary file lies in ``path``'s folder (created if needed) and is removed if ``write`` fails.

    Args:
        path: the file to write.
        write: writes the whole file to the temporary path it is given.
        size: the bytes ``write`` will write, if known: refused before writing when the disk has less free.

    Raises:
        MaxMatchError: the folder cannot be created or written to; the disk is full (the message names the file,
            the space it needs and the space free; whatever was there before stays).
    """
    path = Path(path)
    if path.is_dir():
        raise MaxMatchError(f"{path} is a folder; an output file cannot replace it",
                            hint=f"give a file name, e.g. {path / 'results'}{path.suffix or ''}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name lets a later run tell a temporary file left by a killed process.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path, size) from None
        raise MaxMatchError(f"cannot write to {path.parent}: {exc.strerror}",
                            hint="choose an output path in a folder you can write to") from None
    os.close(fd)
    try:
        if size is not None:
            require_space(path, size)
        write(Path(tmp))
        return publish(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, MaxMatchError) and is_disk_full(exc):
            raise DiskFullError(path, size) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp$")
"""A temporary file of :func:`atomic_write`: ``.NAME.PID.XXXXXXXX.tmp`` (without ``PID`` from older versions)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, names: tuple[str, ...] = (),
                       older_than: float | None = None) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed.

    A temporary file is stale when the process its name records is gone (on this host), or, for a name without a
    pid (older versions), when it is one of ``names``' and was last written before ``older_than`` (a time since
    the epoch: when the caller took the lock that makes it the only writer of those files). Nothing else is touched: not another live process's
    temporary file, nor a file that merely looks like one.

    Returns:
        The files removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if stale_temp(path, names, older_than):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def stale_temp(path: Path, names: tuple[str, ...] = (), older_than: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` left by a killed process (the rule of
    :func:`remove_stale_temps`)."""
    match = TEMP_NAME.match(path.name)
    if match is None or not path.is_file() or path.is_symlink():
        return False
    pid = match["pid"]
    if pid is not None:  # a live writer's file stays, whatever its age
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    try:
        return older_than is not None and match["name"] in names and path.stat().st_mtime < older_than
    except OSError:
        return False


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines history that a run appends to (``steps.jsonl``, ``metrics.jsonl``), and the
    1-based numbers of the lines that are not one whole JSON object: a line cut short by a killed run, or one with a
    later record glued onto it (that record, whole at the line's end, is kept; the torn part never enters a record).
    A missing file has no records."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    records, torn = [], []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
            glued = _glued_record(line)
            if glued is not None:
                records.append(glued)
    return records, torn


def read_history(path: str | os.PathLike, warn: Callable[[str], object] = print) -> list[dict]:
    """The records of a run's history file (``steps.jsonl``, ``metrics.jsonl``) for a report: in step order, one
    per step (a step logged twice, by a run resumed after a crash without cutting its history, keeps the later
    record), torn lines skipped; ``warn`` is told of each torn line (``FILE:LINE``) and of steps logged twice."""
    path = Path(path)
    records, torn = read_jsonl(path)
    for number in torn:
        warn(f"skipped {path}:{number}: not one whole JSON record (a line torn by a killed run); "
             f"`maxmatch train --resume` removes it")
    by_step: dict[int, dict] = {}
    unkeyed = []
    for record in records:
        step = record.get("step")
        if isinstance(step, int):
            by_step.pop(step, None)
            by_step[step] = record
        else:
            unkeyed.append(record)
    twice = len(records) - len(unkeyed) - len(by_step)
    if twice:
        warn(f"{path} logs {twice} step(s) twice (a run resumed after a crash); showing the later record of each")
    return sorted(by_step.values(), key=lambda r: r["step"]) + unkeyed


def _glued_record(line: str) -> dict | None:
    """The whole record at the end of a torn line (flat records: a ``{`` inside one starts no other record)."""
    start = line.find("{", 1)
    while start != -1:
        try:
            record = json.loads(line[start:])
        except ValueError:
            start = line.find("{", start + 1)
            continue
        return record if isinstance(record, dict) else None
    return None


# -------------------------------------------------------------------------------------------------- a full disk
# A write that runs out of space must end in one message naming the file, the space it needed and the space free
# (exit 2), never in a raw library error, a crash or a SIGBUS. Sizes known in advance are checked before writing
# (:func:`require_space`) or reserved (:func:`reserve_space`); what still fails is recognised by
# :func:`is_disk_full`, whichever library raised it (OSError, h5py's RuntimeError, safetensors' SafetensorError).

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "errno = 28", "errno = 122", "storagefull",
                    "quotaexceeded", "filesystemquotaexceeded", "[errno 28]", "[errno 122]")
DISK_FULL_HINT = "free some space (or choose an output on a larger disk), then run the same command again"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says that the disk (or the user's quota) is full, as an errno or in its text."""
    if isinstance(exc, DiskFullError) or getattr(exc, "errno", None) in DISK_FULL_ERRNOS:
        return True
    if isinstance(exc, MaxMatchError):
        return False
    text = str(exc).lower()
    return any(t in text for t in _DISK_FULL_TEXTS)


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free for this user on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: int | None) -> str:
    """``1536`` → ``"1.5 KiB"`` (``"an unknown amount"`` for None)."""
    if n is None:
        return "an unknown amount"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value):,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable


class DiskFullError(MaxMatchError):
    """A write that did not fit on its disk: ``path``, the bytes it ``needed`` (None: unknown) and those ``free``."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, hint: str = DISK_FULL_HINT,
                 free: int | None = None):
        self.path, self.needed, self.free = Path(path), needed, free_space(path) if free is None else free
        need = f"needs about {format_bytes(needed)}" if needed else "needs more space"
        super().__init__(f"not enough disk space to write {path}: it {need}, {format_bytes(self.free)} free on "
                         f"{self.path.absolute().parent}", hint=hint)


def require_space(path: str | os.PathLike, needed: int, hint: str = DISK_FULL_HINT) -> None:
    """Refuse a write of ``needed`` bytes to ``path`` before it starts when the file system has less free.

    Raises:
        DiskFullError: the file, the bytes it needs and those free.
    """
    free = free_space(path)
    if free is not None and free < needed:
        raise DiskFullError(path, needed, hint)


def reserve_space(fd: int, offset: int, length: int) -> None:
    """Allocate the blocks of ``[offset, offset + length)`` of an open file, so that later writes into that range
    (above all through a memory map, where a full disk is a SIGBUS) cannot run out of space.

    ``posix_fallocate`` where the file system has it, else zeros written in 1 MiB pieces: only use this on a range
    that holds nothing yet.

    Raises:
        OSError: the space is not there (errno ENOSPC or EDQUOT) or the file cannot be written.
    """
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    piece = b"\0" * (1 << 20)
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, piece[: min(len(piece), end - offset)], offset)
        offset += n
    os.fsync(fd)
