"""``extract-features --images DIR`` without captions (a gallery) and with plain captions files (txt, csv, json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.captions_file import load_entries
from maxmatch_cli.features.extract import extract_features
from maxmatch_cli.features.store import open_store

runner = CliRunner()
NAMES = ["b.png", "a.png", "sub/c.jpg"]  # sorted: a.png, b.png, sub/c.jpg


pytestmark = pytest.mark.usefixtures("reuse_random_models")


@pytest.fixture()
def gallery(tmp_path):
    from PIL import Image

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate(NAMES):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * k, 48, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _extract(root, out, **kw):
    kw.setdefault("kind", "grid")
    if kw["kind"] != "pixels":
        kw.update(weights="random", device="cpu", batch_size=2, num_workers=0, image_size=64)
    if kw["kind"] == "region":
        kw.update(backbone="fasterrcnn_resnet50_fpn", num_boxes=3)
    return extract_features(out, images=root, progress=False, **kw)


@pytest.mark.parametrize("kind", ["grid", "region", "pixels"])
def test_gallery_without_captions(gallery, tmp_path, kind):
    s = open_store(_extract(gallery, tmp_path / f"{kind}.h5", kind=kind))
    assert s.feature_kind == kind
    assert s.image_ids.tolist() == ["a.png", "b.png", "sub/c.jpg"]
    assert s.n_images == 3 and s.n_captions == 0
    assert s.splits == ["gallery"]
    images, caps = s.split("gallery")
    assert images.tolist() == [0, 1, 2] and caps.tolist() == []
    assert s.image_sizes.tolist() == [[48, 48], [48, 40], [48, 56]]
    assert s.image_root == str(gallery.resolve()) and s.image_files.tolist() == ["a.png", "b.png", "sub/c.jpg"]
    if kind != "pixels":
        assert s.image_features(2).shape[0] == (4 if kind == "grid" else 3)
    else:
        assert s.image_path(2).name == "c.jpg"


def test_gallery_cli_split_name_info_json_and_evaluate_error(gallery, tmp_path):
    out = tmp_path / "g.h5"
    result = _cli("extract-features", "--images", gallery, "--kind", "pixels", "--split", "photos", "--out", out)
    assert result.exit_code == 0, result.output
    result = _cli("features", "info", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["n_images"], info["n_captions"]) == (3, 0)
    assert info["splits"] == {"photos": {"images": 3, "captions": 0, "captions_per_image": 0}}
    assert info["metadata"]["captions_format"] == "none (gallery)"
    # Evaluation needs captions: a clear error, not a crash.
    from maxmatch_cli.data.datasets import split_layout

    with pytest.raises(MaxMatchError, match=r"has no captions \(3 images\): a gallery can be indexed"):
        split_layout(open_store(out), "photos", 5)
    result = _cli("extract-features", "--images", gallery, "--kind", "pixels", "--split", "a", "--split", "b",
                  "--out", tmp_path / "x.h5")
    assert result.exit_code == 2 and "--split was given 2 times" in result.output


def _write_captions(tmp_path, fmt):
    rows = [("b.png", "a red, round thing"), ("sub/c.jpg", "third image"), ("b.png", "second caption of b"),
            ("a.png", "only one for a")]
    if fmt == "txt":
        path = tmp_path / "caps.txt"
        path.write_text("".join(f"{i}\t{c}\n" for i, c in rows[:2]) + "\n" +
                        "".join(f"{i}\t{c}\n" for i, c in rows[2:]))
    elif fmt == "csv":
        import csv

        path = tmp_path / "caps.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "image", "caption"])
            w.writerows([k, i, c] for k, (i, c) in enumerate(rows))
    elif fmt == "json":
        path = tmp_path / "caps.json"
        path.write_text(json.dumps([{"image": i, "caption": c} for i, c in rows]))
    else:  # no extension: told by content
        path = tmp_path / "captions"
        path.write_text("".join(f"{i}\t{c}\n" for i, c in rows))
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "json", "sniffed"])
def test_plain_captions_grouped_per_image_in_file_order(gallery, tmp_path, fmt):
    caps = _write_captions(tmp_path, fmt)
    s = open_store(_extract(gallery, tmp_path / "p.h5", captions=caps, kind="pixels"))
    assert s.image_ids.tolist() == ["b.png", "sub/c.jpg", "a.png"]  # order of first caption
    assert s.splits == ["train"]
    images, cap_idx = s.split("train")
    by_image = {s.image_ids[i]: [] for i in images}
    for c in cap_idx:
        by_image[s.image_ids[s.caption_image[c]]].append(s.captions_text([c])[0])
    assert by_image == {"b.png": ["a red, round thing", "second caption of b"], "sub/c.jpg": ["third image"],
                        "a.png": ["only one for a"]}
    np.testing.assert_array_equal(s.caption_image[cap_idx], [0, 0, 1, 2])
    assert s.captions_per_image("train") == 0
    assert s.metadata["captions_per_image"] == "varies (1..2)" and "captions_note" in s.metadata


def test_plain_captions_grid_features_and_split_option(gallery, tmp_path):
    caps = tmp_path / "c.txt"
    caps.write_text("a.png\tone\nsub/c.jpg\ttwo\n")
    s = open_store(_extract(gallery, tmp_path / "g.h5", captions=caps, splits=["test"]))
    assert s.splits == ["test"] and s.image_ids.tolist() == ["a.png", "sub/c.jpg"]
    assert s.captions_per_image("test") == 1 and s.metadata["captions_per_image"] == 1
    assert s.captions_text() == ["one", "two"] and s.image_features(0).shape == (4, 2048)


@pytest.mark.parametrize("name,text,where", [
    ("bad.txt", "a.png\tfine\nb.png no tab here\n", "bad.txt:2"),
    ("bad.csv", "image,caption\na.png,ok\nb.png\n", "bad.csv:3"),
    ("head.csv", "file,text\na.png,ok\n", "head.csv:1"),
    ("bad.json", '[{"image": "a.png", "caption": "x"},\n {"image": "b.png"', "bad.json:2"),
    ("item.json", '[{"image": "a.png", "caption": "x"}, {"image": "b.png"}]', "item.json, item 1"),
    ("empty.txt", "a.png\t  \n", "empty.txt:1"),
])
def test_malformed_caption_file_names_file_and_line(gallery, tmp_path, name, text, where):
    caps = tmp_path / name
    caps.write_text(text)
    result = _cli("extract-features", "--images", gallery, "--captions", caps, "--kind", "pixels",
                  "--out", tmp_path / "o.h5")
    assert result.exit_code == 2, result.output
    assert where in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "o.h5").exists()


def test_missing_image_is_named_or_skipped(gallery, tmp_path):
    caps = tmp_path / "c.txt"
    caps.write_text("a.png\tthere\nnope/gone.png\tnot there\n")
    with pytest.raises(MaxMatchError, match=r"1 image\(s\) named in .*c\.txt are not in .*nope/gone\.png \(.*c\.txt:2\)"):
        _extract(gallery, tmp_path / "m.h5", captions=caps, kind="pixels")
    s = open_store(_extract(gallery, tmp_path / "m.h5", captions=caps, kind="pixels", skip_unreadable=True))
    assert s.image_ids.tolist() == ["a.png"] and s.captions_text() == ["there"]
    assert s.metadata["skipped_images"] == ["nope/gone.png"]
    s = open_store(_extract(gallery, tmp_path / "mg.h5", captions=caps, skip_unreadable=True))
    assert s.image_ids.tolist() == ["a.png"] and s.metadata["skipped_images"] == ["nope/gone.png"]


def test_karpathy_json_still_detected_and_split_refused(gallery, tmp_path):
    caps = tmp_path / "dataset.json"
    caps.write_text(json.dumps({"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": f"cap {j}"} for j in range(5)]}]}))
    entries = load_entries(gallery, caps)
    assert entries.format == "karpathy" and entries.images[0].key == "a" and entries.images[0].split == "test"
    with pytest.raises(MaxMatchError, match="--split does not apply"):
        load_entries(gallery, caps, split="x")
    with pytest.raises(MaxMatchError, match="no image files under"):
        load_entries(_empty(tmp_path), None)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
