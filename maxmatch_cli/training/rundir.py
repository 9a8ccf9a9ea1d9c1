"""Run folders: a new training run never silently replaces an earlier one.

A run folder holds ``best.safetensors``, ``last.safetensors``, ``metrics.jsonl``, ``steps.jsonl``,
``recipe.toml`` and the embedding cache ``embeddings/`` that ``evaluate`` keeps next to the checkpoints. Starting ``train`` on a folder
that holds any of them is refused unless the run is continued (``--resume``) or replaced (``--overwrite``);
replacing removes exactly those files, never anything else a user keeps there.
"""

from __future__ import annotations

import os
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError

__all__ = ["RUN_FILES", "existing_run_files", "prepare_run_dir"]

RUN_FILES = ("best.safetensors", "last.safetensors", "metrics.jsonl", "steps.jsonl", "recipe.toml")
"""Files a training run writes into its folder."""
EMBEDDINGS_DIR = "embeddings"
"""Embedding cache next to the checkpoints (:func:`maxmatch_cli.evaluation.cache.embeddings_cache_path`)."""


def _cache_files(out: Path) -> list[Path]:
    """The run's cached embeddings: ``embeddings/{best,last}.<split>.<hash>.safetensors`` and their temporaries."""
    folder = out / EMBEDDINGS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for stem in ("best", "last") for pattern in (f"{stem}.*.safetensors", f".{stem}.*.tmp")
                  for p in folder.glob(pattern) if p.is_file())


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
    return found
