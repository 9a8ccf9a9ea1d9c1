"""The synthetic world's words: scenes, object classes with their kinds and typical scenes, attributes."""

from __future__ import annotations

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

KIND_ATTRIBUTES = {  # the attributes an object of each kind can have
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

N_CLUTTER = 32
"""Background "clutter" prototypes (wall, floor, sky ...) that regions owned by no object show."""
