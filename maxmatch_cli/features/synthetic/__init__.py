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

Modules: ``vocabulary`` (scenes, classes, attributes), ``config`` (:class:`SyntheticConfig`, the presets),
``plan`` (:func:`make_plan`: everything but the features), ``captions`` (caption text), ``features`` (the
prototype table and :func:`block_features`), ``files`` (:func:`generate_synthetic`, :func:`read_synthetic_truth`).
"""

from maxmatch_cli.features.synthetic.config import PRESETS, SyntheticConfig, synthetic_config
from maxmatch_cli.features.synthetic.features import block_features
from maxmatch_cli.features.synthetic.files import generate_synthetic, read_synthetic_truth, timed_generate
from maxmatch_cli.features.synthetic.plan import SyntheticPlan, make_plan
from maxmatch_cli.features.synthetic.vocabulary import ATTRIBUTES, CLASS_NAMES, OBJECTS, SCENE_NAMES, SCENES

__all__ = [
    "ATTRIBUTES",
    "CLASS_NAMES",
    "OBJECTS",
    "PRESETS",
    "SCENES",
    "SCENE_NAMES",
    "SyntheticConfig",
    "SyntheticPlan",
    "block_features",
    "generate_synthetic",
    "make_plan",
    "read_synthetic_truth",
    "synthetic_config",
    "timed_generate",
]
