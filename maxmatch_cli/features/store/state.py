"""What is at a store's path: a finished store, an interrupted one (``<path>.partial``), or nothing.

Importers ask :func:`store_state` before writing, so that re-running a finished extraction does nothing and an
interrupted one resumes; ``maxmatch features info`` describes whichever of the two files is there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store.reader import open_store
from maxmatch_cli.features.store.schema import partial_path


def store_state(path: str | os.PathLike, args_fingerprint: str | None = None) -> str:
    """Tell whether ``path`` holds a finished store, an interrupted one, or nothing.

    Args:
        path: final path of the store (without ``.partial``).
        args_fingerprint: if given and a finished store exists, it must have been made with these arguments.

    Returns:
        ``"complete"`` (a finished store at ``path``), ``"partial"`` (only ``path.partial`` exists) or
        ``"missing"``.

    Raises:
        MaxMatchError: a finished store exists but was made with different arguments, or is not a store.
    """
    path = Path(path)
    if path.exists():
        store = open_store(path)
        stored = store.args_fingerprint
        store.close()
        if args_fingerprint is not None and stored and stored != args_fingerprint:
            raise MaxMatchError(
                f"{path} already exists and was made with different arguments.",
                hint="choose another output path, delete the file, or pass --overwrite to replace it",
            )
        return "complete"
    if partial_path(path).exists():
        return "partial"
    return "missing"


def describe_store(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`FeatureStore.describe` of a finished store, or of an unfinished one (``complete`` false)."""
    path = Path(path)
    target = partial_path(path) if not path.exists() and partial_path(path).exists() else path
    with open_store(target, allow_incomplete=True) as store:
        return store.describe()
