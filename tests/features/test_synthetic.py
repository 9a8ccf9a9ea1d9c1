"""Synthetic demo data: sizes, determinism, and that every caption tells the truth about its image."""

from __future__ import annotations

import re
from collections import Counter

import h5py
import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.features.synthetic import (
    ATTRIBUTES,
    CLASS_NAMES,
    OBJECTS,
    PRESETS,
    generate_synthetic,
    make_plan,
    read_synthetic_truth,
    synthetic_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny.h5", "tiny", seed=0)


def _all_features(store) -> np.ndarray:
    return np.stack([store.image_features(i) for i in range(store.n_images)])


def test_tiny_sizes_match_preset(tiny):
    cfg = PRESETS["tiny"]
    s = open_store(tiny)
    assert (s.feature_kind, s.source, s.layout) == ("region", "synthetic:tiny", "fixed")
    assert (s.n_images, s.max_regions, s.feature_dim) == (cfg.n_images, cfg.n_regions, cfg.feature_dim)
    assert s.n_captions == cfg.n_images * cfg.captions_per_image
    assert s.splits == ["dev", "test", "train"]
    for name, n in (("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test)):
        images, captions = s.split(name)
        assert len(images) == n and len(captions) == 5 * n and s.captions_per_image(name) == 5
        # Evaluation convention: caption j of a split belongs to image j // 5 of the split.
        np.testing.assert_array_equal(s.caption_image[captions], np.repeat(images, 5))
    all_images = np.concatenate([s.split(n)[0] for n in s.splits])
    assert sorted(all_images.tolist()) == list(range(s.n_images))
    assert s.has_boxes and s.image_sizes.shape == (s.n_images, 2)
    x = s.image_features(0)
    assert x.min() >= 0 and (x == 0).mean() > 0.2  # non-negative, sparse-ish like pooled ReLU features


def test_demo_preset_sizes():
    cfg = synthetic_config("demo")
    assert (cfg.n_train, cfg.n_dev, cfg.n_test, cfg.n_regions, cfg.feature_dim) == (3000, 500, 1000, 36, 2048)


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, tiny):
    again = generate_synthetic(tmp_path / "again.h5", "tiny", seed=0)
    other = generate_synthetic(tmp_path / "other.h5", "tiny", seed=1)
    a, b, c = open_store(tiny), open_store(again), open_store(other)
    fa, fb = _all_features(a), _all_features(b)
    assert fa.tobytes() == fb.tobytes()
    with h5py.File(tiny) as f1, h5py.File(again) as f2:
        assert f1["images/features"][:].tobytes() == f2["images/features"][:].tobytes()
        assert f1["images/boxes"][:].tobytes() == f2["images/boxes"][:].tobytes()
    assert a.captions_text() == b.captions_text()
    assert a.fingerprint() == b.fingerprint()
    assert a.captions_text() != c.captions_text()
    assert not np.array_equal(fa, _all_features(c))
    assert a.fingerprint() != c.fingerprint()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_every_caption_names_objects_of_its_own_image(tiny):
    s = open_store(tiny)
    t = read_synthetic_truth(tiny)
    assert t["class_names"] == CLASS_NAMES and t["attribute_names"] == ATTRIBUTES
    synonyms = t["class_synonyms"]
    texts = s.captions_text()
    for j, text in enumerate(texts):
        words = set(_words(text))
        named = [o for o in t["caption_objects"][j] if o >= 0]
        assert 1 <= len(named) <= 3
        for k, o in enumerate(named):
            assert t["object_image"][o] == s.caption_image[j], "caption names an object of another image"
            name = CLASS_NAMES[t["object_class"][o]]
            assert name in words or synonyms.get(name) in words, (text, name)
            if t["caption_has_attr"][j, k]:
                assert ATTRIBUTES[t["object_attr"][o]] in words, (text, ATTRIBUTES[t["object_attr"][o]])
        # Nothing else: every object word in the caption is one of the named objects (or a synonym).
        named_words = {CLASS_NAMES[t["object_class"][o]] for o in named}
        named_words |= {synonyms.get(w) for w in named_words}
        vocabulary = set(CLASS_NAMES) | set(synonyms.values())
        assert (words & vocabulary) <= named_words, text
    # Each object the captions name owns at least two regions of its image.
    for o in np.unique(t["caption_objects"][t["caption_objects"] >= 0]):
        i = t["object_image"][o]
        assert (t["region_object"][i] == o).sum() >= 2


def test_captions_of_an_image_describe_different_subsets():
    plan = make_plan(synthetic_config("tiny", n_train=200), seed=3)
    per = plan.config.captions_per_image
    for i in range(plan.config.n_images):
        rows = plan.caption_objects[i * per : (i + 1) * per]
        subsets = {tuple(sorted(r[r >= 0])) for r in rows}
        assert len(subsets) == per  # 3+ objects give 7+ subsets of 1-3, so five distinct ones exist
        n_obj = (plan.object_image == i).sum()
        assert plan.config.min_objects <= n_obj <= plan.config.objects_cap


def test_objects_recur_across_images_and_vocabulary_covers_tokens():
    plan = make_plan(synthetic_config("demo", n_dev=0, n_test=0), seed=0)
    # Hard negatives: (class, attribute) pairs repeat across images, frequent classes much more than rare ones.
    pairs = Counter(zip(plan.object_class.tolist(), plan.object_attr.tolist()))
    assert max(pairs.values()) > 40 and len(pairs) > 150
    freq = np.bincount(plan.object_class, minlength=len(OBJECTS))
    assert freq.max() > 5 * np.median(freq)
    # SCAN's vocabulary rule (count >= 4 over training captions) covers nearly every token.
    counts = Counter(w for text in plan.captions for w in _words(text))
    covered = sum(c for c in counts.values() if c >= 4) / sum(counts.values())
    assert covered > 0.999
    assert len(counts) < 200


def test_region_features_carry_the_object_class():
    cfg = synthetic_config("tiny", n_train=150, feature_dim=256)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = generate_synthetic(Path(d) / "probe.h5", "tiny", seed=0, n_train=150, feature_dim=256)
        s = open_store(path)
        t = read_synthetic_truth(path)
        feats = _all_features(s).reshape(-1, cfg.feature_dim)
    owner = t["region_object"].reshape(-1)
    mask = owner >= 0
    labels = t["object_class"][owner[mask]]
    x = feats[mask] - feats[mask].mean(0)
    half = len(x) // 2
    classes = np.unique(labels[:half])
    centroids = np.stack([x[:half][labels[:half] == c].mean(0) for c in classes])
    pred = classes[np.argmax(x[half:] @ centroids.T - 0.5 * (centroids**2).sum(1), axis=1)]
    seen = np.isin(labels[half:], classes)
    accuracy = (pred[seen] == labels[half:][seen]).mean()
    assert accuracy > 0.6  # regions are informative but noisy (chance is ~2%)


def test_overrides_and_errors(tmp_path):
    path = generate_synthetic(tmp_path / "o.h5", "tiny", n_train=7, n_dev=2, n_test=3, captions_per_image=4)
    s = open_store(path)
    assert s.n_images == 12 and s.n_captions == 48 and s.captions_per_image("test") == 4
    with pytest.raises(MaxMatchError, match="unknown synthetic preset 'huge'"):
        generate_synthetic(tmp_path / "x.h5", "huge")
    with pytest.raises(MaxMatchError, match="n_trian") as err:
        generate_synthetic(tmp_path / "x.h5", "tiny", n_trian=5)
    assert "n_train" in err.value.hint


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path):
    path = generate_synthetic(tmp_path / "t.h5", "tiny", seed=0)
    mtime = path.stat().st_mtime_ns
    assert generate_synthetic(path, "tiny", seed=0) == path
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(MaxMatchError, match="different arguments"):
        generate_synthetic(path, "tiny", seed=5)
    generate_synthetic(path, "tiny", seed=5, overwrite=True)
    assert open_store(path).metadata["seed"] == 5
