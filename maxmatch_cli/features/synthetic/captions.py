"""Caption text: which objects each caption names, and the English sentence that names them."""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np

from maxmatch_cli.features.synthetic.vocabulary import ATTRIBUTES, OBJECTS, SCENES

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


def draw_captions(
    first: np.ndarray,
    object_class: np.ndarray,
    object_attr: np.ndarray,
    image_scene: np.ndarray,
    per_image: int,
    rnd: random.Random,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``per_image`` captions for each image, each naming a different subset of 1-3 of the image's objects.

    Args:
        first: ``(N + 1,)`` index of each image's first object in the object table (and the table's length).
        object_class: ``(O,)`` class of each object.
        object_attr: ``(O,)`` attribute of each object.
        image_scene: ``(N,)`` scene of each image.
        per_image: captions per image.
        rnd: the caption stream (consumed in image order).

    Returns:
        The captions, image by image; ``(M, 3)`` objects each caption names (-1 = unused slot); ``(M, 3)``
        whether each named object carries its attribute word.
    """
    n_images = len(image_scene)
    captions: list[str] = []
    cap_objects = np.full((n_images * per_image, 3), -1, dtype=np.int64)
    cap_has_attr = np.zeros((n_images * per_image, 3), dtype=bool)
    cls_list, attr_list = object_class.tolist(), object_attr.tolist()
    for i in range(n_images):
        lo, hi = int(first[i]), int(first[i + 1])
        cls_i, attr_i = cls_list[lo:hi], attr_list[lo:hi]
        for subset in _caption_subsets(hi - lo, per_image, rnd):
            # A lone object always gets its attribute: "a dog" alone would describe half the data set.
            has_attr = [len(subset) == 1 or rnd.random() >= 0.15 for _ in subset]
            j = len(captions)
            captions.append(_caption_text(subset, cls_i, attr_i, has_attr, int(image_scene[i]), rnd))
            cap_objects[j, : len(subset)] = lo + np.array(subset)
            cap_has_attr[j, : len(subset)] = has_attr
    return captions, cap_objects, cap_has_attr
