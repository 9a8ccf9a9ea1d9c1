"""Identities: of the arguments that made a store (for resuming) and of a store's contents (for provenance)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def args_fingerprint(**arguments: Any) -> str:
    """A stable short hash of the arguments that define an extraction (for resume checks).

    Args:
        **arguments: JSON-serialisable values (paths should be given as strings, resolved by the caller).

    Returns:
        A 16-character hex string, equal for equal arguments in any order.
    """
    blob = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_fingerprint(store: Any) -> str:
    """A cheap, stable identity of a store's contents (independent of path and file timestamps).

    Hashes the defining attributes, the sizes, the caption-to-image map, the split indices, a few caption
    strings and the features of a few images spread over the file. Used in checkpoint provenance.

    Args:
        store: an open :class:`~maxmatch_cli.features.store.reader.FeatureStore` (typed loosely because the
            reader imports this module); its split table, offsets and raw feature rows are read directly.

    Returns:
        A 16-character hex string.
    """
    h = hashlib.sha256()
    header = {
        "schema_version": store.schema_version,
        "feature_kind": store.feature_kind,
        "source": store.source,
        "feature_dim": store.feature_dim,
        "layout": store.layout,
        "n_images": store.n_images,
        "n_captions": store.n_captions,
        "max_regions": store.max_regions,
        "splits": {name: [len(a), len(b)] for name, (a, b) in sorted(store._splits.items())},
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(np.ascontiguousarray(store.caption_image).tobytes())
    for name in sorted(store._splits):
        for arr in store._splits[name]:
            h.update(np.ascontiguousarray(arr).tobytes())
    if store._offsets is not None:
        h.update(store._offsets.tobytes())
    texts = store._h5()["captions"].get("text")
    for j in sorted({0, store.n_captions // 2, store.n_captions - 1}):
        if 0 <= j < store.n_captions:
            h.update(texts.asstr()[j].encode())
    if store.image_files is not None:  # the image files themselves are not hashed: their paths name them
        h.update("\n".join(store.image_files).encode())
    elif store.n_images:
        _hash_sample_rows(h, store)
    return h.hexdigest()[:16]


def _hash_sample_rows(h: Any, store: Any) -> None:
    """Feed the stored (raw, not converted) features of up to 8 images spread over the store into ``h``."""
    features, offsets = store._features, store._offsets
    for i in np.unique(np.linspace(0, store.n_images - 1, num=min(8, store.n_images)).astype(int)):
        rows = features[i] if offsets is None else features[offsets[i] : offsets[i + 1]]
        h.update(np.ascontiguousarray(rows).tobytes())
