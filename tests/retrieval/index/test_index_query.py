"""`maxmatch query`: results equal the API's rank(), bad input exits 2, image ids against a captions index."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import maxmatch_cli
from maxmatch_cli.cli.app import app
from maxmatch_cli.features.store import open_store
from maxmatch_cli.method.similarity import maxmatch_assignment
from maxmatch_cli.retrieval.index import FORMAT_VERSION, load_index

# Fixtures: ckpt, model, index_dir, faiss_index_dir in conftest.py; tiny_h5, trained in tests/conftest.py.


QUERIES = ["a red car next to a small dog", "people"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_query_equals_api_rank(index_dir, model):
    args = [a for q in QUERIES for a in ("--text", q)]
    result = invoke("query", index_dir, *args, "-k", 5, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    index = load_index(index_dir)
    queries = model.encode_texts(QUERIES)
    gallery = torch.from_numpy(index.sets.astype(np.float32))
    ranking = model.rank(queries, gallery, k=5)
    assert [q["text"] for q in record["queries"]] == QUERIES
    for q, entry in enumerate(record["queries"]):
        hits = entry["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["row"] for h in hits] == ranking.indices[q].tolist()
        assert [h["id"] for h in hits] == [index.ids[r] for r in ranking.indices[q].tolist()]
        np.testing.assert_allclose([h["score"] for h in hits], ranking.scores[q].numpy(), rtol=1e-6)
        for h in hits:
            # The matching is MaxMatch's assignment, and its cosines give the MaxMatch score (eq. 4).
            perm = maxmatch_assignment(gallery[h["row"]: h["row"] + 1], queries[q: q + 1])[0, 0].tolist()
            assert sorted((p["query_element"], p["gallery_element"]) for p in h["matching"]) == \
                sorted((t, v) for v, t in enumerate(perm))
            cosines = torch.tensor([p["cosine"] for p in h["matching"]])
            assert torch.expm1(cosines).mean().item() == pytest.approx(h["score"], abs=1e-5)


def test_query_table(index_dir):
    result = invoke("query", index_dir, "--text", QUERIES[0], "-k", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "exhaustive exact" in result.output and "T1↔V" in result.output
    rows = [line for line in result.output.splitlines() if re.match(r"│\s+[0-9]+ │", line)]
    assert [int(row.split("│")[1]) for row in rows] == [1, 2, 3]


def _damaged(index_dir, tmp_path, how):
    bad = tmp_path / "bad-index"
    shutil.copytree(index_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if how == "version":
        manifest["format_version"] = FORMAT_VERSION + 1
    elif how == "fingerprint":
        manifest["checkpoint"]["fingerprint"] = "0" * 64
    elif how == "manifest":
        (bad / "manifest.json").unlink()
        return bad
    elif how == "empty-sets":
        (bad / "sets.npy").write_bytes(b"")
    elif how in ("element-index-type", "similarity-name", "options-type"):
        key, value = {"element-index-type": ("element_index", "yes"), "similarity-name": ("similarity", "bogus"),
                      "options-type": ("similarity_options", [1])}[how]
        manifest[key] = value
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("manifest", "no manifest.json"),
    ("version", "format version"),
    ("fingerprint", "another checkpoint"),
    ("other-checkpoint", "another checkpoint"),
    ("empty-query", "empty query"),
    ("empty-sets", "cannot read the sets of index"),
    ("element-index-type", "garbles a field (element_index 'yes')"),
    ("similarity-name", "garbles a field (similarity 'bogus')"),
    ("options-type", "garbles a field (similarity_options [1])"),
    ("candidates-0", "candidates must be a positive integer"),
    ("nprobe-negative", "nprobe must be a positive integer"),
])
def test_bad_query_input_exits_2_without_traceback(index_dir, trained, tmp_path, case, message):
    target, extra, text = index_dir, [], "a dog"
    if case == "missing":
        target = tmp_path / "nothing-here"
    elif case in ("manifest", "version", "fingerprint", "empty-sets", "element-index-type", "similarity-name",
                  "options-type"):
        target = _damaged(index_dir, tmp_path, case)
    elif case == "candidates-0":  # refused although the exact engine (this index's) would not use it
        extra = ["--candidates", 0]
    elif case == "nprobe-negative":
        extra = ["--nprobe", -5]
    elif case == "other-checkpoint":
        extra = ["--checkpoint", trained / "last.safetensors"]
    elif case == "empty-query":
        text = "   "
    result = invoke("query", target, "--text", text, *extra, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in result.output and "error:" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # not an uncaught error


def test_query_refuses_a_replaced_checkpoint(ckpt, trained, tiny_h5, tmp_path):
    own = tmp_path / "model.safetensors"
    shutil.copy2(ckpt, own)
    out = tmp_path / "index"
    assert invoke("index", own, "--data", tiny_h5, "--split", "test", "--out", out).exit_code == 0
    shutil.copy2(trained / "last.safetensors", own)  # retrained in place: same path, other weights
    result = invoke("query", out, "--text", "a dog")
    assert result.exit_code == 2 and "another checkpoint" in result.output


# ----------------------------------------------------------------------------------- image queries (captions)


def query_json(index, *args):
    result = invoke("query", index, *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def captions_index(ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "captions"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_image_id_query_equals_api_rank(captions_index, ckpt, tiny_h5):
    store = open_store(tiny_h5)
    images, captions = store.split("test")
    ids = [str(v) for v in np.asarray(store.image_ids)[images[:2]]]
    record = query_json(captions_index, "--image-id", ids[0], "--image-id", ids[1], "-k", 5)
    model = maxmatch_cli.load(ckpt, device="cpu")
    index = load_index(captions_index)
    queries = model.encode_images(store, images[:2])
    gallery = torch.from_numpy(index.sets.astype(np.float32))
    ranking = model.rank(queries, gallery, k=5, query_side="image")
    assert [q["image_id"] for q in record["queries"]] == ids
    for q, entry in enumerate(record["queries"]):
        got = entry["results"]
        assert [h["row"] for h in got] == ranking.indices[q].tolist()
        np.testing.assert_allclose([h["score"] for h in got], ranking.scores[q].numpy(), rtol=1e-6)
        assert [h["text"] for h in got] == [index.texts[r] for r in ranking.indices[q].tolist()]
        assert [h["id"] for h in got] == [int(captions[r]) for r in ranking.indices[q].tolist()]
        for h in got:
            # query elements are the image's, gallery elements the caption's: MaxMatch's assignment
            perm = maxmatch_assignment(queries[q: q + 1], gallery[h["row"]: h["row"] + 1])[0, 0].tolist()
            assert sorted((p["query_element"], p["gallery_element"]) for p in h["matching"]) == \
                sorted((v, t) for v, t in enumerate(perm) if t >= 0)


def test_image_query_errors(captions_index, index_dir, tiny_h5, tmp_path):
    result = invoke("query", captions_index, "--image-id", "no-such-image")
    assert result.exit_code == 2 and "has no image with id no-such-image" in result.output
    # the message names real ids of the feature file, so the fix is one copy away
    ids = [str(i) for i in open_store(tiny_h5).image_ids]
    message = " ".join(result.output.split())
    assert f"(its ids: {'; '.join(ids[:3])} and {len(ids) - 3} more)" in message
    assert invoke("query", captions_index, "--image-id", ids[1]).exit_code == 0
    result = invoke("query", index_dir, "--image-id", "1")
    assert result.exit_code == 2 and "image queries search a captions index" in result.output
    result = invoke("query", captions_index, "--text", "a dog")
    assert result.exit_code == 2 and "text queries search an image index" in result.output
    # The demo features are synthetic: an image file cannot be encoded like them.
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not really a png")
    result = invoke("query", captions_index, "--image", photo)
    assert result.exit_code == 2 and "were not extracted from image files" in result.output
    assert "--image-id" in result.output
    result = invoke("query", captions_index, "--image-id", "1", "--text", "a dog")
    assert result.exit_code == 2 and "exactly one kind" in result.output
    result = invoke("query", captions_index)
    assert result.exit_code == 2 and "no query" in result.output
    assert "Traceback" not in result.output


def test_answer_queries_is_query_index_and_the_depth_it_searched(index_dir, faiss_index_dir):
    """The library body of `maxmatch query`: the hits of query_index, the queries as given, and the depth that
    faiss's search_depth computes for the index (nothing for exact)."""
    from maxmatch_cli.retrieval.index import answer_queries, query_index, search_depth

    answer = answer_queries(index_dir, "a dog", k=3, device="cpu")
    hits, used = query_index(load_index(index_dir), ["a dog"], k=3, device="cpu")
    assert (answer.side, answer.queries, answer.engine, answer.depth) == ("text", ["a dog"], "exact", {})
    assert [[(h.row, h.score) for h in q] for q in answer.hits] == [[(h.row, h.score) for h in q] for q in hits]
    assert answer.checkpoint == load_index(index_dir).checkpoint
    answer = answer_queries(faiss_index_dir, ["a dog"], k=3, device="cpu", engine="faiss", candidates=5, nprobe=2)
    idx = load_index(faiss_index_dir)
    fetched, probed = search_depth(idx.element_index("cpu"), idx.manifest["K"], 5, 2)
    assert answer.engine == "faiss" and answer.depth == {"candidates": fetched, "nprobe": probed}
