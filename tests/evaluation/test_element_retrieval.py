"""Per-element retrieval (Figures 5–7): top-1 per query element, distinct items, example picks, image files."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.collapse import analyze_collapse, slot_retrieval
from maxmatch_cli.evaluation.element_retrieval import (SplitItems, distinct_counts, element_retrieval, element_top1,
                                                       image_files, open_compare, pick_examples)
from maxmatch_cli.features.store import open_store


def _brute_top1(queries, gallery):
    """For each query element, loop over every gallery item and its elements: best cosine, first index on ties."""
    q, k, _ = queries.shape
    index = np.zeros((q, k), dtype=np.int64)
    score = np.zeros((q, k))
    for i in range(q):
        for e in range(k):
            a = queries[i, e].double()
            best, where = -np.inf, -1
            for g in range(gallery.shape[0]):
                s = max(float(a @ b.double() / (a.norm() * b.double().norm())) for b in gallery[g])
                if s > best + 1e-9:
                    best, where = s, g
            index[i, e], score[i, e] = where, best
    return index, score


@pytest.mark.parametrize("max_cells", [1 << 24, 7 * 4, 13])  # one block; 1 row a block; 1 row (cells < a row)
def test_top1_matches_a_brute_force_loop(max_cells):
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(5, 3, 6, generator=g), torch.randn(7, 4, 6, generator=g) * 3
    index, score = element_top1(queries, gallery, max_cells=max_cells)
    ref_index, ref_score = _brute_top1(queries, gallery)
    assert index.tolist() == ref_index.tolist()
    assert np.allclose(score.numpy(), ref_score, atol=1e-5)


def test_ties_go_to_the_lowest_gallery_index():
    g = torch.Generator().manual_seed(1)
    gallery = torch.randn(4, 2, 5, generator=g)
    gallery = torch.cat([gallery, gallery])  # items 4..7 repeat items 0..3
    queries = gallery[[6, 1]].clone()  # every element finds itself (cosine 1) in two items
    index, score = element_top1(queries, gallery)
    assert index.tolist() == [[2, 2], [1, 1]]
    assert torch.allclose(score, torch.ones(2, 2))


def test_distinct_counts_match_a_set_per_row():
    top = torch.randint(0, 5, (50, 4), generator=torch.Generator().manual_seed(2))
    assert distinct_counts(top).tolist() == [len(set(row)) for row in top.tolist()]


def _items(n_images, cpi=1):
    return SplitItems(list(range(100, 100 + n_images)), [f"caption {j}" for j in range(n_images * cpi)],
                      [None] * n_images, cpi)


def test_collapsed_sets_retrieve_one_item_and_orthogonal_sets_k_items():
    k, d = 4, 8
    eye = torch.eye(d)
    # Collapsed: every element of every image set is the same vector, aimed at caption 0 only.
    collapsed = eye[0].expand(3, k, d).clone()
    captions = torch.stack([eye[j].expand(k, d) for j in range(3)])  # caption j: K copies of e_j
    out = element_retrieval(collapsed, captions, _items(3), picks=[0, 2])
    assert out.distinct["i2t"] == {"shown": 1.0, "split": 1.0, "shown_images": 1.0, "split_images": 1.0}
    assert [e["item"] for e in out.examples[0]["elements"]] == [0] * k
    assert [e["same_as"] for e in out.examples[0]["elements"]] == [None, 1, 1, 1]
    # Orthogonal: element j of every image is e_j, and caption j holds e_j: the K elements find K captions.
    spread = eye[:k].expand(4, k, d).clone()
    captions = torch.stack([eye[j].expand(k, d) for j in range(4)])
    out = element_retrieval(spread, captions, _items(4), picks=[1])
    assert out.distinct["i2t"]["shown"] == out.distinct["i2t"]["split"] == float(k)
    assert [e["item"] for e in out.examples[0]["elements"]] == [0, 1, 2, 3]
    assert [e["correct"] for e in out.examples[0]["elements"]] == [False, True, False, False]
    # Caption sets of K copies are collapsed by construction: 1 image each way.
    assert out.distinct["t2i"]["split"] == 1.0


def test_distinct_means_match_a_brute_force_loop_and_slot_retrieval():
    g = torch.Generator().manual_seed(3)
    images, captions, cpi = torch.randn(6, 3, 5, generator=g), torch.randn(12, 3, 5, generator=g), 2
    out = element_retrieval(images, captions, _items(6, cpi), picks=[0, 5])
    ref_i2t, _ = _brute_top1(images, captions)
    ref_t2i, _ = _brute_top1(captions, images)
    assert out.distinct["i2t"]["split"] == pytest.approx(np.mean([len(set(r)) for r in ref_i2t.tolist()]))
    assert out.distinct["i2t"]["shown"] == pytest.approx(np.mean([len(set(ref_i2t[p])) for p in (0, 5)]))
    assert out.distinct["t2i"]["shown"] == pytest.approx(np.mean([len(set(ref_t2i[p * cpi])) for p in (0, 5)]))
    assert out.distinct["i2t"]["split_images"] == pytest.approx(
        np.mean([len({j // cpi for j in r}) for r in ref_i2t.tolist()]))
    # The same numbers as §4.5's slot retrieval, which ranks through set_similarity("mil").
    old = slot_retrieval(images, captions, cpi)
    assert out.distinct["i2t"]["split"] == pytest.approx(old["i2t"]["distinct"])
    assert out.distinct["t2i"]["split"] == pytest.approx(old["t2i"]["distinct"])
    # Records: each i2t element names its caption's text and image, each t2i query its first caption.
    first = out.examples[0]
    assert first["direction"] == "i2t" and first["query"]["image_id"] == 100
    for e, j in zip(first["elements"], ref_i2t[0]):
        assert (e["item"], e["text"], e["image"]) == (j, f"caption {j}", j // cpi)
    t2i = [e for e in out.examples if e["direction"] == "t2i"]
    assert [e["query"]["caption"] for e in t2i] == [0, 10] and t2i[1]["query"]["text"] == "caption 10"
    json.dumps(out.to_json())  # plain values only


def test_pick_examples():
    ids = [f"x{i}" for i in range(10)]
    assert pick_examples(4, ids) == [0, 3, 6, 9]
    assert pick_examples("1", ids) == [0] and pick_examples("0", ids) == []
    assert pick_examples(50, ids) == list(range(10))
    assert pick_examples("x7, x2,x7", ids) == [7, 2]
    assert pick_examples("6,", list(range(3, 9))) == [3]  # one numeric id: with a trailing comma
    with pytest.raises(MaxMatchError, match=r"id\(s\) x11 not in the split") as err:
        pick_examples("x1,x11", ids)
    assert "--examples x0,x1,x2" in err.value.hint
    with pytest.raises(MaxMatchError, match="negative"):
        pick_examples(-1, ids)


def _pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def test_image_files_of_an_image_file_store(tmp_path):
    from maxmatch_cli.features.pixels import index_images

    _pngs(tmp_path / "imgs" / "set", 3)
    (tmp_path / "caps.txt").write_text("".join(f"set/{i:02d}.png\ta photo {i}\n" for i in range(3)))
    store = open_store(index_images(tmp_path / "imgs", tmp_path / "caps.txt", tmp_path / "px.h5",
                                    captions_per_image=1, progress=False))
    root = (tmp_path / "imgs").resolve()
    assert image_files(store, [2, 0]) == [str(root / "set" / "02.png"), str(root / "set" / "00.png")]
    (root / "set" / "02.png").unlink()  # a file gone since: the id is shown instead
    assert image_files(store, [2, 1]) == [None, str(root / "set" / "01.png")]


@pytest.fixture()
def grid_store(tmp_path, reuse_random_models):
    """A grid store extracted (random CNN weights) from a folder of three PNGs under set/: ids = paths."""
    from maxmatch_cli.features.extract import extract_features

    _pngs(tmp_path / "imgs" / "set", 3)
    out = extract_features(tmp_path / "grid.h5", images=tmp_path / "imgs", kind="grid", weights="random",
                           device="cpu", image_size=64, batch_size=2, num_workers=0, progress=False)
    return out, (tmp_path / "imgs").resolve()


def test_image_files_of_a_grid_store_without_and_with_a_moved_folder(grid_store, tmp_path):
    path, root = grid_store
    store = open_store(path)
    assert store.image_root == str(root) and store.image_files.tolist() == ["set/00.png", "set/01.png", "set/02.png"]
    assert image_files(store, [2, 0]) == [str(root / "set" / "02.png"), str(root / "set" / "00.png")]
    moved = tmp_path / "moved"
    shutil.move(root, moved)  # the folder moved since the extraction: found again under --images
    assert image_files(store, [0, 1]) == [None, None]
    assert image_files(store, [0, 1], moved) == [str(moved / "set" / "00.png"), str(moved / "set" / "01.png")]
    (moved / "set" / "01.png").unlink()
    assert image_files(store, [1, 2], moved) == [None, str(moved / "set" / "02.png")]


def test_an_images_index_of_a_grid_store_keeps_its_image_files(grid_store):
    from maxmatch_cli.retrieval.index.metadata import PATHS_FILE, item_metadata

    path, root = grid_store  # `maxmatch query` then shows these paths beside the ids
    assert item_metadata(open_store(path), "images", np.array([2, 0])) == {
        PATHS_FILE: [str(root / "set" / "02.png"), str(root / "set" / "00.png")]}


@pytest.mark.filterwarnings("ignore:.*no valid recorded content hash")  # edited in place on purpose
def test_a_grid_store_without_image_files_loads_as_before(grid_store, tmp_path):
    path, root = grid_store
    old = shutil.copy(path, tmp_path / "old.h5")
    with h5py.File(old, "r+") as f:  # what extract-features wrote before it recorded the files
        del f["images/files"], f.attrs["image_root"]
    store = open_store(old)
    assert store.image_files is None and store.image_root is None and "image_root" not in store.describe()
    with pytest.raises(ValueError, match="does not record image files"):
        store.image_path(0)
    assert image_files(store, [0, 2]) == [None, None]
    assert image_files(store, [0, 2], root) == [str(root / "set" / "00.png"), str(root / "set" / "02.png")]  # ids


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "set/../../x.png"])
def test_image_paths_leaving_the_folder_are_refused(grid_store, tmp_path, bad):
    from typer.testing import CliRunner

    from maxmatch_cli.cli.app import app

    path, _ = grid_store
    copy = shutil.copy(path, tmp_path / "bad.h5")
    with h5py.File(copy, "r+") as f:
        f["images/files"][1] = bad
    with pytest.raises(MaxMatchError, match=r"names 1 image file\(s\) outside its image folder") as err:
        open_store(copy)
    assert repr(bad) in str(err.value) and "--kind grid" in err.value.hint
    result = CliRunner().invoke(app, ["features", "info", str(copy)])
    assert result.exit_code != 0 and "outside its image folder" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("drop", ["images/files", "image_root"])
def test_image_files_without_their_root_or_the_reverse_is_inconsistent(grid_store, tmp_path, drop):
    path, _ = grid_store
    copy = shutil.copy(path, tmp_path / "half.h5")
    with h5py.File(copy, "r+") as f:
        del (f.attrs if drop == "image_root" else f)[drop]
    with pytest.raises(MaxMatchError, match="is inconsistent: it has .* but no"):
        open_store(copy)


def test_image_files_from_ids_under_a_folder(tiny_h5, tmp_path):
    store = open_store(tiny_h5)
    assert image_files(store, [0, 1]) == [None, None]  # synthetic data: no image files
    copy = shutil.copy(tiny_h5, tmp_path / "ids.h5")
    with h5py.File(copy, "r+") as f:  # string ids, as extract-features images stores relative paths
        n = len(f["images/ids"])
        del f["images/ids"]
        f["images/ids"] = np.array([f"set/{i:02d}.png" for i in range(n)], dtype=h5py.string_dtype())
    _pngs(tmp_path / "root" / "set", 2)
    store = open_store(copy)
    assert image_files(store, [0, 1, 2]) == [None, None, None]
    assert image_files(store, [0, 1, 2], tmp_path / "root") == [str(tmp_path / "root" / "set" / "00.png"),
                                                                 str(tmp_path / "root" / "set" / "01.png"), None]


def test_image_files_from_the_karpathy_json_of_an_extraction(tiny_h5, tmp_path):
    # extract-features images with a Karpathy json stores COCO ids and names the json in its metadata.
    _pngs(tmp_path / "root" / "val2014", 2)
    entries = [{"cocoid": i, "filepath": "val2014", "filename": f"{i:02d}.png", "split": "test",
                "sentences": [{"raw": "a photo"}]} for i in (0, 1, 5)]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": entries}))
    copy = shutil.copy(tiny_h5, tmp_path / "grid.h5")
    with h5py.File(copy, "r+") as f:
        f.attrs["metadata"] = json.dumps({**json.loads(f.attrs["metadata"]), "captions": str(karpathy)})
    store = open_store(copy)
    root = tmp_path / "root"
    # Ids 0 and 1 have entries and files; 5 has an entry but no file; 2 no entry. Without a folder: nothing.
    assert image_files(store, [0, 1, 5, 2], root) == [str(root / "val2014" / "00.png"),
                                                       str(root / "val2014" / "01.png"), None, None]
    assert image_files(store, [0, 1]) == [None, None]
    karpathy.write_text("[]")  # not a Karpathy file (any more): ids only
    assert image_files(store, [0], root) == [None]


def test_analyze_collapse_shows_examples_and_a_compared_checkpoint(ckpt, tmp_path):
    other = shutil.copy(ckpt, tmp_path / "b.safetensors")
    report = analyze_collapse(ckpt, split="test", show_progress=False, examples=2, compare=other)
    a, b = report.elements
    assert a["checkpoint"].endswith("a.safetensors") and b["checkpoint"].endswith("b.safetensors")
    assert a["trained_with"] == "maxmatch" and a["K"] == report.K
    assert [e["direction"] for e in a["examples"]] == ["i2t", "i2t", "t2i", "t2i"]
    assert [e["query"]["image"] for e in a["examples"]] == [0, report.n_images - 1] * 2
    # The same weights retrieve the same items; the split means equal §4.5's slot retrieval.
    assert a["examples"] == b["examples"] and a["distinct"] == b["distinct"]
    assert a["distinct"]["i2t"]["split"] == pytest.approx(report.retrieval["i2t"]["distinct"])
    assert 1.0 <= a["distinct"]["t2i"]["split"] <= report.K
    json.dumps(report.to_json())


@pytest.mark.filterwarnings("ignore:.*no valid recorded content hash")  # edited in place on purpose
def test_analyze_collapse_shows_the_image_files_a_store_records(ckpt, tiny_h5, tmp_path):
    # The tiny store's images given files, as extract-features images --kind grid records them.
    copy = shutil.copy(tiny_h5, tmp_path / "with_files.h5")
    n = open_store(tiny_h5).n_images
    _pngs(tmp_path / "imgs" / "set", n)
    with h5py.File(copy, "r+") as f:
        f["images/files"] = np.array([f"set/{i:02d}.png" for i in range(n)], dtype=h5py.string_dtype())
        f.attrs["image_root"] = str(tmp_path / "imgs")
    report = analyze_collapse(ckpt, data=str(copy), split="test", show_progress=False, examples=2)
    (record,) = report.elements
    rows = open_store(copy).split("test")[0]  # a query's "image" is its position in the split
    shown = [(e["query"]["image"], e["query"]["image_file"]) for e in record["examples"]]
    assert len(shown) == 4 and all(file == str(tmp_path / "imgs" / "set" / f"{rows[p]:02d}.png") for p, file in shown)


def test_bad_examples_are_refused_before_any_encoding(ckpt, monkeypatch):
    import maxmatch_cli.evaluation.cache as cache

    monkeypatch.setattr(cache, "checkpoint_embeddings", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(MaxMatchError, match="not in the split"):
        analyze_collapse(ckpt, split="test", show_progress=False, examples="no-such-id,")


def test_compare_refuses_a_checkpoint_on_other_captions(ckpt, tiny_h5, tmp_path):
    copy = shutil.copy(tiny_h5, tmp_path / "other.h5")
    store = open_store(tiny_h5)
    _, caps = store.split("test")
    with h5py.File(copy, "r+") as f:
        text = f["captions/text"]
        text[int(caps[3])] = "a caption nobody else has"
    with pytest.raises(MaxMatchError, match="--compare: .*captions differ.*position 3") as err:
        open_compare((tmp_path / "x.safetensors", open_store(copy)), ckpt, None, "test", 5)
    assert "--data" in err.value.hint
    with pytest.raises(MaxMatchError, match="captions per image"):
        open_compare((tmp_path / "x.safetensors", store), ckpt, None, "test", 3)


@pytest.mark.parametrize("args, message", [
    (["--examples", "-2"], "--examples -2 is negative"),
    (["--examples", "nope,"], "image id(s) nope not in the split (20 images)"),
    (["--compare", "{tmp}/missing.safetensors"], "--compare {tmp}/missing.safetensors does not exist"),
    (["--images", "{tmp}/no-folder"], "--images {tmp}/no-folder does not exist"),
])
def test_cli_refuses_bad_element_options(ckpt, tmp_path, args, message):
    from typer.testing import CliRunner

    from maxmatch_cli.cli.app import app

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, ["analyze-collapse", str(ckpt), "--split", "test", "--out",
                                      str(tmp_path / "c"), *args])
    assert result.exit_code == 2, result.output
    assert message.replace("{tmp}", str(tmp_path)) in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


def test_no_examples_still_gives_the_split_means_as_strict_json(ckpt, tmp_path):
    from typer.testing import CliRunner

    from maxmatch_cli.cli.app import app

    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["analyze-collapse", str(ckpt), "--split", "test", "--out", str(out),
                                      "--examples", "0"])
    assert result.exit_code == 0, result.output
    text = (out / "collapse.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in collapse.json"))
    (record,) = saved["elements"]
    assert record["examples"] == [] and record["distinct"]["i2t"]["shown"] is None
    assert 1.0 <= record["distinct"]["i2t"]["split"] <= record["K"]
    assert "elements.html" in saved["files"] and not (out / "elements_i2t.png").exists()
    assert "— shown" in " ".join(result.output.split())
