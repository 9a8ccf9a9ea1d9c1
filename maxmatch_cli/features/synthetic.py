"""Synthetic COCO-like image-caption data in the BUTD region-feature format, for the demo and the tests.

The generative story
--------------------
A seeded *world* fixes the vocabulary-to-vector map: every object class c has a prototype P_c, every attribute a
a prototype Q_a, every scene s a prototype S_s, every class four "part" vectors U_{c,k} (different views of the
same object), and a few dozen clutter vectors C_j (wall, floor, sky ...), all random Gaussian in D dimensions.

Each *image* has a scene type (kitchen, street, beach, ...) and 3-6 distinct objects. Classes are drawn from a
Zipf-like global frequency boosted for the classes typical of the scene (cars on streets, cups in kitchens), so
the same classes recur across images and hard negatives exist: many kitchens hold a cup, fewer a *red* cup next
to a *wooden* table. Each object has one attribute (colour, size, material, age), drawn from the attributes its
kind allows with a class-specific preference.

Each image has R regions (36 for the demo, as BUTD). Every object owns 2-5 of them (views of its parts, with
a box jittered around the object's box); the rest are background regions of scene and clutter. A region's
feature is non-negative like BUTD's pooled ReLU features::

    x = g * (P_c + 0.8 Q_a + 0.5 U_{c,k}) + 0.4 S_s + m * (P_c' + 0.8 Q_a') + b * C_j + noise * eps
    feature = relu(x - 0.5) * r,      eps ~ N(0, I), g ~ U(0.5, 1.2), r ~ lognormal

where (c', a') is another object of the image overlapping the box with probability 0.3 (m = 0.4), background
regions have g = 0 and b = 1, and regions are shuffled. Object and attribute are bound inside a region, so "a
red cup and a blue bowl" differs from "a blue cup and a red bowl" only to a model that looks at regions.

Each image has five *captions*, each describing a different subset of 1-3 of its objects with varied English
templates, mostly with the scene ("A red car parked next to a small dog on a street.", "there is a wooden table
in the kitchen", "a kitchen with a white cup, a green apple and a metal sink"). One image therefore has several
valid descriptions that mention different objects, which a single averaged image vector serves poorly while a
set of embeddings can match each caption with a different element. Attributes are dropped from 15% of the
mentions and some classes have synonyms (couch / sofa), so the text encoder must learn them. All words recur
often: a vocabulary of the words seen at least 4 times in the training captions covers all tokens.

The generator's ground truth is stored in the file under ``synthetic/`` (scene of each image, the object table,
the objects each caption names, the object of each region) and returned by :func:`read_synthetic_truth`.

Determinism: the same preset, sizes and seed give byte-identical features, boxes and captions. Features are
generated in blocks of 64 images, each from its own seeded stream, so the result does not depend on batching.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, store_state

# --------------------------------------------------------------------------------------------------------------
# The world: scenes, object classes, attributes, caption templates
# --------------------------------------------------------------------------------------------------------------

SCENES: list[tuple[str, str]] = [  # (noun phrase, prepositional phrase)
    ("a kitchen", "in a kitchen"),
    ("a street", "on a street"),
    ("a beach", "at the beach"),
    ("a living room", "in a living room"),
    ("a park", "in a park"),
    ("an office", "in an office"),
    ("a bathroom", "in a bathroom"),
    ("a farm", "on a farm"),
    ("an airport", "at an airport"),
    ("a restaurant", "in a restaurant"),
    ("a bedroom", "in a bedroom"),
    ("a harbor", "at a harbor"),
]
SCENE_NAMES = [np_.split(" ", 1)[1] for np_, _ in SCENES]

ATTRIBUTES = [
    "red", "blue", "green", "yellow", "white", "black", "brown",
    "small", "large", "wooden", "metal", "plastic", "young", "old", "tall",
]  # fmt: skip

_KIND_ATTRIBUTES = {
    "animal": ["white", "black", "brown", "small", "large", "young", "old"],
    "vehicle": ["red", "blue", "green", "yellow", "white", "black", "small", "large", "old"],
    "furniture": ["red", "blue", "white", "black", "brown", "wooden", "metal", "plastic", "small", "large", "old"],
    "item": ["red", "blue", "green", "yellow", "white", "black", "brown", "metal", "plastic", "wooden", "small",
             "large"],
    "food": ["green", "yellow", "brown", "small", "large"],
    "person": ["young", "old", "tall", "small"],
    "plant": ["green", "yellow", "small", "large", "tall"],
}

# (name, synonym or None, kind, typical scenes)
OBJECTS: list[tuple[str, str | None, str, tuple[str, ...]]] = [
    ("dog", None, "animal", ("park", "street", "living room", "beach")),
    ("cat", None, "animal", ("living room", "bedroom", "kitchen")),
    ("horse", None, "animal", ("farm", "park", "beach")),
    ("cow", None, "animal", ("farm",)),
    ("sheep", None, "animal", ("farm",)),
    ("bird", None, "animal", ("park", "beach", "harbor")),
    ("duck", None, "animal", ("park", "harbor", "farm")),
    ("goat", None, "animal", ("farm",)),
    ("car", "automobile", "vehicle", ("street", "airport")),
    ("bus", None, "vehicle", ("street", "airport")),
    ("truck", None, "vehicle", ("street", "farm", "harbor")),
    ("bicycle", "bike", "vehicle", ("street", "park")),
    ("motorcycle", "motorbike", "vehicle", ("street",)),
    ("boat", None, "vehicle", ("harbor", "beach")),
    ("airplane", "plane", "vehicle", ("airport",)),
    ("van", None, "vehicle", ("street", "airport")),
    ("table", None, "furniture", ("kitchen", "restaurant", "living room", "office")),
    ("chair", None, "furniture", ("kitchen", "restaurant", "office", "living room")),
    ("couch", "sofa", "furniture", ("living room",)),
    ("bed", None, "furniture", ("bedroom",)),
    ("bench", None, "furniture", ("park", "street", "harbor")),
    ("desk", None, "furniture", ("office", "bedroom")),
    ("shelf", None, "furniture", ("office", "living room", "kitchen", "bathroom")),
    ("cabinet", None, "furniture", ("kitchen", "bathroom", "office")),
    ("sink", None, "furniture", ("bathroom", "kitchen")),
    ("cup", "mug", "item", ("kitchen", "restaurant", "office")),
    ("bottle", None, "item", ("kitchen", "restaurant", "bathroom")),
    ("bowl", None, "item", ("kitchen", "restaurant")),
    ("laptop", "computer", "item", ("office", "bedroom", "living room")),
    ("phone", None, "item", ("office", "street", "bedroom")),
    ("book", None, "item", ("office", "bedroom", "living room")),
    ("umbrella", None, "item", ("beach", "street")),
    ("kite", None, "item", ("beach", "park")),
    ("ball", None, "item", ("park", "beach")),
    ("clock", None, "item", ("kitchen", "office", "street")),
    ("vase", None, "item", ("living room", "restaurant")),
    ("bag", "backpack", "item", ("street", "airport", "office")),
    ("suitcase", None, "item", ("airport", "street")),
    ("lamp", None, "item", ("bedroom", "living room", "office")),
    ("towel", None, "item", ("bathroom", "beach")),
    ("pizza", None, "food", ("restaurant", "kitchen")),
    ("cake", None, "food", ("restaurant", "kitchen")),
    ("banana", None, "food", ("kitchen",)),
    ("apple", None, "food", ("kitchen",)),
    ("sandwich", None, "food", ("restaurant",)),
    ("donut", None, "food", ("restaurant", "kitchen")),
    ("man", None, "person", ("street", "park", "beach", "office", "airport", "restaurant")),
    ("woman", None, "person", ("street", "park", "beach", "kitchen", "restaurant")),
    ("child", "kid", "person", ("park", "beach", "living room")),
    ("tree", None, "plant", ("park", "street", "farm")),
    ("flower", None, "plant", ("park", "living room")),
    ("plant", None, "plant", ("living room", "office")),
]
CLASS_NAMES = [o[0] for o in OBJECTS]

_TEMPLATES: dict[int, list[str]] = {
    1: [
        "{n1} {where}",
        "there is {n1} {where}",
        "a photo of {n1} {where}",
        "{n1} {pose} {where}",
        "close up of {n1}",
        "{scene} with {n1}",
        "a view of {n1} {where}",
        "{n1} that is shown {where}",
    ],
    2: [
        "{n1} next to {n2} {where}",
        "{n1} and {n2} {where}",
        "there is {n1} near {n2}",
        "{n1} beside {n2} {where}",
        "a picture of {n1} and {n2}",
        "{scene} with {n1} and {n2}",
        "{n1} in front of {n2} {where}",
        "{n1} {pose} next to {n2} {where}",
    ],
    3: [
        "{n1}, {n2} and {n3} {where}",
        "{scene} with {n1}, {n2} and {n3}",
        "there is {n1} with {n2} and {n3} {where}",
        "{n1} next to {n2} and {n3}",
        "a view of {n1}, {n2} and {n3} {where}",
        "{n1} near {n2} and {n3} {where}",
    ],
}


_POSE = {
    "vehicle": "parked", "animal": "standing", "person": "standing", "furniture": "placed", "item": "lying",
    "food": "lying", "plant": "growing",
}  # fmt: skip


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of a synthetic data set."""

    n_train: int = 3000
    """Training images."""
    n_dev: int = 500
    """Validation images."""
    n_test: int = 1000
    """Test images (1,000 = the COCO 1K / F30K protocol size)."""
    captions_per_image: int = 5
    """Captions per image, each naming a different subset of the image's objects."""
    n_regions: int = 36
    """Regions per image (BUTD: 36)."""
    feature_dim: int = 2048
    """Region feature dimension (BUTD: 2048)."""
    min_objects: int = 3
    """Fewest objects per image."""
    max_objects: int = 6
    """Most objects per image (capped so that each object gets at least 2 regions)."""
    noise: float = 1.5
    """Standard deviation of the per-dimension Gaussian noise (signal prototypes have unit variance)."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_dev", "n_test"):
            if getattr(self, name) < 0:
                raise MaxMatchError(f"synthetic {name} must be >= 0, got {getattr(self, name)}")
        if self.captions_per_image < 1 or self.feature_dim < 1:
            raise MaxMatchError("synthetic captions_per_image and feature_dim must be >= 1")
        if self.n_regions < 6:
            raise MaxMatchError(f"synthetic n_regions must be >= 6, got {self.n_regions}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise MaxMatchError("synthetic min_objects must be between 1 and max_objects")

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_dev + self.n_test

    @property
    def objects_cap(self) -> int:
        """Most objects that fit: at least 2 regions each and a sixth of the regions left to background."""
        return max(1, min(self.max_objects, (self.n_regions - max(2, self.n_regions // 6)) // 2))


PRESETS: dict[str, SyntheticConfig] = {
    "demo": SyntheticConfig(),
    "tiny": SyntheticConfig(n_train=40, n_dev=12, n_test=20, n_regions=12, feature_dim=32),
}


def synthetic_config(preset: str = "demo", **overrides: Any) -> SyntheticConfig:
    """The configuration of a preset with some fields replaced (``n_train=500``, ``feature_dim=64``, ...)."""
    if preset not in PRESETS:
        raise MaxMatchError(
            f"unknown synthetic preset '{preset}'; available: {', '.join(PRESETS)}.",
            hint="use --synthetic demo (the demo data) or --synthetic tiny (for tests)",
        )
    fields = set(SyntheticConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MaxMatchError(
            f"unknown synthetic option(s): {', '.join(unknown)}.", hint=f"valid options: {', '.join(sorted(fields))}"
        )
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------------------------
# The plan: everything except the features (scenes, objects, captions, region layout, boxes)
# --------------------------------------------------------------------------------------------------------------


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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(cls: int, attr: int, with_attr: bool, rnd: random.Random) -> str:
    name, synonym, _, _ = OBJECTS[cls]
    if synonym is not None and rnd.random() < 0.3:
        name = synonym
    if not with_attr:
        return f"{_article(name)} {name}"
    word = ATTRIBUTES[attr]
    if rnd.random() < 0.08:
        return f"{_article(name)} {name} that is {word}"
    return f"{_article(word)} {word} {name}"


@functools.lru_cache(maxsize=None)
def _subset_table(n_objects: int) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray]:
    """All subsets of 1-3 of ``n_objects`` objects, their base weights and membership matrix."""
    subsets = [s for size in (1, 2, 3) for s in itertools.combinations(range(n_objects), size)]
    # Few single-object captions: in a batch of 128 a one-object caption ("a small book") fits another image
    # about 3 times in 4, a false negative that hardest-negative mining cannot resolve (COCO captions are richer).
    size_weight = {1: 0.04, 2: 0.52, 3: 0.44}
    n_of_size = {k: sum(len(s) == k for s in subsets) for k in (1, 2, 3)}
    base = np.array([size_weight[len(s)] / n_of_size[len(s)] for s in subsets])
    member = np.zeros((len(subsets), n_objects), dtype=bool)
    for k, s in enumerate(subsets):
        member[k, list(s)] = True
    return subsets, base, member


def _caption_subsets(n_objects: int, count: int, rnd: random.Random) -> list[tuple[int, ...]]:
    """``count`` different subsets of 1-3 objects, preferring pairs and objects not mentioned yet."""
    subsets, base, member = _subset_table(n_objects)
    chosen: list[tuple[int, ...]] = []
    mentioned = np.zeros(n_objects, dtype=bool)
    available = np.ones(len(subsets), dtype=bool)
    for _ in range(count):
        if not available.any():  # fewer subsets than captions (1-2 objects): repeat with other wording
            available[:] = True
        w = base * (1.0 + 2.0 * (member & ~mentioned).sum(1)) * available
        cdf = np.cumsum(w)
        k = min(int(np.searchsorted(cdf, rnd.random() * cdf[-1], side="right")), len(subsets) - 1)
        available[k] = False
        chosen.append(subsets[k])
        mentioned |= member[k]
    return chosen


def _caption_text(
    objs: tuple[int, ...], cls: list[int], attr: list[int], has_attr: list[bool], scene: int, rnd: random.Random
) -> str:
    order = list(range(len(objs)))
    rnd.shuffle(order)
    nps = [_noun_phrase(cls[objs[k]], attr[objs[k]], has_attr[k], rnd) for k in order]
    template = rnd.choice(_TEMPLATES[len(objs)])
    where = SCENES[scene][1] if rnd.random() < 0.75 else ""
    pose = _POSE[OBJECTS[cls[objs[order[0]]]][2]]
    fields = {f"n{k + 1}": p for k, p in enumerate(nps)}
    text = " ".join(template.format(**fields, where=where, scene=SCENES[scene][0], pose=pose).split())
    if rnd.random() < 0.6:
        text = text[0].upper() + text[1:]
    if rnd.random() < 0.5:
        text += "."
    return text


def _allocate_regions(n_obj: int, n_regions: int, n_bg_min: int, rnd: random.Random) -> list[int]:
    """Owner (local object index, or -1 for background) of each region, shuffled."""
    counts = [rnd.randint(2, 5) for _ in range(n_obj)]
    while sum(counts) > n_regions - n_bg_min:
        counts[counts.index(max(counts))] -= 1
    owner = [k for k, c in enumerate(counts) for _ in range(c)]
    owner += [-1] * (n_regions - len(owner))
    rnd.shuffle(owner)
    return owner


def make_plan(config: SyntheticConfig, seed: int = 0) -> SyntheticPlan:
    """Draw scenes, objects, region layout, boxes and captions (everything but features), deterministically."""
    world = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed, 1])
    rnd = random.Random(int(np.random.SeedSequence([seed, 4]).generate_state(1)[0]))
    n_cls, n_scenes, n_attr = len(OBJECTS), len(SCENES), len(ATTRIBUTES)

    # World statistics: Zipf class frequencies boosted by scene, per-class attribute preferences.
    typical = np.full((n_scenes, n_cls), 0.2)
    for c, (_, _, _, scenes) in enumerate(OBJECTS):
        for s in scenes:
            typical[SCENE_NAMES.index(s), c] = 8.0
    log_p_class = np.log(typical * _zipf(n_cls, 0.8, world))
    attr_allowed = np.full((n_cls, n_attr), -1, dtype=np.int64)
    attr_cdf = np.full((n_cls, n_attr), 2.0)
    for c, obj in enumerate(OBJECTS):
        allowed = [ATTRIBUTES.index(a) for a in _KIND_ATTRIBUTES[obj[2]]]
        attr_allowed[c, : len(allowed)] = allowed
        attr_cdf[c, : len(allowed)] = np.cumsum(_zipf(len(allowed), 0.7, world))
    scene_freq = _zipf(n_scenes, 0.4, world)

    N, R = config.n_images, config.n_regions
    hi_obj = config.objects_cap
    lo_obj = min(config.min_objects, hi_obj)
    image_scene = rng.choice(n_scenes, size=N, p=scene_freq).astype(np.int64)
    sizes_choice = np.array([(640, 480), (480, 640), (640, 427), (500, 375), (640, 360)], dtype=np.int32)
    image_sizes = sizes_choice[rng.integers(len(sizes_choice), size=N)]
    n_obj = rng.integers(lo_obj, hi_obj + 1, size=N)
    # Distinct classes per image without replacement, by the Gumbel top-k trick, for all images at once.
    keys = log_p_class[image_scene] + rng.gumbel(size=(N, n_cls))
    ranked = np.argsort(-keys, axis=1, kind="stable")
    first = np.concatenate([[0], np.cumsum(n_obj)]).astype(np.int64)
    object_image = np.repeat(np.arange(N, dtype=np.int64), n_obj)
    object_class = ranked[object_image, np.arange(len(object_image)) - first[object_image]].astype(np.int64)
    u = rng.random(len(object_class))
    pick = (attr_cdf[object_class] < u[:, None]).sum(1)
    object_attr = attr_allowed[object_class, pick]

    # Boxes of the objects; regions jitter around them (background regions anywhere).
    wh = image_sizes[object_image].astype(np.float64)
    obj_centre = rng.uniform(0.2, 0.8, size=(len(object_class), 2)) * wh
    obj_extent = rng.uniform(0.15, 0.6, size=(len(object_class), 2)) * wh

    n_bg_min = max(2, R // 6)
    region_object = np.empty((N, R), dtype=np.int64)
    for i in range(N):
        owner = _allocate_regions(int(n_obj[i]), R, n_bg_min, rnd)
        region_object[i] = [first[i] + k if k >= 0 else -1 for k in owner]
    local = region_object >= 0
    region_part = np.where(local, rng.integers(0, 4, size=(N, R)), rng.integers(0, _N_CLUTTER, size=(N, R)))
    mix_pick = first[:N, None] + (rng.random((N, R)) * n_obj[:, None]).astype(np.int64)
    mix = local & (rng.random((N, R)) < 0.3) & (mix_pick != region_object)
    region_mix = np.where(mix, mix_pick, -1)

    img_wh = image_sizes[:, None, :].astype(np.float64)
    safe = np.maximum(region_object, 0)
    centre = np.where(local[..., None], obj_centre[safe], rng.uniform(0, 1, size=(N, R, 2)) * img_wh)
    extent = np.where(local[..., None], obj_extent[safe], rng.uniform(0.1, 0.5, size=(N, R, 2)) * img_wh)
    jitter = rng.uniform(0.75, 1.25, size=(N, R, 4))
    boxes = np.concatenate([centre - extent / 2 * jitter[..., :2], centre + extent / 2 * jitter[..., 2:]], -1)
    boxes = np.clip(boxes, 0, np.concatenate([img_wh, img_wh], -1) - 1).astype(np.float32)

    # Captions: each names a different subset of 1-3 of the image's objects.
    captions: list[str] = []
    cap_objects = np.full((N * config.captions_per_image, 3), -1, dtype=np.int64)
    cap_has_attr = np.zeros((N * config.captions_per_image, 3), dtype=bool)
    cls_list, attr_list = object_class.tolist(), object_attr.tolist()
    for i in range(N):
        lo, hi = int(first[i]), int(first[i + 1])
        cls_i, attr_i = cls_list[lo:hi], attr_list[lo:hi]
        for subset in _caption_subsets(hi - lo, config.captions_per_image, rnd):
            # A lone object always gets its attribute: "a dog" alone would describe half the data set.
            has_attr = [len(subset) == 1 or rnd.random() >= 0.15 for _ in subset]
            j = len(captions)
            captions.append(_caption_text(subset, cls_i, attr_i, has_attr, int(image_scene[i]), rnd))
            cap_objects[j, : len(subset)] = lo + np.array(subset)
            cap_has_attr[j, : len(subset)] = has_attr

    return SyntheticPlan(
        config=config,
        seed=seed,
        image_scene=image_scene,
        object_image=object_image,
        object_class=object_class,
        object_attr=object_attr,
        region_object=region_object,
        region_part=region_part,
        region_mix=region_mix,
        boxes=boxes,
        image_sizes=image_sizes,
        captions=captions,
        caption_image=np.repeat(np.arange(N, dtype=np.int64), config.captions_per_image),
        caption_objects=cap_objects,
        caption_has_attr=cap_has_attr,
    )


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------

_BLOCK = 64  # images per feature block; each block has its own seeded stream
_N_CLUTTER = 32


def _make_world(seed: int, dim: int) -> np.ndarray:
    """The prototype table: rows P (classes), Q (attributes), S (scenes), U (4 parts per class), clutter, then
    a row of zeros and a row of ones."""
    rng = np.random.default_rng([seed, 2])
    n_rows = len(OBJECTS) + len(ATTRIBUTES) + len(SCENES) + 4 * len(OBJECTS) + _N_CLUTTER
    table = np.zeros((n_rows + 2, dim), dtype=np.float32)
    table[:n_rows] = rng.standard_normal((n_rows, dim), dtype=np.float32)
    table[-1] = 1.0
    return table


def block_features(plan: SyntheticPlan, world: np.ndarray, block: int) -> np.ndarray:
    """Region features ``(B, R, D)`` float16 of the images ``64 * block ...`` (deterministic per block).

    The signal of each region is a weighted sum of at most seven prototype rows (computed with one
    ``embedding_bag``); the noise is uniform with standard deviation ``config.noise``.
    """
    import torch

    c = plan.config
    n_cls, n_attr, n_scene = len(OBJECTS), len(ATTRIBUTES), len(SCENES)
    q0, s0 = n_cls, n_cls + n_attr
    u0 = s0 + n_scene
    c0 = u0 + 4 * n_cls
    zero = len(world) - 2  # the last two rows: zeros, ones
    lo, hi = block * _BLOCK, min((block + 1) * _BLOCK, c.n_images)
    rng = np.random.default_rng([plan.seed, 3, block])

    obj = plan.region_object[lo:hi].reshape(-1)
    local = obj >= 0
    safe = np.maximum(obj, 0)
    cls, attr = plan.object_class[safe], plan.object_attr[safe]
    part = plan.region_part[lo:hi].reshape(-1)
    mix = plan.region_mix[lo:hi].reshape(-1)
    has_mix = mix >= 0
    mcls, mattr = plan.object_class[np.maximum(mix, 0)], plan.object_attr[np.maximum(mix, 0)]
    scene = np.repeat(plan.image_scene[lo:hi], c.n_regions)
    n = len(obj)

    gain = np.where(local, rng.uniform(0.5, 1.2, size=n), 0.0)
    m = np.where(has_mix, 0.4, 0.0)
    amplitude = float(c.noise) * 12**0.5  # uniform noise amplitude for standard deviation `noise`
    index = np.stack(
        [
            np.where(local, cls, zero),
            np.where(local, q0 + attr, zero),
            np.where(local, u0 + 4 * cls + part, zero),
            s0 + scene,
            np.where(has_mix, mcls, zero),
            np.where(has_mix, q0 + mattr, zero),
            np.where(local, zero, c0 + part % _N_CLUTTER),
            np.full(n, zero + 1),  # the constant row: centres the noise and shifts the ReLU threshold
        ],
        1,
    )
    offset = 0.5 * amplitude + 0.5
    weight = np.stack(
        [gain, 0.8 * gain, 0.5 * gain, np.full(n, 0.4), m, 0.8 * m, (~local).astype(float), np.full(n, -offset)], 1
    )
    noise = rng.random((n, c.feature_dim), dtype=np.float32)
    scale = rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)

    # x = relu(signal + amplitude * (u - 0.5) - 0.5) * scale, in three passes over the block.
    x = torch.nn.functional.embedding_bag(
        torch.from_numpy(index),
        torch.from_numpy(world),
        per_sample_weights=torch.from_numpy(weight.astype(np.float32)),
        mode="sum",
    )
    x.add_(torch.from_numpy(noise), alpha=amplitude).clamp_(min=0).mul_(torch.from_numpy(scale))
    return x.to(torch.float16).numpy().reshape(hi - lo, c.n_regions, c.feature_dim)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


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
    world = _make_world(seed, config.feature_dim)
    n_blocks = -(-config.n_images // _BLOCK)
    if progress is None:
        progress = config.n_images * config.n_regions * config.feature_dim > 20_000_000
    metadata = {
        "generator": "maxmatch synthetic",
        "preset": preset,
        "seed": seed,
        "config": asdict(config),
        "class_names": CLASS_NAMES,
        "attribute_names": ATTRIBUTES,
        "scene_names": SCENE_NAMES,
    }
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
        metadata=metadata,
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


def _write_features(writer: StoreWriter, plan: SyntheticPlan, world: np.ndarray, n_blocks: int, progress: bool) -> None:
    def write(block: int) -> None:
        lo = block * _BLOCK
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
            bar.update(task, completed=min((block + 1) * _BLOCK, plan.config.n_images))


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
