"""ECCV Caption and CxC metrics (maxmatch_cli.evaluation.eccv, `evaluate --protocol eccv|cxc`).

Every check runs on the package's own id sets (5,000 COCO test images, 25,000 caption annotation ids), with the
rows and columns in an order of our own (shuffled images, shuffled captions within each image), against: the
package called directly on rankings made here, values worked out by hand from the metric definitions, and a
brute-force mAP@R. The mapping of a feature file to COCO ids and its errors are checked on small HDF5 stores.
"""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maxmatch_cli.evaluation import eccv
from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter, open_store

eccv_caption = pytest.importorskip("eccv_caption")
runner = CliRunner()
CPI = 5


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gts():
    """The package's ground truth: {"coco"|"cxc"|"eccv": {"i2t": {image: [captions]}, "t2i": {caption: [images]}}}."""
    ref = eccv_caption.Metrics()
    return {"coco": ref.coco_gts, "cxc": ref.cxc_gts, "eccv": ref.eccv_gts}


@pytest.fixture(scope="module")
def ids(gts):
    """COCO ids in an order of our own: images shuffled, each image's five captions shuffled."""
    rng = np.random.default_rng(0)
    images = rng.permutation(sorted(gts["coco"]["i2t"]))
    captions = np.concatenate([rng.permutation(gts["coco"]["i2t"][int(i)]) for i in images])
    return eccv.CocoIds(images.astype(np.int64), captions.astype(np.int64))


def _rank4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a[k, i] * b[k, j], element by element in a fixed order, so _rank4(b, a) is bit for bit the transpose."""
    out = a[0, :, None] * b[0, None, :]
    for k in range(1, len(a)):
        out += a[k, :, None] * b[k, None, :]
    return out


@pytest.fixture(scope="module")
def random_factors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5000, generator=g), torch.randn(4, 25000, generator=g)


@pytest.fixture(scope="module")
def random_sims(random_factors):
    """(5,000, 25,000) random scores of rank 4: no ties near the top (the references check), built in a second."""
    return _rank4(*random_factors)


@pytest.fixture(scope="module")
def random_sims_t(random_factors):
    """The transpose of random_sims, contiguous (built, not copied: a strided copy of 500 MB is slow)."""
    return _rank4(*reversed(random_factors))


@pytest.fixture(scope="module")
def ours_on_random(random_sims, ids):
    return {p: eccv.coco_metrics(random_sims, ids, p) for p in eccv.ECCV_PROTOCOLS}


def _positions(ids):
    row = {int(i): r for r, i in enumerate(ids.image_ids)}
    col = {int(c): j for j, c in enumerate(ids.caption_ids)}
    return row, col


def _reference_top(scores: torch.Tensor, k: int, spare: int = 20) -> np.ndarray:
    """Each row's k best columns, best first, equal scores by column index: a lexsort of the k + spare best,
    which holds every candidate tied with the k-th as long as the (k + spare)-th scores lower (checked)."""
    values, top = torch.topk(scores, k + spare, dim=1)
    assert (values[:, k - 1] > values[:, -1]).all()
    values, top = values.numpy(), top.numpy()
    order = np.lexsort((top, -values), axis=1)[:, :k]
    return np.take_along_axis(top, order, 1)


# ------------------------------------------------------------------------------------------------- rankings


@pytest.mark.parametrize("k", [1, 3, 7, 8])
def test_top_k_is_a_stable_descending_sort(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 4, (50, 8), generator=g).float()  # many ties, also across the k-th place
    x[0] = 1.0  # a row of equal scores
    for scores in (x, x.T):
        expected = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]
        assert torch.equal(eccv.top_k(scores, k), torch.from_numpy(expected))


def test_top_k_in_blocks_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 50, generator=g)
    whole = eccv.top_k(x, 6)
    monkeypatch.setattr(eccv, "_BLOCK_ELEMENTS", 100)  # two rows a block
    assert torch.equal(eccv.top_k(x, 6), whole)
    assert torch.equal(eccv.top_k(x.half(), 6), eccv.top_k(x.half().float(), 6))


# ------------------------------------------------------------------- (a) the package on rankings made here


@pytest.fixture(scope="module")
def reference_lists(random_sims, random_sims_t, ids):
    """The package's input made here: 60 captions per image, 25 images per caption (more than it reads)."""
    top_i2t, top_t2i = _reference_top(random_sims, 60), _reference_top(random_sims_t, 25)
    i2t = {int(ids.image_ids[i]): ids.caption_ids[row].tolist() for i, row in enumerate(top_i2t)}
    t2i = {int(ids.caption_ids[j]): ids.image_ids[row].tolist() for j, row in enumerate(top_t2i)}
    return i2t, t2i


@pytest.mark.parametrize("protocol", eccv.ECCV_PROTOCOLS)
def test_matches_the_package_called_on_reference_rankings(protocol, reference_lists, ours_on_random):
    i2t, t2i = reference_lists
    targets = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision") if protocol == "eccv" else ("cxc_recalls",)
    raw = eccv_caption.Metrics().compute_all_metrics(i2t, t2i, target_metrics=targets, Ks=(1, 5, 10))
    expected = {f"{name.split('_', 1)[0]}_{d}_{name.split('_', 1)[1]}": 100 * v[d]
                for name, v in raw.items() for d in ("i2t", "t2i")}
    ours = ours_on_random[protocol]
    assert set(ours) == set(expected) == set(eccv.ECCV_KEYS if protocol == "eccv" else eccv.CXC_KEYS)
    for key in ours:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key


def test_metric_names_and_order(ours_on_random):
    assert list(ours_on_random["eccv"]) == ["eccv_i2t_map_at_r", "eccv_i2t_rprecision", "eccv_i2t_r1",
                                            "eccv_t2i_map_at_r", "eccv_t2i_rprecision", "eccv_t2i_r1"]
    assert list(ours_on_random["cxc"]) == ["cxc_i2t_r1", "cxc_i2t_r5", "cxc_i2t_r10",
                                           "cxc_t2i_r1", "cxc_t2i_r5", "cxc_t2i_r10"]


# ------------------------------------------------------------------------- (b) values worked out by hand


def test_original_positives_first_gives_the_hand_computed_values(gts, ids):
    """Each query ranks its original COCO positives first, then captions/images that are no positive of any kind
    (in any direction, ECCV or CxC), and the other ECCV/CxC positives last. Then, from the definitions:

    ECCV i2t (R positives, m of the 5 originals among them, those first): hits at ranks 1..m, misses up to R,
    so AP@R = m/R, R-Precision = m/R, R@1 = [m >= 1]. ECCV t2i: the own image is a positive of every query, the
    next R - 1 are not: AP@R = R-P = 1/R, R@1 = 1. CxC i2t: R@K = any of the first min(K, 5) originals is a CxC
    positive. CxC t2i: R@K = [own image is a CxC positive], true for all but one of the 24,972 queries.
    """
    row, col = _positions(ids)
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(5000, 25000, generator=g)  # the middle group, in [0, 1)
    for name in ("eccv", "cxc"):
        for image, captions in gts[name]["i2t"].items():
            for c in captions:
                if c in col:
                    sims[row[image], col[c]] = -1.0
        for caption, images in gts[name]["t2i"].items():
            for i in images:
                sims[row[i], col[caption]] = -1.0
    eccv_pos = {i: set(c) for i, c in gts["eccv"]["i2t"].items()}
    first = {}  # image -> its originals in ranked order
    for image, originals in gts["coco"]["i2t"].items():
        ranked = sorted(originals, key=lambda c: (c not in eccv_pos.get(image, ()), c))
        first[image] = ranked
        for r, c in enumerate(ranked):
            sims[row[image], col[c]] = 3.0 - 0.1 * r

    got = {**eccv.coco_metrics(sims, ids, "eccv"), **eccv.coco_metrics(sims, ids, "cxc")}

    i2t_ap = [sum(c in p for c in first[i]) / len(p) for i, p in eccv_pos.items()]
    assert got["eccv_i2t_map_at_r"] == pytest.approx(100 * np.mean(i2t_ap))
    assert got["eccv_i2t_rprecision"] == pytest.approx(100 * np.mean(i2t_ap))
    assert got["eccv_i2t_r1"] == pytest.approx(100 * np.mean([first[i][0] in p for i, p in eccv_pos.items()]))
    t2i_ap = [1 / len(p) for p in gts["eccv"]["t2i"].values()]
    assert got["eccv_t2i_map_at_r"] == pytest.approx(100 * np.mean(t2i_ap))
    assert got["eccv_t2i_rprecision"] == pytest.approx(100 * np.mean(t2i_ap))
    assert got["eccv_t2i_r1"] == 100.0

    cxc = {i: set(c) for i, c in gts["cxc"]["i2t"].items()}
    for k in (1, 5, 10):
        expected = np.mean([bool(set(first[i][:k]) & cxc[i]) for i in cxc])
        assert got[f"cxc_i2t_r{k}"] == pytest.approx(100 * expected)
    assert got["cxc_i2t_r5"] == got["cxc_i2t_r10"] == 100.0  # every image has an original among its CxC positives
    for k in (1, 5, 10):
        assert got[f"cxc_t2i_r{k}"] == pytest.approx(100 * 24971 / 24972)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_eccv_positives_first_gives_full_marks(direction, gts, ids):
    """Every ECCV query of one direction ranks its ECCV positives first: mAP@R = R-P = R@1 = 100, except that
    two image queries have a positive caption outside the 25,000 test captions, which no ranking can retrieve
    (AP@R = R-P = (R - 1)/R there)."""
    row, col = _positions(ids)
    g = torch.Generator().manual_seed(2)
    sims = torch.rand(5000, 25000, generator=g)
    if direction == "i2t":
        for image, captions in gts["eccv"]["i2t"].items():
            for c in captions:
                if c in col:
                    sims[row[image], col[c]] = 2.0
        reachable = [sum(c in col for c in p) / len(p) for p in gts["eccv"]["i2t"].values()]
        expected_map = 100 * np.mean(reachable)
        assert expected_map < 100
    else:
        for caption, images in gts["eccv"]["t2i"].items():
            for i in images:
                sims[row[i], col[caption]] = 2.0
        expected_map = 100.0
    got = eccv.coco_metrics(sims, ids, "eccv")
    assert got[f"eccv_{direction}_map_at_r"] == pytest.approx(expected_map)
    assert got[f"eccv_{direction}_rprecision"] == pytest.approx(expected_map)
    assert got[f"eccv_{direction}_r1"] == 100.0


# ------------------------------------------------------------------------------ brute-force mAP@R reference


def _brute_force(ranking: list[int], positives: set[int]) -> tuple[float, float, float]:
    """AP@R, R-Precision and R@1 of one query from their definitions (R = number of positives)."""
    r_total = len(positives)
    ap = sum(sum(x in positives for x in ranking[:r]) / r for r in range(1, r_total + 1) if ranking[r - 1] in positives)
    return ap / r_total, sum(x in positives for x in ranking[:r_total]) / r_total, float(ranking[0] in positives)


def _ranks_by_counting(rows: torch.Tensor, positives: list[list[int]], chunk: int = 32) -> list[list[int]]:
    """0-based ranks of each query's positives without sorting: the number of candidates before a positive, those
    with a higher score and those with an equal score and a lower index. rows: (Q, n) scores of the Q queries."""
    width = max(map(len, positives))
    pos = torch.tensor([p + [p[0]] * (width - len(p)) for p in positives])  # padded with a repeat, cut below
    index = torch.arange(rows.shape[1])
    out = []
    for start in range(0, len(rows), chunk):
        s, p = rows[start: start + chunk, None, :], pos[start: start + chunk, :, None]  # (q, 1, n), (q, P, 1)
        v = s.squeeze(1).gather(1, p.squeeze(2))[:, :, None]
        ranks = ((s > v) | ((s == v) & (index < p))).sum(2)
        out += [r[: len(q)].tolist() for r, q in zip(ranks, positives[start: start + chunk])]
    return out


def _from_ranks(ranks: list[int], r_total: int) -> tuple[float, float, float]:
    """AP@R, R-Precision and R@1 of one query from the ranks of its positives (R counts unranked ones too)."""
    ap = sum(sum(x <= r for x in ranks) / (r + 1) for r in ranks if r < r_total)
    return ap / r_total, sum(r < r_total for r in ranks) / r_total, float(0 in ranks)


@pytest.fixture(scope="module")
def our_lists(random_sims, ids):
    return eccv.ranked_lists(random_sims, ids, *eccv._list_lengths())


def _sample(query_gts: dict, n: int) -> list[int]:
    """n queries: the three with the most positives, any with a positive outside the test split, then random."""
    largest = sorted(query_gts, key=lambda q: -len(query_gts[q]))[:3]
    rng = np.random.default_rng(3)
    rest = [int(q) for q in rng.choice(sorted(query_gts), n, replace=False)]
    unreachable = [q for q in (575916, 421999) if q in query_gts]  # image queries with a non-test positive
    return list(dict.fromkeys(largest + unreachable + rest))[:n]


def test_eccv_per_query_values_match_a_brute_force_reference(gts, ids, random_sims, random_sims_t, our_lists):
    """Sampled ECCV queries, three ways: AP@R, R-P and R@1 from the ranks of the positives counted in the scores;
    the same definitions walked down our ranked list; the package on our ranked list for that query alone."""
    from eccv_caption._metrics import compute_eccv_metrics

    row, col = _positions(ids)
    for direction, queries, where, scores, lists in (("i2t", row, col, random_sims, our_lists[0]),
                                                     ("t2i", col, row, random_sims_t, our_lists[1])):
        query_gts = gts["eccv"][direction]
        sample = _sample(query_gts, 60)
        ranks = _ranks_by_counting(scores[[queries[q] for q in sample]],
                                   [[where[p] for p in query_gts[q] if p in where] for q in sample])
        for q, r in zip(sample, ranks):
            positives = query_gts[q]
            package = compute_eccv_metrics(lists, {q: positives})
            package = [package[k] for k in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1")]
            assert package == pytest.approx(_from_ranks(r, len(positives)), abs=1e-12)
            assert package == pytest.approx(_brute_force(lists[q], set(positives)), abs=1e-12)


@pytest.mark.slow
def test_eccv_means_match_a_brute_force_reference(gts, ids, random_sims, random_sims_t, ours_on_random):
    """Every ECCV query by counting ranks in the scores, averaged: our reported means."""
    row, col = _positions(ids)
    for direction, queries, where, scores in (("i2t", row, col, random_sims), ("t2i", col, row, random_sims_t)):
        query_gts = gts["eccv"][direction]
        rows = scores[[queries[q] for q in query_gts]]
        ranks = _ranks_by_counting(rows, [[where[p] for p in ps if p in where] for ps in query_gts.values()])
        per_query = [_from_ranks(r, len(ps)) for r, ps in zip(ranks, query_gts.values())]
        mean = 100 * np.mean(per_query, axis=0)
        for value, metric in zip(mean, ("map_at_r", "rprecision", "r1")):
            assert ours_on_random["eccv"][f"eccv_{direction}_{metric}"] == pytest.approx(value, abs=1e-9)


# ------------------------------------------------------------------------------------------ errors (metrics)


def test_wrong_ids_are_refused(ids, random_sims):
    bad_image = ids.image_ids.copy()
    bad_image[7] = 1  # no COCO test image
    with pytest.raises(MaxMatchError, match="not test images"):
        eccv.coco_metrics(random_sims, eccv.CocoIds(bad_image, ids.caption_ids), "eccv")
    swapped = ids.caption_ids.copy()
    swapped[[0, 5]] = swapped[[5, 0]]  # caption 0 now claims a caption of image 1
    with pytest.raises(MaxMatchError, match="is a caption of image"):
        eccv.coco_metrics(random_sims, eccv.CocoIds(ids.image_ids, swapped), "cxc")
    with pytest.raises(MaxMatchError, match="unknown protocol"):
        eccv.coco_metrics(random_sims, ids, "coco5k")


def test_missing_package_says_how_to_install(monkeypatch, ids, random_sims):
    monkeypatch.setitem(sys.modules, "eccv_caption", None)  # `import eccv_caption` now raises ImportError
    for call in (eccv.require_package, lambda: eccv.coco_metrics(random_sims, ids, "eccv")):
        with pytest.raises(MaxMatchError) as info:
            call()
        assert "eccv-caption" in info.value.message and "pip install 'maxmatch[eccv]'" in info.value.hint


# ------------------------------------------------------------------------------------ the id mapping (stores)


def caption_text(cid: int) -> str:
    return f"A photo number {cid} of a thing."


def write_store(path, images, captions, *, caption_ids=None, image_ids=None, texts=None):
    """A tiny-featured store whose split 'testall' holds ``images`` (COCO ids) with ``captions`` (ann ids)."""
    n = len(images)
    id_kind = "str" if image_ids is not None and isinstance(image_ids[0], str) else "int"
    with StoreWriter(path, feature_kind="region", source="test:coco", feature_dim=32, regions_per_image=2,
                     n_images=n, id_kind=id_kind) as w:
        w.write_images(np.random.default_rng(0).standard_normal((n, 2, 32)).astype(np.float32),
                       ids=images if image_ids is None else image_ids)
        texts = texts or [caption_text(int(c)) for c in captions]
        w.set_captions(texts, np.repeat(np.arange(n), CPI), ids=caption_ids)
        w.add_split("testall", np.arange(n))
    return path


@pytest.fixture(scope="module")
def coco_json(tmp_path_factory, gts):
    """A COCO caption file: the test captions in other case and punctuation, plus other images and captions."""
    anns = [{"id": int(c), "image_id": int(i), "caption": caption_text(int(c)).lower().rstrip(".") + " "}
            for i, cs in gts["coco"]["i2t"].items() for c in cs]
    anns += [{"id": 900000 + k, "image_id": 9 + k, "caption": "another image"} for k in range(3)]
    anns.append({"id": 999999, "image_id": anns[0]["image_id"], "caption": "a sixth caption of the first image"})
    path = tmp_path_factory.mktemp("coco") / "captions_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": anns[::-1]}))
    return path


@pytest.fixture(scope="module")
def coco_h5(tmp_path_factory, ids):
    """The 5K test as a feature file without caption ids (as the importers make it)."""
    return write_store(tmp_path_factory.mktemp("store") / "coco.h5", ids.image_ids, ids.caption_ids)


def test_caption_ids_from_the_coco_caption_file(coco_h5, coco_json, ids):
    got = eccv.split_coco_ids(open_store(coco_h5), "testall", CPI, coco_json)
    assert np.array_equal(got.image_ids, ids.image_ids) and np.array_equal(got.caption_ids, ids.caption_ids)
    assert got.source == str(coco_json)


def test_caption_ids_kept_in_the_feature_file(tmp_path, ids):
    path = write_store(tmp_path / "ids.h5", ids.image_ids, ids.caption_ids, caption_ids=ids.caption_ids)
    got = eccv.split_coco_ids(open_store(path), "testall", CPI)
    assert np.array_equal(got.caption_ids, ids.caption_ids) and "captions/ids" in got.source


def test_identical_captions_of_one_image_take_their_ids_in_order(tmp_path):
    anns = [{"id": 30, "image_id": 5, "caption": "A dog"}, {"id": 10, "image_id": 5, "caption": "a dog."},
            {"id": 20, "image_id": 5, "caption": "a cat"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"annotations": anns}))
    got = eccv.caption_ids_from_annotations(path, np.array([5]), ["a cat", "A dog", "a  DOG"], 3)
    assert got.tolist() == [20, 10, 30]


def test_a_coco_caption_that_is_not_a_test_caption_is_refused(tmp_path, ids, coco_json, gts):
    """The store keeps, for its first image, a COCO caption that the Karpathy 5K test (and the package) leave out."""
    first = int(np.flatnonzero(ids.image_ids == next(iter(gts["coco"]["i2t"])))[0])  # coco_json's first image
    texts = [caption_text(int(c)) for c in ids.caption_ids]
    texts[first * CPI] = "A sixth caption of the first image"
    path = write_store(tmp_path / "sixth.h5", ids.image_ids, ids.caption_ids, texts=texts)
    with pytest.raises(MaxMatchError, match="are not the ECCV Caption / CxC test captions: .*999999 is not a test"):
        eccv.split_coco_ids(open_store(path), "testall", CPI, coco_json)


def test_no_caption_ids_anywhere_asks_for_the_coco_file(coco_h5):
    with pytest.raises(MaxMatchError, match="keeps no COCO caption annotation ids") as info:
        eccv.split_coco_ids(open_store(coco_h5), "testall", CPI)
    assert "--coco-captions captions_val2014.json" in info.value.hint


def test_caption_ids_that_are_not_coco_annotation_ids_are_refused(tmp_path, ids):
    path = write_store(tmp_path / "sentids.h5", ids.image_ids, ids.caption_ids, caption_ids=np.arange(25000))
    with pytest.raises(MaxMatchError, match="not the COCO caption annotation ids") as info:
        eccv.split_coco_ids(open_store(path), "testall", CPI)
    assert "--coco-captions" in info.value.hint


def test_a_split_that_is_not_the_coco_5k_test_is_refused(tmp_path, ids, coco_json):
    other = ids.image_ids.copy()
    other[:2] = [1, 2]
    path = write_store(tmp_path / "other.h5", ids.image_ids, ids.caption_ids, image_ids=other)
    with pytest.raises(MaxMatchError, match="2 of them are not test images .e.g. 1; 2") as info:
        eccv.split_coco_ids(open_store(path), "testall", CPI, coco_json)
    assert "--split testall" in info.value.hint
    small = write_store(tmp_path / "small.h5", ids.image_ids[:10], ids.caption_ids[:50])
    with pytest.raises(MaxMatchError, match="have 10 images, not the 5,000 COCO 5K test images"):
        eccv.split_coco_ids(open_store(small), "testall", CPI, coco_json)
    names = write_store(tmp_path / "names.h5", ids.image_ids[:10], ids.caption_ids[:50],
                        image_ids=[f"img{k}.jpg" for k in range(10)])
    with pytest.raises(MaxMatchError, match="are not COCO ids .e.g. 'img0.jpg'"):
        eccv.split_coco_ids(open_store(names), "testall", CPI)


def test_coco_caption_file_errors(tmp_path, coco_h5, ids):
    store = open_store(coco_h5)
    with pytest.raises(MaxMatchError, match="does not exist"):
        eccv.split_coco_ids(store, "testall", CPI, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MaxMatchError, match="not valid JSON"):
        eccv.split_coco_ids(store, "testall", CPI, tmp_path / "bad.json")
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [{"cocoid": 1, "sentences": []}]}))
    with pytest.raises(MaxMatchError, match="not a COCO caption file"):
        eccv.split_coco_ids(store, "testall", CPI, tmp_path / "karpathy.json")
    (tmp_path / "train.json").write_text(json.dumps({"annotations": [{"id": 1, "image_id": 9, "caption": "x"}]}))
    with pytest.raises(MaxMatchError, match="5,000 of the split's 5,000 images have no caption in") as info:
        eccv.split_coco_ids(store, "testall", CPI, tmp_path / "train.json")
    assert "captions_val2014.json" in info.value.hint
    # Every image present, but one caption's text differs from all of its image's annotations.
    anns = [{"id": int(c), "image_id": int(i), "caption": caption_text(int(c))}
            for i, c in zip(np.repeat(ids.image_ids, CPI), ids.caption_ids)]
    anns[3]["caption"] = "something else"
    (tmp_path / "edited.json").write_text(json.dumps({"annotations": anns}))
    with pytest.raises(MaxMatchError, match=r"1 captions of the split are not among .* caption 3 of image"):
        eccv.split_coco_ids(store, "testall", CPI, tmp_path / "edited.json")


def test_split_ids_need_the_package(monkeypatch, coco_h5, coco_json):
    monkeypatch.setitem(sys.modules, "eccv_caption", None)
    with pytest.raises(MaxMatchError, match="eccv-caption package"):
        eccv.split_coco_ids(open_store(coco_h5), "testall", CPI, coco_json)


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_eccv_on_a_split_that_is_not_coco_5k(trained):
    result = invoke("evaluate", trained, "--split", "test", "--protocol", "eccv")
    assert result.exit_code == 2, result.output
    assert "protocol eccv needs the 5,000-image COCO 5K test split" in result.output
    assert "Traceback" not in result.output


def test_cli_option_misuse(trained, tmp_path):
    (tmp_path / "c.json").write_text("{}")  # a file that exists: the misuse is the option without eccv/cxc
    result = invoke("evaluate", trained, "--split", "test", "--coco-captions", tmp_path / "c.json")
    assert result.exit_code == 2 and "--coco-captions" in result.output and "eccv" in result.output
    result = invoke("ensemble", trained, trained, "--split", "test", "--protocol", "cxc")
    assert result.exit_code == 2 and "protocol cxc needs the 5,000-image COCO 5K test split" in result.output
    result = invoke("ensemble", trained, trained, "--split", "test", "--coco-captions", tmp_path / "c.json")
    assert result.exit_code == 2 and "--coco-captions" in result.output and "eccv" in result.output
    result = invoke("analyze-collapse", trained, "--split", "test", "--protocol", "eccv")
    assert result.exit_code == 2 and "`maxmatch evaluate` and `ensemble` only" in result.output
    result = invoke("evaluate", trained, "--protocol", "eccv5")
    assert result.exit_code == 2 and "eccv, cxc" in result.output


def test_cli_without_the_package(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "eccv_caption", None)
    result = invoke("evaluate", trained, "--split", "test", "--protocol", "cxc")
    assert result.exit_code == 2
    assert "eccv-caption package" in result.output and "pip install 'maxmatch[eccv]'" in result.output


@pytest.mark.slow
def test_cli_eccv_and_cxc_end_to_end(trained, coco_h5, coco_json, tmp_path, monkeypatch):
    """A checkpoint evaluated on a 5K COCO-id store: JSON, CSV and tables carry the COCO 5K and the new metrics.

    The set similarity is swapped for a dot product of mean-pooled sets: 125M MaxMatch scores cost minutes on
    two cores, and the scoring is tested elsewhere; encoding, ids, metrics and output are the real ones."""
    from maxmatch_cli.evaluation import evaluate as ev

    monkeypatch.setattr(ev, "score", lambda images, captions, *args, **kwargs: images.mean(1) @ captions.mean(1).T)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.safetensors"
    ckpt.write_bytes((trained / "best.safetensors").read_bytes())
    out = tmp_path / "eccv.json"
    result = invoke("evaluate", ckpt, "--data", coco_h5, "--split", "testall", "--protocol", "eccv",
                    "--coco-captions", coco_json, "--json", out, "--csv", tmp_path / "eccv.csv")
    assert result.exit_code == 0, result.output
    assert "ECCV Caption (%)" in result.output and "coco5k (5,000 images)" in result.output
    record = json.loads(out.read_text())
    assert record["protocol"] == "eccv" and len(record["folds"]) == 5
    assert set(eccv.ECCV_KEYS) | {"i2t_r1", "rsum"} <= set(record["metrics"])
    assert all(0 <= record["metrics"][k] <= 100 for k in eccv.ECCV_KEYS)
    assert record["provenance"]["coco_caption_ids"] == str(coco_json)
    header = (tmp_path / "eccv.csv").read_text().splitlines()[0]
    assert "eccv_i2t_map_at_r" in header and "t2i_r10" in header
    result = invoke("evaluate", ckpt, "--data", coco_h5, "--split", "testall", "--protocol", "cxc",
                    "--coco-captions", coco_json, "--json", out)
    assert result.exit_code == 0, result.output
    assert "CxC (%)" in result.output
    assert set(eccv.CXC_KEYS) <= set(json.loads(out.read_text())["metrics"])


@pytest.mark.slow
def test_cli_ensemble_eccv_scores_the_mean_matrix(trained, coco_h5, coco_json, tmp_path, monkeypatch):
    """ensemble --protocol eccv: every member and the ensemble get the ECCV Caption metrics, the ensemble's those
    of the mean of the members' matrices (scoring swapped for two fixed matrices, as in the test above)."""
    from maxmatch_cli.evaluation import evaluate as ev
    from maxmatch_cli.evaluation.protocols import metrics_for

    rng = np.random.default_rng(3)
    mats = [torch.from_numpy(rng.standard_normal((5000, 25000)).astype(np.float32)) for _ in range(2)]
    calls = iter(range(2))
    # ensemble scores each member through evaluate.evaluate_member, so the patch reaches it there
    monkeypatch.setattr(ev, "score", lambda *args, **kwargs: mats[next(calls)].clone())
    runs = []
    for name in ("seed0", "seed1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.safetensors").write_bytes((trained / "best.safetensors").read_bytes())
        runs.append(tmp_path / name / "best.safetensors")
    out = tmp_path / "ens.json"
    result = invoke("ensemble", *runs, "--data", coco_h5, "--split", "testall", "--protocol", "eccv",
                    "--coco-captions", coco_json, "--json", out, "--csv", tmp_path / "ens.csv")
    assert result.exit_code == 0, result.output
    assert "ECCV Caption (%) · ensemble of 2" in result.output and "ECCV Caption (%) · member 2" in result.output
    record = json.loads(out.read_text())
    ids = eccv.split_coco_ids(open_store(coco_h5), "testall", CPI, coco_json)
    want = [metrics_for(m, "eccv", CPI, ids).metrics for m in (*mats, (mats[0] + mats[1]) / 2)]
    got = [m["metrics"] for m in record["members"]] + [record["metrics"]]
    for g, w in zip(got, want):
        for key in (*eccv.ECCV_KEYS, "rsum"):
            assert g[key] == pytest.approx(w[key], abs=0.006), key  # files round to 2 decimals
    assert record["protocol"] == "eccv" and record["provenance"]["coco_caption_ids"] == str(coco_json)
    assert "eccv_t2i_map_at_r" in (tmp_path / "ens.csv").read_text().splitlines()[0]
