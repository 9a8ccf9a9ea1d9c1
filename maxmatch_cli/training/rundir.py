"""Run folders: a new training run never silently replaces an earlier one.

A run folder holds ``best.safetensors``, ``last.safetensors``, ``metrics.jsonl``, ``steps.jsonl``,
``recipe.toml`` and the embedding cache ``embeddings/`` that ``evaluate`` keeps next to the checkpoints. Starting ``train`` on a folder
that holds any of them is refused unless the run is continued (``--resume``) or replaced (``--overwrite``);
replacing removes exactly those files, never anything else a user keeps there.

One process writes a run folder at a time: ``train`` holds its lock (``.maxmatch.lock`` inside it, naming the
process; :mod:`maxmatch_cli.locks`) from before ``--overwrite`` removes anything until the run ends, so a second
``train`` on the same folder is refused with the holder's pid, host and command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.locks import hold, lock_inside

__all__ = ["RUN_FILES", "discard_unsaved_run", "existing_run_files", "prepare_run_dir", "run_lock"]

RUN_FILES = ("best.safetensors", "last.safetensors", "metrics.jsonl", "steps.jsonl", "recipe.toml")
"""Files a training run writes into its folder."""
EMBEDDINGS_DIR = "embeddings"
"""Embedding cache next to the checkpoints (:func:`maxmatch_cli.evaluation.cache.embeddings_cache_path`)."""


def _cache_files(out: Path) -> list[Path]:
    """The run's cached embeddings: ``embeddings/{best,last}.<split>.<hash>.safetensors`` that this run's own
    checkpoints produced (the cache key inside names the checkpoint), and temporaries of them whose writer is gone.
    A file that merely matches the pattern (a user's, another run's cache) is not the run's."""
    from maxmatch_cli.evaluation.cache import stored_key
    from maxmatch_cli.fileio import TEMP_NAME, stale_temp

    folder = out / EMBEDDINGS_DIR
    if not folder.is_dir():
        return []
    own = {str((out / f"{stem}.safetensors").resolve()) for stem in ("best", "last")}
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        temp = TEMP_NAME.match(path.name)
        if temp is not None:
            if temp["name"].startswith(("best.", "last.")) and temp["pid"] is not None and stale_temp(path):
                found.append(path)
        elif path.name.startswith(("best.", "last.")) and path.suffix == ".safetensors":
            key = stored_key(path)
            if key is not None and key.get("checkpoint") in own:
                found.append(path)
    return found


def existing_run_files(out: str | os.PathLike) -> list[Path]:
    """The files of an earlier run in ``out`` (checkpoints, history, recipe, cached embeddings)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return [out / name for name in RUN_FILES if (out / name).is_file()] + _cache_files(out)


def prepare_run_dir(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Check that ``train`` may write its run into ``out``; with ``overwrite``, remove the earlier run's files.

    Under torchrun only rank 0 checks and removes (only rank 0 writes run files), so the ranks cannot race.

    Args:
        out: the run folder (may not exist yet).
        resume: the run is continued (``train --resume``): its files stay.
        overwrite: remove an earlier run's files (:func:`existing_run_files`) first.

    Returns:
        The files removed.

    Raises:
        MaxMatchError: both ``resume`` and ``overwrite``; ``out`` is a file; ``out`` holds a run and neither flag
            is given.
    """
    out = Path(out)
    if resume and overwrite:
        raise MaxMatchError("--resume and --overwrite contradict each other (continue the run in "
                            f"{out}, or replace it?)", hint="pass only one of them")
    if out.exists() and not out.is_dir():
        raise MaxMatchError(f"--out {out} is a file, not a run folder", hint="choose a folder for --out")
    if resume or int(os.environ.get("RANK", "0")) != 0:
        return []
    found = existing_run_files(out)
    if not found:
        return []
    if not overwrite:
        names = ", ".join(str(p.relative_to(out)) for p in found[:6]) + (", …" if len(found) > 6 else "")
        raise MaxMatchError(f"{out} already holds a training run ({names})",
                            hint="use --resume to continue it or --overwrite to replace it (or choose another --out)")
    with run_lock(out):  # already held by `train`; a library caller gets it for the removal
        _remove(out, found)
    return found


def _remove(out: Path, found: list[Path]) -> None:
    for path in found:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MaxMatchError(f"cannot remove {path} of the earlier run: {exc.strerror}",
                                hint="check the folder's permissions, or choose another --out") from None
    cache = out / EMBEDDINGS_DIR
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()


def discard_unsaved_run(out: str | os.PathLike) -> list[Path]:
    """After a run failed before its first ``last.safetensors`` (a full disk): remove the files it wrote.

    Nothing of such a run can be resumed, and its history and recipe would make the same command refuse the
    folder; ``train`` wrote them all (it starts only on a folder without a run, or with ``--overwrite``).

    Returns:
        The files removed (none if the folder holds a ``last.safetensors``).
    """
    out = Path(out)
    if (out / "last.safetensors").exists() or int(os.environ.get("RANK", "0")) != 0:
        return []
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    _remove(out, found)
    return found


@contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the run folder's lock for the block (creating the folder); re-entrant within one process.

    Under torchrun only rank 0 takes it (only rank 0 writes run files; the other ranks pass through). A folder this
    call created is removed again if the run left nothing in it (a recipe refused before training).

    Raises:
        LockHeld: another process writes the run (its pid, host, start time and command are named).
        MaxMatchError: ``out`` is a file, or the folder cannot be created.
    """
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if out.exists() and not out.is_dir():
        raise MaxMatchError(f"--out {out} is a file, not a run folder", hint="choose a folder for --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaxMatchError(f"cannot create the run folder {out}: {exc.strerror}",
                            hint="choose a folder you can write to for --out") from None
    try:
        with hold(lock_inside(out), f"run folder {out}"):
            yield
    finally:
        if created:
            try:
                out.rmdir()  # only succeeds when empty
            except OSError:
                pass


def remove_stale_temps_of_run(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed run (or ``evaluate``) left in the run folder and its embedding cache.

    Called by the run holding the folder's lock: a run file's temporary (``.last.safetensors.PID.XXXXXXXX.tmp``)
    written before the lock was taken, or any temporary whose writing process is gone, is stale; a live process's
    temporary file and a user's own files stay.
    """
    from maxmatch_cli.fileio import remove_stale_temps

    out = Path(out)
    try:
        taken = lock_inside(out).stat().st_mtime
    except OSError:
        taken = None
    return remove_stale_temps(out, RUN_FILES, older_than=taken) + remove_stale_temps(out / EMBEDDINGS_DIR)
