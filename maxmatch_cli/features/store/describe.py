"""The summary ``maxmatch features info`` prints of a store: schema, source, sizes, splits, feature shape."""

from __future__ import annotations

from typing import Any

from maxmatch_cli.features.store.schema import PIXELS


def summarize(store: Any) -> dict[str, Any]:
    """A summary of an open store: schema, source, sizes, splits, feature shape, disk size and fingerprint.

    Args:
        store: an open :class:`~maxmatch_cli.features.store.reader.FeatureStore` (typed loosely because the
            reader imports this module), complete or not.

    Returns:
        A JSON-serialisable dict; an unfinished store adds ``images_written``, an image-file store gives its
        ``image_root`` instead of feature shapes, and features extracted from image files give it beside them.
    """
    info: dict[str, Any] = {
        "path": str(store.path),
        "schema_version": store.schema_version,
        "complete": store.complete,
        **({} if store.complete else {"images_written": store.n_images}),
        "feature_kind": store.feature_kind,
        "source": store.source,
        "created_with": store.created_with,
        "layout": store.layout,
        "n_images": store.n_images,
        "n_captions": store.n_captions,
    }
    if store.image_files is not None:
        # Where the images are: an image-file store's only content, or the source of extracted features.
        info["image_root"] = store.image_root
        info["image_files"] = f"{store.n_images} paths relative to image_root"
    if store.feature_kind != PIXELS:
        info.update(_feature_summary(store))
    info.update({
        "has_image_sizes": store.image_sizes is not None,
        "splits": {name: _split_summary(store, name) for name in store.splits},
        "size_bytes": store.path.stat().st_size,
        "fingerprint": store.fingerprint() if store.complete else None,  # an unfinished file would be read whole
        "metadata": store.metadata,
    })
    return info


def _feature_summary(store: Any) -> dict[str, Any]:
    """Shape, dtype, chunking and region counts of the stored features."""
    feats = store._h5()["images/features"]
    counts = store.region_counts
    return {
        "feature_shape": list(feats.shape),
        "feature_dtype": str(feats.dtype),
        "feature_dim": store.feature_dim,
        "chunks": list(feats.chunks) if feats.chunks else None,
        "compression": feats.compression,
        "regions_per_image": {
            "min": int(counts.min()) if len(counts) else 0,
            "max": int(counts.max(initial=0)),
            "mean": float(counts.mean()) if len(counts) else 0.0,
        },
        "has_boxes": store.has_boxes,
    }


def _split_summary(store: Any, name: str) -> dict[str, int]:
    """Image and caption counts of one split."""
    images, captions = store.split(name)
    cpi = store.captions_per_image(name)
    return {"images": int(len(images)), "captions": int(len(captions)), "captions_per_image": cpi}
