"""`maxmatch index` / `maxmatch query`: results equal the API's rank(), bad input exits 2, builds are atomic."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import maxmatch_cli
from maxmatch_cli.retrieval.api import Model
from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.retrieval.index import FORMAT_VERSION, checkpoint_fingerprint, load_index
from maxmatch_cli.method.similarity import maxmatch_assignment

# The fixtures tiny_h5 and trained live in conftest.py.

QUERIES = ["a red car next to a small dog", "people"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(trained, tmp_path_factory):
    """A private copy of the trained checkpoint (other tests may resume training in the run folder)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    shutil.copy2(trained / "best.safetensors", path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return maxmatch_cli.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def index_dir(ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "test-images"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 6,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


def test_index_holds_the_encoded_gallery(index_dir, model, ckpt, tiny_h5):
    index = load_index(index_dir)
    store = open_store(tiny_h5)
    images, _ = store.split("test")
    m = index.manifest
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "images" and m["split"] == "test"
    assert (m["n_items"], m["K"], m["D"]) == (len(images), model.num_embeds, model.embed_dim)
    assert m["similarity"] == model.similarity and m["engine"] == "exhaustive-exact" and m["element_index"] is None
    assert m["checkpoint"]["fingerprint"] == checkpoint_fingerprint(ckpt)
    assert isinstance(index.sets, np.memmap) and index.sets.dtype == np.float16
    assert index.ids == np.asarray(store.image_ids)[images].tolist()
    expected = F.normalize(model.encode_images(store, images), dim=-1)
    torch.testing.assert_close(torch.from_numpy(index.sets.astype(np.float32)), expected, rtol=0, atol=1e-3)


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


def test_captions_index(ckpt, model, tiny_h5, tmp_path):
    out = tmp_path / "caps"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--out", out)
    assert result.exit_code == 0, result.output
    index = load_index(out)
    store = open_store(tiny_h5)
    _, captions = store.split("test")
    assert index.ids == captions.tolist() and index.texts == store.captions_text(captions)
    expected = F.normalize(model.encode_texts(index.texts), dim=-1)
    torch.testing.assert_close(torch.from_numpy(index.sets.astype(np.float32)), expected, rtol=0, atol=1e-3)
    result = invoke("query", out, "--text", "a dog")
    assert result.exit_code == 2 and "holds captions" in result.output


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


def test_existing_index_needs_overwrite(index_dir, ckpt, tiny_h5):
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", index_dir)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output


def _fail_on_call(monkeypatch, n):
    """Make the n-th call of Model.encode_images raise, as a crash mid-build would."""
    original, calls = Model.encode_images, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash mid-build")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Model, "encode_images", failing)
    return calls


def test_interrupted_build_leaves_no_index_and_resumes(index_dir, ckpt, tiny_h5, tmp_path, monkeypatch):
    calls = _fail_on_call(monkeypatch, 3)
    out = tmp_path / "index"
    args = ["index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4]
    result = invoke(*args)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert len(calls) == 3  # it failed after two chunks had been written
    # Only the hidden partial folder is left, with the two chunks recorded.
    assert [p.name for p in tmp_path.iterdir()] == [".index.partial"]
    assert json.loads((tmp_path / ".index.partial" / "progress.json").read_text())["done"] == 8
    with pytest.raises(MaxMatchError, match="does not exist"):
        load_index(out)
    # The same command resumes: only the remaining rows are encoded, and the index equals a clean build.
    monkeypatch.undo()
    encoded = []
    original = Model.encode_images
    monkeypatch.setattr(Model, "encode_images",
                        lambda self, store, rows, **kw: encoded.extend(rows) or original(self, store, rows, **kw))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    images, _ = open_store(tiny_h5).split("test")
    assert encoded == images[8:].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    np.testing.assert_array_equal(np.load(out / "sets.npy"), np.load(index_dir / "sets.npy"))
    assert load_index(out).ids == load_index(index_dir).ids


def test_partial_build_of_another_checkpoint_starts_afresh(ckpt, trained, tiny_h5, tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, 2)
    out = tmp_path / "index"
    assert invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4).exit_code
    monkeypatch.undo()
    other = tmp_path / "other.safetensors"
    shutil.copy2(trained / "last.safetensors", other)
    result = invoke("index", other, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    model = maxmatch_cli.load(other, device="cpu")
    store = open_store(tiny_h5)
    expected = F.normalize(model.encode_images(store, store.split("test")[0]), dim=-1)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "sets.npy").astype(np.float32)), expected,
                               rtol=0, atol=1e-3)


def test_interrupted_overwrite_keeps_the_old_index(index_dir, ckpt, tiny_h5, tmp_path, monkeypatch):
    out = tmp_path / "index"
    shutil.copytree(index_dir, out)
    before = (out / "manifest.json").read_text()
    _fail_on_call(monkeypatch, 2)
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--batch-size", 4,
                    "--overwrite")
    assert result.exit_code != 0
    assert (out / "manifest.json").read_text() == before and len(load_index(out)) == len(load_index(index_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.partial", "index"]  # the rows so far, to resume
    monkeypatch.undo()
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_killed_build_is_not_an_index(index_dir, tmp_path):
    # A build killed before its manifest was written leaves a hidden folder without one; even renamed by hand,
    # it is refused.
    partial = tmp_path / "partial"
    shutil.copytree(index_dir, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(MaxMatchError, match="not a complete maxmatch index"):
        load_index(partial)


# ----------------------------------------------------------------------------------------------- faiss engine


@pytest.fixture(scope="module")
def faiss_index_dir(ckpt, tiny_h5, tmp_path_factory):
    pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("indexes") / "test-faiss"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--engine", "faiss")
    assert result.exit_code == 0, result.output
    assert "faiss element index" in result.output
    return out


def _query_json(index_dir, *args):
    result = invoke("query", index_dir, *[a for q in QUERIES for a in ("--text", q)], "--json", "--device", "cpu",
                    *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows_scores(record):
    return [[(h["row"], h["score"]) for h in q["results"]] for q in record["queries"]]


def test_faiss_at_full_depth_equals_exact(faiss_index_dir):
    index = load_index(faiss_index_dir)
    info = index.manifest["element_index"]
    assert info["n_elements"] == len(index) * index.manifest["K"] and (faiss_index_dir / info["file"]).is_file()
    exact = _query_json(faiss_index_dir, "--engine", "exact", "-k", 8)
    # Every inverted list and every element fetched: the candidates are the whole gallery.
    full = _query_json(faiss_index_dir, "--engine", "faiss", "-k", 8, "--nprobe", info["nlist"],
                       "--candidates", info["n_elements"])
    assert exact["engine"] == "exact" and full["engine"] == "faiss"
    for got, want in zip(_rows_scores(full), _rows_scores(exact)):
        assert [r for r, _ in got] == [r for r, _ in want]  # re-ranking scores pairs in other GEMM shapes: approx
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-6)
    assert _query_json(faiss_index_dir, "-k", 3)["engine"] == "faiss"  # auto takes faiss when the index has it


def test_faiss_candidates_are_the_nearest_elements_rescored_exactly(faiss_index_dir, model):
    from maxmatch_cli.retrieval.index import faiss_candidates

    index = load_index(faiss_index_dir)
    nlist, n_k = index.manifest["element_index"]["nlist"], index.manifest["K"]
    queries = model.encode_texts(QUERIES)
    pools = faiss_candidates(index.element_index(), queries, n_k, candidates=3, nprobe=nlist)
    # With every list probed the IVF search is exact over the stored elements: brute force agrees.
    elements = torch.from_numpy(index.sets.astype(np.float32)).reshape(-1, index.sets.shape[-1])
    cos = F.normalize(queries, dim=-1) @ elements.T  # (Q, K, N*K)
    for q, pool in enumerate(pools):
        nearest = cos[q].topk(3, dim=-1).indices.reshape(-1) // n_k
        assert pool.tolist() == sorted(set(nearest.tolist()))
    # Shallow search: fewer candidates, but each result carries its exact score.
    exact = {(q, r): s for q, rows in enumerate(_rows_scores(_query_json(faiss_index_dir, "--engine", "exact",
                                                                          "-k", len(index))))
             for r, s in rows}
    shallow = _query_json(faiss_index_dir, "--engine", "faiss", "-k", 10, "--candidates", 1, "--nprobe", 1)
    for q, rows in enumerate(_rows_scores(shallow)):
        assert 1 <= len(rows) <= n_k  # one element per query element: at most K candidate items
        assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)
        for r, s in rows:
            assert s == pytest.approx(exact[(q, r)], abs=1e-6)


def test_default_candidates_grow_with_the_gallery():
    from maxmatch_cli.retrieval.index import default_candidates

    # Hand-computed: the power of two at or above n / 1000, at least 128 (the measured 100K and 1M settings).
    want = {0: 128, 1: 128, 100_000: 128, 128_000: 128, 128_001: 256, 256_000: 256, 256_001: 512,
            1_000_000: 1024, 1_024_000: 1024, 1_024_001: 2048, 10_000_000: 16384}
    assert {n: default_candidates(n) for n in want} == want
    with pytest.raises(ValueError):
        default_candidates(-1)


def test_faiss_default_depth_is_the_galleries_and_reported(faiss_index_dir, model, monkeypatch):
    from maxmatch_cli.retrieval import index as index_mod

    index = load_index(faiss_index_dir)
    info, n_k = index.manifest["element_index"], index.manifest["K"]
    queries = model.encode_texts(QUERIES)
    record = _query_json(faiss_index_dir, "-k", 3)
    assert record["candidates"] == min(128, info["n_elements"]) and record["nprobe"] == min(32, info["nlist"])
    assert _query_json(faiss_index_dir, "-k", 3, "--candidates", 2, "--nprobe", 1)["candidates"] == 2
    element_index = index.element_index()
    # Shrink the rule so that this gallery's default is 1, then 2 elements: None must fetch exactly as many.
    monkeypatch.setattr(index_mod, "DEFAULT_CANDIDATES", 1)
    for per_items, fetched in ((len(index), 1), (-(-len(index) // 2), 2)):
        monkeypatch.setattr(index_mod, "CANDIDATES_PER_ITEMS", per_items)
        assert index_mod.default_candidates(len(index)) == fetched
        by_default = index_mod.faiss_candidates(element_index, queries, n_k, None, info["nlist"])
        explicit = index_mod.faiss_candidates(element_index, queries, n_k, fetched, info["nlist"])
        assert [p.tolist() for p in by_default] == [p.tolist() for p in explicit]
        assert all(1 <= len(p) <= fetched * queries.shape[1] for p in by_default)


def test_faiss_caps_k_and_says_when_candidates_run_out(faiss_index_dir):
    n = len(load_index(faiss_index_dir))
    record = _query_json(faiss_index_dir, "-k", 10**12, "--candidates", 10**6, "--nprobe", 10**6)
    assert all(len(q["results"]) == n for q in record["queries"])  # k capped at the gallery, as the exact engine
    result = invoke("query", faiss_index_dir, "--text", QUERIES[0], "-k", 10, "--candidates", 1, "--nprobe", 1,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    shown = len(json.loads(invoke("query", faiss_index_dir, "--text", QUERIES[0], "-k", 10, "--candidates", 1,
                                  "--nprobe", 1, "--json").stdout)["queries"][0]["results"])
    assert shown < 10 and f"note: {shown} of 10 results: the faiss candidates ran out" in " ".join(
        result.output.split())


def test_nlist_is_checked_before_encoding(ckpt, tiny_h5, tmp_path):
    for value, message in ((0, "nlist must be a positive integer"), (10**9, "must lie in 1..")):
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "i",
                        "--engine", "faiss", "--nlist", value)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not list(tmp_path.iterdir())  # nothing encoded, no partial build
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "i", "--nlist", 4)
    assert result.exit_code == 2 and "add --engine faiss" in result.output


def test_faiss_missing_is_a_clear_error(index_dir, ckpt, tiny_h5, tmp_path, monkeypatch):
    result = invoke("query", index_dir, "--text", "a dog", "--engine", "faiss")
    assert result.exit_code == 2 and "no faiss element index" in result.output
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as if faiss-cpu were not installed
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "i", "--engine", "faiss")
    assert result.exit_code == 2 and "faiss-cpu" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "i").exists()
    assert _query_json(index_dir, "-k", 2)["engine"] == "exact"  # auto falls back to the exact engine


@pytest.mark.parametrize("max_pairs", [1, 7, 10_000])
def test_rerank_groups_equal_one_query_at_a_time(max_pairs):
    from maxmatch_cli.retrieval.api import rank_sets
    from maxmatch_cli.retrieval.index import _rerank

    g = torch.Generator().manual_seed(0)
    sets = F.normalize(torch.randn(50, 4, 8, generator=g), dim=-1).numpy().astype(np.float16)
    queries = torch.randn(6, 3, 8, generator=g)  # K' = 3 != K = 4: a rectangular assignment
    rng = np.random.default_rng(0)
    pools = [np.sort(rng.choice(50, size=n, replace=False)) for n in (5, 0, 17, 1, 50, 9)]
    for side in ("text", "image"):
        got = _rerank(sets, queries, pools, 6, "maxmatch", {}, side, "cpu", max_pairs=max_pairs)
        for q, pool in enumerate(pools):
            n = min(6, len(pool))
            assert got.indices[q, n:].eq(-1).all() and torch.isinf(got.scores[q, n:]).all()
            if n:
                want = rank_sets(queries[q], sets[pool], "maxmatch", 6, query_side=side)
                assert got.indices[q, :n].tolist() == pool[want.indices[0].numpy()].tolist()
                torch.testing.assert_close(got.scores[q, :n], want.scores[0], rtol=0, atol=1e-6)
