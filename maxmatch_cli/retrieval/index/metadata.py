"""What an index keeps about its items besides ids, sets and caption texts, so that results can be shown to a
person: the image files of an images index and the image of each caption of a captions index.

==============  ===========================================================================================
paths.json      images index, when the feature file lists its image files (``extract-features images``:
                ``--kind pixels``, and ``--kind grid|region`` since they record them): each image's file,
                ``image_root / relative path`` as the feature file named it at build time
owners.json     captions index: the id of each caption's image in the feature file, which marks an image's own
                captions in a query by ``--image-id``
==============  ===========================================================================================

Both are optional. The manifest's :data:`METADATA_KEY` lists the files a build wrote (one listed but missing
is damage); an index built before they existed lists none and still answers queries, showing ids (and caption
texts). For such a captions index the caption owners are looked up in the feature file it was built from, when
that file is still there unchanged (same fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.format import BUILD_HINT, index_file, json_value, read_json

METADATA_KEY = "metadata_files"
"""Manifest field: the names of the metadata files the build wrote (absent in indexes built before them)."""
PATHS_FILE = "paths.json"
OWNERS_FILE = "owners.json"
METADATA_FILES = {"images": PATHS_FILE, "captions": OWNERS_FILE}
"""The one metadata file each kind of index may hold."""


def item_metadata(store: Any, kind: str, rows: np.ndarray) -> dict[str, list[Any]]:
    """The metadata files a build of the store rows ``rows`` writes: ``{file name: one value per row}``.

    Args:
        store: the open :class:`~maxmatch_cli.features.store.FeatureStore`.
        kind: ``images`` (rows are image rows) or ``captions`` (rows are caption rows).
        rows: the store rows of the index, in index order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if kind == "captions":
        owners = np.asarray(store.image_ids)[np.asarray(store.caption_image)[rows]]
        return {OWNERS_FILE: [json_value(v) for v in owners]}
    files = getattr(store, "image_files", None)
    if files is None:  # no file list (synthetic, precomputed, BUTD TSV, extracted before files were kept): ids only
        return {}
    root = Path(store.image_root or "")
    return {PATHS_FILE: [str(root / str(files[int(r)])) for r in rows]}


def read_metadata(path: Path, manifest: dict[str, Any], n: int) -> dict[str, list[Any]]:
    """The metadata files index folder ``path`` lists in its manifest, read: ``{file name: N values}``.

    Raises:
        MaxMatchError: the list is garbled, or a listed file is missing, unreadable or of another length.
    """
    names = manifest.get(METADATA_KEY, [])
    allowed = METADATA_FILES[manifest["kind"]]
    if not isinstance(names, list) or any(name != allowed for name in names):
        raise MaxMatchError(f"the manifest of index {path} lists unknown metadata files ({names!r})",
                            hint=f"the index is damaged; rebuild it ({BUILD_HINT})")
    out = {}
    for name in names:
        values = read_json(index_file(path, name, f"{METADATA_KEY} entry of the manifest"), "index metadata", path)
        if not isinstance(values, list) or len(values) != n:
            raise MaxMatchError(f"index {path}: {name} does not hold {n} entries",
                                hint=f"the index is damaged; rebuild it ({BUILD_HINT})")
        out[name] = values
    return out


def caption_owners(index: Any) -> list[Any] | None:
    """The image id of each caption of a captions index (by row; a sharded index's shards in order), or None
    when neither the index (``owners.json``) nor its unchanged feature file says. Cached on the index."""
    cached = getattr(index, "_caption_owners", False)
    if cached is not False:
        return cached
    parts = getattr(index, "shards", [index])
    stored = [getattr(part, "owners", None) for part in parts]
    if all(values is not None for values in stored):
        owners = [v for values in stored for v in values]
    elif all(getattr(part, "ids", None) is not None for part in parts):
        owners = _owners_from_feature_file(index.manifest, [i for part in parts for i in part.ids])
    else:
        owners = None
    index._caption_owners = owners
    return owners


def _owners_from_feature_file(manifest: dict[str, Any], caption_rows: list[Any]) -> list[Any] | None:
    """Owners of an index built before owners.json: its feature file maps caption rows (the index's ids) to
    images, if it is still the file the index was built from."""
    from maxmatch_cli.features.store import open_store

    data = Path(manifest.get("data", ""))
    if not data.is_file():
        return None
    try:
        store = open_store(data)
    except MaxMatchError:
        return None
    try:
        if store.fingerprint() != manifest.get("data_fingerprint"):
            return None
        rows = np.asarray(caption_rows, dtype=np.int64)
        return [json_value(v) for v in np.asarray(store.image_ids)[np.asarray(store.caption_image)[rows]]]
    finally:
        store.close()


def own_captions(index: Any, image_id: Any) -> int | None:
    """How many captions of the image ``image_id`` a captions index holds (None when it cannot tell)."""
    counts = getattr(index, "_owner_counts", None)
    if counts is None:
        owners = caption_owners(index)
        if owners is None:
            return None
        from collections import Counter

        counts = index._owner_counts = Counter(str(owner) for owner in owners)
    return counts[str(image_id)]
