"""Sharded indexes: built shard by shard, queried as one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.retrieval.index import ShardedIndex, load_index, shard_rows

# Fixtures: ckpt, model, index_dir, faiss_index_dir in conftest.py; tiny_h5, trained in tests/conftest.py.


QUERIES = ["a red car next to a small dog", "people", "a bus"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def query_json(index, *args):
    result = invoke("query", index, *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def hits(record):
    return [[(h["row"], h["id"], h["score"]) for h in q["results"]] for q in record["queries"]]


@pytest.fixture(scope="module")
def whole(ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "whole"
    assert invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out).exit_code == 0
    return out


@pytest.fixture(scope="module")
def sharded(ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "sharded"
    for i in (2, 0, 1):  # shards are independent builds, in any order
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--shard", f"{i}/3", "--out", out)
        assert result.exit_code == 0, result.output
        assert f"shard {i}/3" in result.output
    return out


def test_shard_rows_partition_the_gallery():
    for n in (1, 7, 10, 1000):
        for count in range(1, min(n, 9) + 1):
            parts = [shard_rows(n, i, count) for i in range(count)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [stop - start for start, stop in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_sharded_index_holds_the_whole_gallery(whole, sharded):
    one, many = load_index(whole), load_index(sharded)
    assert isinstance(many, ShardedIndex) and len(many.shards) == 3 and len(many) == len(one)
    assert [sh.manifest["shard"]["index"] for sh in many.shards] == [0, 1, 2]
    for row in range(len(one)):
        id_one, set_one, _ = one.item(row)
        id_many, set_many, _ = many.item(row)
        assert id_one == id_many
        np.testing.assert_array_equal(set_one, set_many)


@pytest.mark.parametrize("k", [1, 4, 100])
def test_sharded_query_equals_the_unsharded_index(whole, sharded, k):
    args = [a for q in QUERIES for a in ("--text", q)] + ["-k", k, "--engine", "exact"]
    want, got = query_json(whole, *args), query_json(sharded, *args)
    assert hits(got) == hits(want)
    assert [[h["matching"] for h in q["results"]] for q in got["queries"]] == \
        [[h["matching"] for h in q["results"]] for q in want["queries"]]


def test_sharded_faiss_at_full_depth_equals_exact(ckpt, tiny_h5, whole, tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "sharded-faiss"
    for i in range(2):
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--shard", f"{i}/2", "--engine",
                        "faiss", "--nlist", 2, "--out", out)
        assert result.exit_code == 0, result.output
    args = [a for q in QUERIES for a in ("--text", q)] + ["-k", 5]
    full = query_json(out, *args, "--engine", "faiss", "--nprobe", 2, "--candidates", 10_000)
    exact = query_json(whole, *args, "--engine", "exact")
    assert full["engine"] == "faiss" and full["nprobe"] == 2
    # The depth reported is what each shard's search applied: 10,000 capped at the shard's element count.
    per_shard = sorted({load_index(out / f"shard-{i}-of-2").manifest["element_index"]["n_elements"] for i in range(2)})
    assert full["candidates"] == (per_shard[0] if len(per_shard) == 1 else per_shard)
    for a, b in zip(hits(full), hits(exact)):
        assert [r for r, _, _ in a] == [r for r, _, _ in b]
        np.testing.assert_allclose([s for _, _, s in a], [s for _, _, s in b], rtol=0, atol=1e-6)


def test_sharded_index_errors(ckpt, trained, tiny_h5, sharded, whole, tmp_path):
    # A missing shard is named with the command that builds it.
    partial = tmp_path / "partial"
    shutil.copytree(sharded, partial)
    shutil.rmtree(partial / "shard-1-of-3")
    result = invoke("query", partial, "--text", "a dog")
    assert result.exit_code == 2 and "lacks 1 of its 3 shards (1)" in result.output
    assert "--shard 1/3" in result.output and "Traceback" not in result.output
    # An empty shard folder counts as missing.
    (partial / "shard-1-of-3").mkdir()
    assert "lacks 1 of its 3 shards" in invoke("query", partial, "--text", "a dog").output
    # A shard copied under another shard's name is named, not counted twice.
    shutil.rmtree(partial / "shard-1-of-3")
    shutil.copytree(partial / "shard-0-of-3", partial / "shard-1-of-3")
    result = invoke("query", partial, "--text", "a dog")
    assert result.exit_code == 2 and "folder shard-1-of-3" in result.output and "holds shard 0/3" in result.output
    # A shard folder with files but no manifest is damaged, not missing.
    (partial / "shard-1-of-3" / "manifest.json").unlink()
    result = invoke("query", partial, "--text", "a dog")
    assert result.exit_code == 2 and "has files but no manifest.json: it is damaged" in result.output
    shutil.rmtree(partial / "shard-1-of-3")
    (partial / "shard-1-of-3").mkdir()
    # Shards of another checkpoint.
    other = tmp_path / "other.safetensors"
    shutil.copy2(trained / "last.safetensors", other)
    shutil.rmtree(partial / "shard-1-of-3")
    assert invoke("index", other, "--data", tiny_h5, "--split", "test", "--shard", "1/3", "--out",
                  partial).exit_code == 0
    result = invoke("query", partial, "--text", "a dog")
    assert result.exit_code == 2 and "different builds" in result.output and "checkpoint" in result.output
    # Bad --shard values, and a shard written into an unsharded index.
    for bad in ("3/3", "1", "-1/2", "a/b"):
        result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--shard", bad, "--out", tmp_path / "s")
        assert result.exit_code == 2 and "--shard must be I/N" in result.output, bad
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--shard", "0/2", "--out", whole)
    assert result.exit_code == 2 and "not a folder of shards" in result.output
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", sharded, "--overwrite")
    assert result.exit_code == 2 and "is a sharded index" in result.output and "--shard I/N" in result.output
    n = len(load_index(whole))
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--shard", f"0/{n + 1}", "--out",
                    tmp_path / "s")
    assert result.exit_code == 2 and "would be empty" in result.output
