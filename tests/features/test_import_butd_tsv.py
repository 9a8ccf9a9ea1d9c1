"""Bottom-up-attention TSV import: adaptive boxes, shuffled shards, Karpathy captions and splits, bad rows, resume."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features import butd_tsv
from maxmatch_cli.features.butd_tsv import import_butd_tsv
from maxmatch_cli.features.karpathy import load_karpathy
from maxmatch_cli.features.store import open_store, partial_path

D = 16
SPLITS = ["train", "train", "restval", "train", "val", "test", "test", "train"]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()


def _row(image_id, w, h, boxes, feats) -> str:
    return "\t".join([str(image_id), str(w), str(h), str(len(boxes)), _b64(boxes), _b64(feats)]) + "\n"


@pytest.fixture()
def butd(tmp_path):
    rng = np.random.default_rng(0)
    ids = [391895 + 7 * k for k in range(len(SPLITS))]
    truth = {}
    for k, key in enumerate(ids):
        n = int(rng.integers(10, 20))  # adaptive box counts
        truth[key] = (rng.random((n, D), dtype=np.float32) * 3, rng.random((n, 4), dtype=np.float32) * 400,
                      (640 - k, 480 + k))
    images = []
    for k, (key, split) in enumerate(zip(ids, SPLITS)):
        n_sent = 6 if k == 0 else 5  # COCO has a few images with more than five captions
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{key:012d}.jpg", "imgid": k, "split": split,
                       "cocoid": key, "sentences": [{"raw": f"Image {key} caption {j}.", "tokens": []}
                                                    for j in range(n_sent)]})
    captions = tmp_path / "dataset_coco.json"
    captions.write_text(json.dumps({"images": images, "dataset": "coco"}))
    # Two shards, rows shuffled; an image the json does not know; one image repeated in both shards.
    order = list(rng.permutation(ids))
    shards = [tmp_path / "trainval_resnet101_faster_rcnn_genome.tsv.0", tmp_path / "trainval_resnet101.tsv.1"]
    extra = _row(999, 10, 10, np.zeros((10, 4)), np.ones((10, D)))
    with open(shards[0], "w") as f:
        for key in order[:5]:
            f.write(_row(key, *truth[key][2], truth[key][1], truth[key][0]))
        f.write(extra)
    with open(shards[1], "w") as f:
        for key in [order[2], *order[5:]]:
            f.write(_row(key, *truth[key][2], truth[key][1], truth[key][0]))
    return shards, captions, truth, ids


def test_round_trip_adaptive_boxes_and_splits(butd, tmp_path):
    shards, captions, truth, ids = butd
    out = import_butd_tsv(shards, tmp_path / "b.h5", captions=captions, progress=False, batch_images=3)
    s = open_store(out)
    assert s.layout == "flat" and s.source == "butd-tsv" and s.n_images == len(ids)
    assert sorted(s.image_ids.tolist()) == sorted(ids)
    for i, key in enumerate(s.image_ids.tolist()):
        feats, boxes, size = truth[key]
        assert s.n_regions(i) == len(feats)
        np.testing.assert_allclose(s.image_features(i), feats, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s.image_boxes(i), boxes)
        assert tuple(s.image_sizes[i]) == size
    assert s.splits == ["dev", "test", "train"]
    key_of = s.image_ids
    assert key_of[s.split("train")[0]].tolist() == [ids[k] for k, sp in enumerate(SPLITS) if sp in ("train", "restval")]
    assert key_of[s.split("test")[0]].tolist() == [ids[5], ids[6]]
    images, caps = s.split("train")
    assert s.captions_per_image("train") == 5
    texts = s.captions_text(caps)
    assert texts[:5] == [f"Image {ids[0]} caption {j}." for j in range(5)]  # first five of six kept
    np.testing.assert_array_equal(s.caption_image[caps], np.repeat(images, 5))


def test_corrupt_rows_name_file_and_line(butd, tmp_path):
    shards, captions, _, _ = butd
    lines = shards[1].read_text().splitlines(keepends=True)
    fields = lines[1].split("\t")
    fields[5] = fields[5][:-10] + "!!!!\n"
    shards[1].write_text(lines[0] + "\t".join(fields) + "".join(lines[2:]))
    with pytest.raises(MaxMatchError, match=r"\.tsv\.1, line 2 .*base64") as err:
        import_butd_tsv(shards, tmp_path / "b.h5", captions=captions, progress=False)
    assert str(shards[1]) in err.value.message
    assert partial_path(tmp_path / "b.h5").exists()  # what was written stays, for a resume once fixed

    # A row cut short (a truncated download): too few columns.
    shards[1].write_text(lines[0] + lines[1][:40] + "\n")
    with pytest.raises(MaxMatchError, match=r"line 2 has 5 columns.*truncated"):
        import_butd_tsv(shards, tmp_path / "c.h5", captions=captions, progress=False)

    # num_boxes disagreeing with the arrays.
    fields = lines[1].split("\t")
    fields[3] = "3"
    shards[1].write_text(lines[0] + "\t".join(fields))
    with pytest.raises(MaxMatchError, match="num_boxes=3"):
        import_butd_tsv(shards, tmp_path / "d.h5", captions=captions, progress=False)


def test_missing_images_stop_or_are_left_out(butd, tmp_path):
    shards, captions, truth, ids = butd
    with pytest.raises(MaxMatchError, match=r"images in .* have no row") as err:
        import_butd_tsv(shards[:1], tmp_path / "m.h5", captions=captions, progress=False)
    assert "--allow-missing" in err.value.hint
    out = import_butd_tsv(shards[:1], tmp_path / "m2.h5", captions=captions, allow_missing=True, progress=False)
    s = open_store(out)
    assert s.n_images == 5 and s.metadata["n_missing_images"] == len(ids) - 5
    assert sum(len(s.split(n)[0]) for n in s.splits) == 5
    assert s.n_captions == 25


def test_resume_after_interrupt_equals_uninterrupted(butd, tmp_path, monkeypatch):
    shards, captions, _, _ = butd
    whole = import_butd_tsv(shards, tmp_path / "whole.h5", captions=captions, progress=False, batch_images=2)
    out = tmp_path / "r.h5"
    real = butd_tsv.decode_row

    def interrupted(path, number, line, dim=None):
        if path == shards[1] and number == 2:
            raise KeyboardInterrupt
        return real(path, number, line, dim)

    monkeypatch.setattr(butd_tsv, "decode_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_butd_tsv(shards, out, captions=captions, progress=False, batch_images=2)
    assert partial_path(out).exists()
    monkeypatch.setattr(butd_tsv, "decode_row", real)
    import_butd_tsv(shards, out, captions=captions, progress=False, batch_images=2)
    assert open_store(out).fingerprint() == open_store(whole).fingerprint()


def test_not_a_tsv_and_no_matching_rows(butd, tmp_path):
    _, captions, _, _ = butd
    other = tmp_path / "other.tsv"
    other.write_text(_row(5, 1, 1, np.zeros((2, 4)), np.zeros((2, D))))
    with pytest.raises(MaxMatchError, match="none of the TSV rows"):
        import_butd_tsv([other], tmp_path / "o.h5", captions=captions, progress=False)
    with pytest.raises(MaxMatchError, match="does not exist"):
        import_butd_tsv([tmp_path / "nope.tsv"], tmp_path / "o.h5", captions=captions, progress=False)


def test_karpathy_errors(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{not json")
    with pytest.raises(MaxMatchError, match="not valid JSON"):
        load_karpathy(path)
    path.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a"}]}]}))
    with pytest.raises(MaxMatchError, match=r"1\.jpg\) has 1 captions; 5 are needed"):
        load_karpathy(path)
    path.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "holdout", "sentences": []}]}))
    with pytest.raises(MaxMatchError, match="split 'holdout'"):
        load_karpathy(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(MaxMatchError, match="no 'images' list"):
        load_karpathy(path)
    # Flickr30K: no cocoid, the file number is the key.
    path.write_text(json.dumps({"images": [{"filename": "1000092795.jpg", "split": "train",
                                            "sentences": [{"raw": f"c{j}"} for j in range(5)]}]}))
    assert load_karpathy(path)[0].key == 1000092795
