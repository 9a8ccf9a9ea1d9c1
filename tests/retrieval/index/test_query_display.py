"""What `maxmatch query` shows of each result besides its id: the caption text (captions index) or image file
(images index), and in a query by image id the image's own captions, checked against the feature file directly."""

import json
import shutil
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.cli.index import CELL_WIDTH
from maxmatch_cli.features.store import open_store
from maxmatch_cli.progress import console
from maxmatch_cli.retrieval.index import load_index
from maxmatch_cli.retrieval.index.metadata import METADATA_KEY, OWNERS_FILE, PATHS_FILE, item_metadata

# Fixtures: ckpt, index_dir in conftest.py; tiny_h5 in tests/conftest.py.


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def query_json(*args):
    result = invoke("query", *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=["exact", "faiss"])
def captions_dir(request, ckpt, tiny_h5, tmp_path_factory):
    if request.param == "faiss":
        pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("display") / f"captions-{request.param}"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--out", out,
                    "--engine", request.param, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out, request.param


def truth(tiny_h5, image_id):
    """Independent lookup in the feature file: caption row -> text and image id, and the test captions of
    ``image_id``."""
    store = open_store(tiny_h5)
    _, captions = store.split("test")
    owner_ids = np.asarray(store.image_ids)[store.caption_image]
    texts = store.captions_text()
    own = [int(c) for c in captions if str(owner_ids[c]) == str(image_id)]
    return texts, owner_ids, own


def test_captions_and_own_marks_equal_the_feature_file(captions_dir, tiny_h5):
    out, engine = captions_dir
    store = open_store(tiny_h5)
    image_id = str(store.image_ids[store.split("test")[0][3]])
    texts, owner_ids, own = truth(tiny_h5, image_id)
    assert len(own) == 5
    record = query_json(out, "--image-id", image_id, "-k", 12, "--engine", engine)
    assert record["engine"] == engine
    (query,) = record["queries"]
    hits = query["results"]
    assert len(hits) == 12
    for h in hits:
        assert h["text"] == texts[h["id"]]
        assert str(h["image_id"]) == str(owner_ids[h["id"]])
        assert h["own"] is (h["id"] in own)
    assert query["own_captions"] == {"in_results": sum(h["id"] in own for h in hits), "in_index": 5}
    # -k the whole index: every own caption is found and marked exactly once
    record = query_json(out, "--image-id", image_id, "-k", 100, "--engine", "exact")
    marked = sorted(h["id"] for h in record["queries"][0]["results"] if h["own"])
    assert marked == sorted(own) and record["queries"][0]["own_captions"]["in_results"] == 5


@pytest.mark.parametrize("width", [90, 200])
def test_table_shows_captions_at_a_fixed_width_and_marks_own(captions_dir, tiny_h5, width, monkeypatch):
    out, _ = captions_dir
    store = open_store(tiny_h5)
    image_id = str(store.image_ids[store.split("test")[0][0]])
    texts, owner_ids, own = truth(tiny_h5, image_id)
    ids = [h["id"] for h in query_json(out, "--image-id", image_id, "-k", 8)["queries"][0]["results"]]
    monkeypatch.setattr(console, "width", width)
    result = invoke("query", out, "--image-id", image_id, "-k", 8, "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(" own " in x and " caption " in x for x in lines) and "own ✓: a caption of this image" in result.output
    for cid in ids:  # each caption's lines, wrapped at CELL_WIDTH whatever the width, on the row of its id
        wrapped = textwrap.wrap(texts[cid], CELL_WIDTH)
        row = next(i for i, x in enumerate(lines) if f" {cid} " in x and wrapped[0] in x)
        for j, part in enumerate(wrapped):
            assert part in lines[row + j]
        assert ("✓" in lines[row]) is (cid in own)
    found = sum(cid in own for cid in ids)
    assert f"image {image_id}: {found} of its 5 captions in the index are in these 8 results" in result.output


def _old(index_dir, tmp_path, *, data=None):
    """A copy of an index as maxmatch wrote it before metadata files (and, with ``data``, another feature file)."""
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in manifest.pop(METADATA_KEY):
        (old / name).unlink()
    if data is not None:
        manifest["data"] = str(data)
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_an_index_without_metadata_still_queries(captions_dir, index_dir, tiny_h5, tmp_path):
    out, _ = captions_dir
    store = open_store(tiny_h5)
    image_id = str(store.image_ids[store.split("test")[0][1]])
    texts, owner_ids, own = truth(tiny_h5, image_id)
    new = query_json(out, "--image-id", image_id, "-k", 6)["queries"][0]
    # its feature file unchanged: owners looked up there, the same marks as a new index's
    old = _old(out, tmp_path / "a")
    assert not (old / OWNERS_FILE).exists()
    assert query_json(old, "--image-id", image_id, "-k", 6)["queries"][0] == new
    # the feature file gone: ids and texts still shown, nothing marked, and the table says why
    shutil.copy(tiny_h5, tmp_path / "copy.h5")
    old = _old(out, tmp_path / "b", data=tmp_path / "moved.h5")
    record = query_json(old, "--image-id", image_id, "-k", 6, "--data", tmp_path / "copy.h5")["queries"][0]
    assert "own_captions" not in record
    assert [(h["id"], h["text"]) for h in record["results"]] == [(h["id"], h["text"]) for h in new["results"]]
    assert all("own" not in h and "image_id" not in h for h in record["results"])
    result = invoke("query", old, "--image-id", image_id, "-k", 6, "--data", tmp_path / "copy.h5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "✓" not in result.output and "rebuild the index to mark them" in result.output
    # an old images index: ids only, as before
    old = _old(index_dir, tmp_path / "c")
    hits = query_json(old, "--text", "a dog", "-k", 3)["queries"][0]["results"]
    assert len(hits) == 3 and all("path" not in h for h in hits)


def test_images_index_shows_image_files(index_dir, tmp_path):
    index = load_index(index_dir)
    assert index.paths is None  # synthetic features list no files
    hits = query_json(index_dir, "--text", "a dog", "-k", 4)["queries"][0]["results"]
    assert all("path" not in h for h in hits)
    # the same index with the files an image-file store would have given it
    copy = tmp_path / "with-paths"
    shutil.copytree(index_dir, copy)
    paths = [f"/photos/{'deep/' * (i % 12)}img-{index.ids[i]}.jpg" for i in range(len(index))]
    (copy / PATHS_FILE).write_text(json.dumps(paths))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, METADATA_KEY: [PATHS_FILE]}))
    hits = query_json(copy, "--text", "a dog", "-k", 4)["queries"][0]["results"]
    assert [h["path"] for h in hits] == [paths[h["row"]] for h in hits]
    result = invoke("query", copy, "--text", "a dog", "-k", 4, "--device", "cpu")
    assert result.exit_code == 0 and "image file" in result.output
    for h in hits:
        shown = paths[h["row"]] if len(paths[h["row"]]) <= CELL_WIDTH else "…" + paths[h["row"]][1 - CELL_WIDTH:]
        assert shown in result.output
    # a listed file missing is a damaged index: one clear error
    (copy / PATHS_FILE).unlink()
    result = invoke("query", copy, "--text", "a dog", "--device", "cpu")
    assert result.exit_code != 0 and f"has no {PATHS_FILE}" in result.output and "rebuild" in result.output


def test_build_records_image_files_of_an_image_file_store(tmp_path):
    from PIL import Image

    from maxmatch_cli.features.pixels import index_images

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    entries = []
    for k in range(4):
        name = f"{k:03d}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * k, dtype=np.uint8)).save(root / "sub" / name)
        entries.append({"filepath": "sub", "filename": name, "imgid": k, "split": "test",
                        "sentences": [{"raw": f"a square of shade {k} number {j}"} for j in range(5)]})
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    store = open_store(index_images(root, tmp_path / "captions.json", tmp_path / "px.h5", progress=False))
    images, captions = store.split("test")
    rows = images[::-1]
    (paths,) = item_metadata(store, "images", rows).values()
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [["sub", f"{k:03d}.png"] for k in (3, 2, 1, 0)]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)
    owners = item_metadata(store, "captions", captions)[OWNERS_FILE]
    assert owners == [store.image_ids[store.caption_image[c]] for c in captions]


def test_sharded_captions_index_marks_as_one_index(ckpt, tiny_h5, tmp_path):
    from maxmatch_cli.retrieval.index import query_index

    for i in range(2):
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--shard",
                        f"{i}/2", "--out", tmp_path / "sharded", "--device", "cpu")
        assert result.exit_code == 0, result.output
    store = open_store(tiny_h5)
    image_id = store.image_ids[store.split("test")[0][-1]]
    texts, owner_ids, own = truth(tiny_h5, image_id)
    (hits,), _ = query_index(tmp_path / "sharded", image_ids=[image_id], k=100, device="cpu")
    assert len(hits) == 100 and len({h.id for h in hits}) == 100
    assert [h.text for h in hits] == [texts[h.id] for h in hits]
    assert [h.image_id for h in hits] == [owner_ids[h.id] for h in hits]
    assert sorted(h.id for h in hits if h.own) == sorted(own)
