"""The plan: everything of a synthetic data set except the features (scenes, objects, region layout, boxes,
captions), drawn from three seeded streams."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from maxmatch_cli.features.synthetic.captions import draw_captions
from maxmatch_cli.features.synthetic.config import SyntheticConfig
from maxmatch_cli.features.synthetic.vocabulary import (
    ATTRIBUTES,
    KIND_ATTRIBUTES,
    N_CLUTTER,
    OBJECTS,
    SCENE_NAMES,
    SCENES,
)

_IMAGE_SIZES = np.array([(640, 480), (480, 640), (640, 427), (500, 375), (640, 360)], dtype=np.int32)


@dataclass
class SyntheticPlan:
    """Ground truth of a synthetic data set, everything but the region features.

    Object ``o`` lives in image ``object_image[o]`` and is a ``CLASS_NAMES[object_class[o]]`` with attribute
    ``ATTRIBUTES[object_attr[o]]``; caption ``j`` belongs to image ``caption_image[j]`` and names the objects
    ``caption_objects[j]`` (-1 = unused slot) with attribute words for those where ``caption_has_attr[j]``.
    """

    config: SyntheticConfig
    seed: int
    image_scene: np.ndarray  # (N,) int64
    object_image: np.ndarray  # (O,) int64
    object_class: np.ndarray  # (O,) int64
    object_attr: np.ndarray  # (O,) int64
    region_object: np.ndarray  # (N, R) int64, object index of each region, -1 = background
    region_part: np.ndarray  # (N, R) int64, part/view index (0-3) or clutter index for background
    region_mix: np.ndarray  # (N, R) int64, an overlapping object of the same image or -1
    boxes: np.ndarray  # (N, R, 4) float32 x1 y1 x2 y2
    image_sizes: np.ndarray  # (N, 2) int32 width height
    captions: list[str]
    caption_image: np.ndarray  # (M,) int64
    caption_objects: np.ndarray  # (M, 3) int64
    caption_has_attr: np.ndarray  # (M, 3) bool

    def split_images(self) -> dict[str, np.ndarray]:
        c = self.config
        bounds = np.cumsum([0, c.n_train, c.n_dev, c.n_test])
        return {
            name: np.arange(bounds[k], bounds[k + 1], dtype=np.int64)
            for k, name in enumerate(("train", "dev", "test"))
        }


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    p = (np.arange(n) + 1.0) ** -exponent
    return p[rng.permutation(n)] / p.sum()


class _WorldStats(NamedTuple):
    """How often things occur: per-scene class log-probabilities, per-class attribute choices, scene frequencies."""

    log_p_class: np.ndarray  # (scenes, classes)
    attr_allowed: np.ndarray  # (classes, attributes) int64, the allowed attribute ids, -1 padded
    attr_cdf: np.ndarray  # (classes, attributes), cumulative preference over attr_allowed, 2.0 padded
    scene_freq: np.ndarray  # (scenes,)


class _Objects(NamedTuple):
    """The images' scenes and sizes and the object table (image ``i`` owns objects ``first[i]:first[i + 1]``)."""

    image_scene: np.ndarray  # (N,) int64
    image_sizes: np.ndarray  # (N, 2) int32
    n_obj: np.ndarray  # (N,) int64
    first: np.ndarray  # (N + 1,) int64
    object_image: np.ndarray  # (O,) int64
    object_class: np.ndarray  # (O,) int64
    object_attr: np.ndarray  # (O,) int64
    centre: np.ndarray  # (O, 2) float64, the object's box centre in pixels
    extent: np.ndarray  # (O, 2) float64, its box width and height


def _world_statistics(world: np.random.Generator) -> _WorldStats:
    """Zipf class frequencies boosted by scene, per-class attribute preferences, Zipf scene frequencies."""
    n_cls, n_scenes, n_attr = len(OBJECTS), len(SCENES), len(ATTRIBUTES)
    typical = np.full((n_scenes, n_cls), 0.2)
    for c, (_, _, _, scenes) in enumerate(OBJECTS):
        for s in scenes:
            typical[SCENE_NAMES.index(s), c] = 8.0
    log_p_class = np.log(typical * _zipf(n_cls, 0.8, world))
    attr_allowed = np.full((n_cls, n_attr), -1, dtype=np.int64)
    attr_cdf = np.full((n_cls, n_attr), 2.0)
    for c, obj in enumerate(OBJECTS):
        allowed = [ATTRIBUTES.index(a) for a in KIND_ATTRIBUTES[obj[2]]]
        attr_allowed[c, : len(allowed)] = allowed
        attr_cdf[c, : len(allowed)] = np.cumsum(_zipf(len(allowed), 0.7, world))
    return _WorldStats(log_p_class, attr_allowed, attr_cdf, _zipf(n_scenes, 0.4, world))


def _draw_objects(config: SyntheticConfig, stats: _WorldStats, rng: np.random.Generator) -> _Objects:
    """Each image's scene, size and distinct object classes, each object's attribute and box."""
    N, n_cls = config.n_images, len(OBJECTS)
    hi_obj = config.objects_cap
    lo_obj = min(config.min_objects, hi_obj)
    image_scene = rng.choice(len(SCENES), size=N, p=stats.scene_freq).astype(np.int64)
    image_sizes = _IMAGE_SIZES[rng.integers(len(_IMAGE_SIZES), size=N)]
    n_obj = rng.integers(lo_obj, hi_obj + 1, size=N)
    # Distinct classes per image without replacement, by the Gumbel top-k trick, for all images at once.
    keys = stats.log_p_class[image_scene] + rng.gumbel(size=(N, n_cls))
    ranked = np.argsort(-keys, axis=1, kind="stable")
    first = np.concatenate([[0], np.cumsum(n_obj)]).astype(np.int64)
    object_image = np.repeat(np.arange(N, dtype=np.int64), n_obj)
    object_class = ranked[object_image, np.arange(len(object_image)) - first[object_image]].astype(np.int64)
    u = rng.random(len(object_class))
    pick = (stats.attr_cdf[object_class] < u[:, None]).sum(1)
    object_attr = stats.attr_allowed[object_class, pick]
    # Boxes of the objects; their regions jitter around them (see _region_boxes).
    wh = image_sizes[object_image].astype(np.float64)
    centre = rng.uniform(0.2, 0.8, size=(len(object_class), 2)) * wh
    extent = rng.uniform(0.15, 0.6, size=(len(object_class), 2)) * wh
    return _Objects(image_scene, image_sizes, n_obj, first, object_image, object_class, object_attr, centre, extent)


def _allocate_regions(n_obj: int, n_regions: int, n_bg_min: int, rnd: random.Random) -> list[int]:
    """Owner (local object index, or -1 for background) of each region, shuffled."""
    counts = [rnd.randint(2, 5) for _ in range(n_obj)]
    while sum(counts) > n_regions - n_bg_min:
        counts[counts.index(max(counts))] -= 1
    owner = [k for k, c in enumerate(counts) for _ in range(c)]
    owner += [-1] * (n_regions - len(owner))
    rnd.shuffle(owner)
    return owner


def _layout_regions(
    objects: _Objects, n_regions: int, rng: np.random.Generator, rnd: random.Random
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, R)`` owner object of each region (-1 = background), its part or clutter index, and an overlapping
    object of the same image mixed into it (-1 = none)."""
    n_obj, first = objects.n_obj, objects.first
    N, R = len(n_obj), n_regions
    n_bg_min = max(2, R // 6)
    region_object = np.empty((N, R), dtype=np.int64)
    for i in range(N):
        owner = _allocate_regions(int(n_obj[i]), R, n_bg_min, rnd)
        region_object[i] = [first[i] + k if k >= 0 else -1 for k in owner]
    local = region_object >= 0
    region_part = np.where(local, rng.integers(0, 4, size=(N, R)), rng.integers(0, N_CLUTTER, size=(N, R)))
    mix_pick = first[:N, None] + (rng.random((N, R)) * n_obj[:, None]).astype(np.int64)
    mix = local & (rng.random((N, R)) < 0.3) & (mix_pick != region_object)
    region_mix = np.where(mix, mix_pick, -1)
    return region_object, region_part, region_mix


def _region_boxes(objects: _Objects, region_object: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, R, 4)`` float32 x1 y1 x2 y2: jittered around the owner's box, anywhere for background regions."""
    N, R = region_object.shape
    local = region_object >= 0
    img_wh = objects.image_sizes[:, None, :].astype(np.float64)
    safe = np.maximum(region_object, 0)
    centre = np.where(local[..., None], objects.centre[safe], rng.uniform(0, 1, size=(N, R, 2)) * img_wh)
    extent = np.where(local[..., None], objects.extent[safe], rng.uniform(0.1, 0.5, size=(N, R, 2)) * img_wh)
    jitter = rng.uniform(0.75, 1.25, size=(N, R, 4))
    boxes = np.concatenate([centre - extent / 2 * jitter[..., :2], centre + extent / 2 * jitter[..., 2:]], -1)
    return np.clip(boxes, 0, np.concatenate([img_wh, img_wh], -1) - 1).astype(np.float32)


def make_plan(config: SyntheticConfig, seed: int = 0) -> SyntheticPlan:
    """Draw scenes, objects, region layout, boxes and captions (everything but features), deterministically."""
    world = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1])
    rnd = random.Random(int(np.random.SeedSequence([seed, 4]).generate_state(1)[0]))
    # The draws from each stream keep one fixed order: changing it changes every data set already made.
    objects = _draw_objects(config, _world_statistics(world), rng)
    region_object, region_part, region_mix = _layout_regions(objects, config.n_regions, rng, rnd)
    boxes = _region_boxes(objects, region_object, rng)
    captions, cap_objects, cap_has_attr = draw_captions(
        objects.first, objects.object_class, objects.object_attr, objects.image_scene, config.captions_per_image, rnd
    )
    return SyntheticPlan(
        config=config,
        seed=seed,
        image_scene=objects.image_scene,
        object_image=objects.object_image,
        object_class=objects.object_class,
        object_attr=objects.object_attr,
        region_object=region_object,
        region_part=region_part,
        region_mix=region_mix,
        boxes=boxes,
        image_sizes=objects.image_sizes,
        captions=captions,
        caption_image=np.repeat(np.arange(config.n_images, dtype=np.int64), config.captions_per_image),
        caption_objects=cap_objects,
        caption_has_attr=cap_has_attr,
    )
