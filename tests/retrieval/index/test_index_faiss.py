"""The faiss engine: candidates from the element index, re-ranked exactly; depth rules; missing faiss."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.retrieval.index import load_index

# Fixtures: ckpt, model, index_dir, faiss_index_dir in conftest.py; tiny_h5, trained in tests/conftest.py.


QUERIES = ["a red car next to a small dog", "people"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


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
    from maxmatch_cli.retrieval.index.faiss_engine import faiss_candidates

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
    from maxmatch_cli.retrieval.index.faiss_engine import default_candidates

    # Hand-computed: the power of two at or above n / 1000, at least 128 (the measured 100K and 1M settings).
    want = {0: 128, 1: 128, 100_000: 128, 128_000: 128, 128_001: 256, 256_000: 256, 256_001: 512,
            1_000_000: 1024, 1_024_000: 1024, 1_024_001: 2048, 10_000_000: 16384}
    assert {n: default_candidates(n) for n in want} == want
    with pytest.raises(ValueError):
        default_candidates(-1)


def test_faiss_default_depth_is_the_galleries_and_reported(faiss_index_dir, model, monkeypatch):
    from maxmatch_cli.retrieval.index import faiss_engine

    index = load_index(faiss_index_dir)
    info, n_k = index.manifest["element_index"], index.manifest["K"]
    queries = model.encode_texts(QUERIES)
    record = _query_json(faiss_index_dir, "-k", 3)
    assert record["candidates"] == min(128, info["n_elements"]) and record["nprobe"] == min(32, info["nlist"])
    assert _query_json(faiss_index_dir, "-k", 3, "--candidates", 2, "--nprobe", 1)["candidates"] == 2
    element_index = index.element_index()
    # Shrink the rule so that this gallery's default is 1, then 2 elements: None must fetch exactly as many.
    monkeypatch.setattr(faiss_engine, "DEFAULT_CANDIDATES", 1)
    for per_items, fetched in ((len(index), 1), (-(-len(index) // 2), 2)):
        monkeypatch.setattr(faiss_engine, "CANDIDATES_PER_ITEMS", per_items)
        assert faiss_engine.default_candidates(len(index)) == fetched
        by_default = faiss_engine.faiss_candidates(element_index, queries, n_k, None, info["nlist"])
        explicit = faiss_engine.faiss_candidates(element_index, queries, n_k, fetched, info["nlist"])
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
    from maxmatch_cli.retrieval.index.faiss_engine import _rerank

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
