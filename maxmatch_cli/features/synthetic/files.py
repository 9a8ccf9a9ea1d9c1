"""Writing a synthetic data set as a feature store, and reading its ground truth back."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, store_state
from maxmatch_cli.features.synthetic.config import SyntheticConfig, synthetic_config
from maxmatch_cli.features.synthetic.features import BLOCK, block_features, make_world
from maxmatch_cli.features.synthetic.plan import SyntheticPlan, make_plan
from maxmatch_cli.features.synthetic.vocabulary import ATTRIBUTES, CLASS_NAMES, OBJECTS, SCENE_NAMES


def generate_synthetic(
    path: str | os.PathLike,
    preset: str = "demo",
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    **overrides: Any,
) -> Path:
    """Write a synthetic data set as a schema-v1 feature store (region features, BUTD-shaped).

    Args:
        path: output ``.h5`` path.
        preset: ``"demo"`` (3,000 / 500 / 1,000 images, 36 x 2048 regions) or ``"tiny"`` (for tests).
        seed: random seed; the same seed, preset and overrides give byte-identical features and captions.
        overwrite: replace an existing file.
        progress: show a progress bar (default: when the data set is large enough to take a second).
        **overrides: fields of :class:`SyntheticConfig`, e.g. ``n_train=500, feature_dim=64``.

    Returns:
        The path written. If a file made with the same arguments exists already, nothing is done.
    """
    config = synthetic_config(preset, **overrides)
    path = Path(path)
    fp = args_fingerprint(kind="synthetic", preset=preset, seed=seed, **asdict(config))
    if not overwrite and store_state(path, fp) == "complete":
        return path
    plan = make_plan(config, seed)
    world = make_world(seed, config.feature_dim)
    n_blocks = -(-config.n_images // BLOCK)
    if progress is None:
        progress = config.n_images * config.n_regions * config.feature_dim > 20_000_000
    with StoreWriter(
        path,
        feature_kind="region",
        source=f"synthetic:{preset}",
        feature_dim=config.feature_dim,
        regions_per_image=config.n_regions,
        n_images=config.n_images,
        id_kind="int",
        with_boxes=True,
        with_sizes=True,
        metadata=_metadata(preset, seed, config),
        args_fingerprint=fp,
        overwrite=overwrite,
        flush_every=1024,
    ) as writer:
        _write_features(writer, plan, world, n_blocks, progress)
        writer.set_captions(plan.captions, plan.caption_image, ids=np.arange(len(plan.captions)))
        for name, images in plan.split_images().items():
            writer.add_split(name, images)
        _write_truth(writer.h5, plan)
    return path


def _metadata(preset: str, seed: int, config: SyntheticConfig) -> dict[str, Any]:
    """The store's metadata: how the file was made and the names behind the ground truth's integer codes."""
    return {
        "generator": "maxmatch synthetic",
        "preset": preset,
        "seed": seed,
        "config": asdict(config),
        "class_names": CLASS_NAMES,
        "attribute_names": ATTRIBUTES,
        "scene_names": SCENE_NAMES,
    }


def _write_features(writer: StoreWriter, plan: SyntheticPlan, world: np.ndarray, n_blocks: int, progress: bool) -> None:
    def write(block: int) -> None:
        lo = block * BLOCK
        feats = block_features(plan, world, block)
        hi = lo + len(feats)
        writer.write_images(feats, ids=np.arange(lo, hi), boxes=plan.boxes[lo:hi], sizes=plan.image_sizes[lo:hi])

    if not progress:
        for block in range(n_blocks):
            write(block)
        return
    from maxmatch_cli.progress import make_progress

    with make_progress(transient=True) as bar:
        task = bar.add_task("synthetic data", total=plan.config.n_images, unit="images", status="")
        for block in range(n_blocks):
            write(block)
            bar.update(task, completed=min((block + 1) * BLOCK, plan.config.n_images))


def _write_truth(f: h5py.File, plan: SyntheticPlan) -> None:
    g = f.require_group("synthetic")
    for name in list(g):
        del g[name]
    for name in (
        "image_scene", "object_image", "object_class", "object_attr", "region_object", "region_mix",
        "caption_objects", "caption_has_attr",
    ):  # fmt: skip
        g.create_dataset(name, data=getattr(plan, name), track_times=False)
    g.attrs["class_names"] = json.dumps(CLASS_NAMES)
    g.attrs["class_synonyms"] = json.dumps({o[0]: o[1] for o in OBJECTS if o[1]})
    g.attrs["attribute_names"] = json.dumps(ATTRIBUTES)
    g.attrs["scene_names"] = json.dumps(SCENE_NAMES)


def read_synthetic_truth(path: str | os.PathLike) -> dict[str, Any]:
    """The generator's ground truth stored in a synthetic feature file (``synthetic/`` group).

    Returns:
        A dict of the arrays of :class:`SyntheticPlan` (``object_image``, ``object_class``, ``object_attr``,
        ``caption_objects``, ``region_object``, ...) plus ``class_names``, ``class_synonyms``,
        ``attribute_names`` and ``scene_names``.
    """
    with h5py.File(path, "r") as f:
        if "synthetic" not in f:
            raise MaxMatchError(f"{path} was not made by the synthetic generator (no 'synthetic/' group).")
        g = f["synthetic"]
        out: dict[str, Any] = {name: g[name][:] for name in g}
        for key in ("class_names", "class_synonyms", "attribute_names", "scene_names"):
            out[key] = json.loads(g.attrs[key])
    return out


def timed_generate(path: str | os.PathLike, preset: str = "demo", seed: int = 0, **kw: Any) -> float:
    """Generate and return the seconds taken (for benchmarks)."""
    t = time.perf_counter()
    generate_synthetic(path, preset, seed, **kw)
    return time.perf_counter() - t
