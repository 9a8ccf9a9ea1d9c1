"""The milvus engine on milvus-lite: the collection's rows, candidates re-ranked exactly (at full depth the exact
engine's results), resuming a build killed with SIGKILL, and one clear error per bad URI, silent server, foreign
or half-built collection. Nothing here talks to a server: test_milvus_server.py runs the engine against milvus-lite's
gRPC server process (``--uri http://127.0.0.1:PORT``); a real Milvus standalone or cluster is run nowhere (none is
obtainable here)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index import load_index, query_index

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

# Fixtures: ckpt, model, index_dir (the exact index of the same split) in conftest.py; tiny_h5, trained in
# tests/conftest.py.

QUERIES = ["a red car next to a small dog", "people"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def milvus_dir(ckpt, tiny_h5, tmp_path_factory):
    root = tmp_path_factory.mktemp("milvus")
    out = root / "gallery"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--engine", "milvus",
                    "--uri", root / "g.db", "--batch-size", 7, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Milvus collection 'maxmatch_gallery_" in result.output and "index FLAT" in result.output
    return out


def _client(index_dir):
    from maxmatch_cli.retrieval.index.milvus.connection import connect

    info = json.loads((index_dir / "manifest.json").read_text())["element_index"]
    return connect(info["uri"]), info["collection"]


def _client_at(uri, name):
    from maxmatch_cli.retrieval.index.milvus.connection import connect

    return connect(str(uri)), name


def _rows(client, name, fields):
    return client.query(name, filter="set_id >= 0", output_fields=fields, limit=16384)


def _query_json(index_dir, *args):
    result = invoke("query", index_dir, *[a for q in QUERIES for a in ("--text", q)], "--json", "--device", "cpu",
                    *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_collection_holds_one_row_per_element_with_ids(milvus_dir, index_dir):
    exact = load_index(index_dir)
    manifest = json.loads((milvus_dir / "manifest.json").read_text())
    info = manifest["element_index"]
    assert info["kind"] == "milvus" and info["metric"] == "COSINE" and info["uri"].endswith("g.db")
    assert manifest["checkpoint"]["fingerprint"] == exact.manifest["checkpoint"]["fingerprint"]
    assert (manifest["K"], manifest["D"]) == (exact.manifest["K"], exact.manifest["D"])
    assert not (milvus_dir / "sets.npy").exists() and not (milvus_dir / "milvus.json").exists()
    client, name = _client(milvus_dir)
    rows = _rows(client, name, ["pk", "set_id", "position", "vector", "item_id"])
    n, k, d = exact.sets.shape
    assert len(rows) == n * k and sorted(r["pk"] for r in rows) == list(range(n * k))
    for r in rows:
        assert r["pk"] == r["set_id"] * k + r["position"]
        # The float16 sets of the exact index, exactly (float16 values are exact in float32).
        np.testing.assert_array_equal(np.asarray(r["vector"], dtype=np.float32),
                                      exact.sets[r["set_id"], r["position"]].astype(np.float32))
        assert r["item_id"] == (json.dumps(exact.ids[r["set_id"]]) if r["position"] == 0 else "")
    assert load_index(milvus_dir).ids == exact.ids


def test_full_depth_equals_exact_engine(milvus_dir, index_dir, model):
    exact = _query_json(index_dir, "--engine", "exact", "-k", 8)
    n_elements = json.loads((milvus_dir / "manifest.json").read_text())["element_index"]["n_elements"]
    full = _query_json(milvus_dir, "-k", 8, "--candidates", n_elements)  # auto: milvus
    assert full["engine"] == "milvus" and full["candidates"] == n_elements
    for got, want in zip(full["queries"], exact["queries"]):
        assert [h["row"] for h in got["results"]] == [h["row"] for h in want["results"]]
        assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
        np.testing.assert_allclose([h["score"] for h in got["results"]], [h["score"] for h in want["results"]],
                                   rtol=0, atol=1e-6)
        assert [h["matching"] for h in got["results"]] == [h["matching"] for h in want["results"]]
    # The Python API answers the same.
    hits, engine = query_index(load_index(milvus_dir), QUERIES, k=8, model=model, candidates=n_elements)
    assert engine == "milvus"
    assert [[h.row for h in q] for q in hits] == [[h["row"] for h in q["results"]] for q in exact["queries"]]


def test_candidates_are_the_nearest_elements(milvus_dir, index_dir, model):
    from maxmatch_cli.retrieval.index.milvus.search import milvus_candidates

    index, exact = load_index(milvus_dir), load_index(index_dir)
    queries = model.encode_texts(QUERIES)
    pools = milvus_candidates(index.milvus, queries, candidates=3)
    # FLAT is exact: the sets owning each query element's 3 highest cosines, by brute force.
    elements = torch.from_numpy(exact.sets.astype(np.float32)).reshape(-1, exact.sets.shape[-1])
    cos = F.normalize(queries, dim=-1) @ elements.T
    for q, pool in enumerate(pools):
        want = np.unique(cos[q].topk(3, dim=-1).indices.numpy() // exact.sets.shape[1])
        np.testing.assert_array_equal(pool, want)
    ranking, _ = index.search(queries, 2, candidates=3)
    assert all(set(r) <= set(p) for r, p in zip(ranking.indices.tolist(), pools))


def test_other_engines_and_sets_on_a_milvus_index(milvus_dir, index_dir):
    result = invoke("query", milvus_dir, "--text", "a dog", "--engine", "exact", "--device", "cpu")
    assert result.exit_code != 0 and "keeps its vectors in Milvus" in result.output
    assert "Traceback" not in result.output
    result = invoke("query", index_dir, "--text", "a dog", "--engine", "milvus", "--device", "cpu")
    assert result.exit_code != 0 and "is not in Milvus" in result.output
    index, exact = load_index(milvus_dir), load_index(index_dir)
    np.testing.assert_array_equal(index.sets[np.array([3, 1, 3])], exact.sets[[3, 1, 3]].astype(np.float32))
    assert index.milvus.metadata(2)["id"] == exact.ids[2]


@pytest.mark.parametrize("uri, message", [
    ("ftp://example.org/g", "scheme 'ftp'"),
    ("gallery.txt", "neither a server"),
    ("{tmp}/missing/g.db", "does not exist"),
    ("http://127.0.0.1:1", "does not answer"),  # a closed port: refused at once
])
def test_bad_uri_one_clear_error_nothing_written(ckpt, tiny_h5, tmp_path, uri, message):
    out = tmp_path / "ix"
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--engine", "milvus",
                    "--uri", uri.format(tmp=tmp_path), "--device", "cpu")
    assert result.exit_code != 0 and message in result.output and "hint:" in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_milvus_options_need_the_milvus_engine(ckpt, tiny_h5, tmp_path):
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "ix", "--uri", "g.db")
    assert result.exit_code != 0 and "--uri sets the milvus engine" in result.output
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "ix", "--engine",
                    "milvus", "--uri", tmp_path / "g.db", "--index-type", "DISKANN")
    assert result.exit_code != 0 and "milvus-lite does not build index type DISKANN" in result.output
    result = invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", tmp_path / "ix", "--engine",
                    "milvus")
    assert result.exit_code != 0 and "needs --uri" in result.output


def test_collection_of_another_checkpoint_or_shape_is_refused(milvus_dir, trained, tiny_h5, tmp_path):
    from maxmatch_cli.retrieval.index import checkpoint_fingerprint
    from maxmatch_cli.retrieval.index.milvus.building import _schema
    from maxmatch_cli.retrieval.index.milvus.connection import _pymilvus

    client, name = _client(milvus_dir)
    uri = json.loads((milvus_dir / "manifest.json").read_text())["element_index"]["uri"]
    other = trained / "last.safetensors"
    mine = json.loads((milvus_dir / "manifest.json").read_text())["checkpoint"]["fingerprint"]
    assert checkpoint_fingerprint(other) != mine
    args = ["index", other, "--data", tiny_h5, "--split", "test", "--engine", "milvus", "--uri", uri,
            "--collection", name, "--device", "cpu"]
    result = invoke(*args, "--out", tmp_path / "ix")
    assert result.exit_code != 0 and "built from another checkpoint" in result.output and "--overwrite" in result.output
    assert not (tmp_path / "ix").exists() and not (tmp_path / ".ix.partial").exists()
    assert client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] == 80  # untouched
    # The same build for another folder (same name elsewhere) does not take the collection over either.
    ckpt = json.loads((milvus_dir / "manifest.json").read_text())["checkpoint"]["path"]
    result = invoke(*[ckpt if a == other else a for a in args], "--out", tmp_path / milvus_dir.name)
    assert result.exit_code != 0 and "the same gallery for another index folder" in result.output
    assert load_index(milvus_dir).milvus.n_items == 20
    # A collection of this checkpoint but another D.
    props = {"maxmatch.build": "x", "maxmatch.fingerprint": mine, "maxmatch.K": "4", "maxmatch.D": "8"}
    client.create_collection("odd_shape", schema=_schema(_pymilvus(), 8), properties=props)
    result = invoke(*[ckpt if a == other else "odd_shape" if a == name else a for a in args], "--out", tmp_path / "b")
    assert result.exit_code != 0 and "another shape (K=4, D=8" in result.output
    result = invoke(*[ckpt if a == other else "odd_shape" if a == name else a for a in args], "--out", tmp_path / "b",
                    "--overwrite")  # replaces it
    assert result.exit_code == 0, result.output
    assert client.describe_collection("odd_shape")["properties"]["maxmatch.D"] == "32"
    assert len(load_index(tmp_path / "b")) == 20


def test_query_when_the_server_does_not_answer(milvus_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(milvus_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["element_index"]["uri"] = "http://127.0.0.1:1"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("query", moved, "--text", "a dog", "--device", "cpu")
    assert result.exit_code != 0 and "Milvus server http://127.0.0.1:1 does not answer" in result.output
    assert "hint:" in result.output and "Traceback" not in result.output


def test_half_built_or_changed_collection_is_refused(milvus_dir):
    client, name = _client(milvus_dir)
    client.alter_collection_properties(name, properties={"maxmatch.complete": "0"})
    try:
        with pytest.raises(MaxMatchError, match="only partly built"):
            load_index(milvus_dir)
    finally:
        client.alter_collection_properties(name, properties={"maxmatch.complete": "1"})
    saved = client.query(name, filter="pk == 0", output_fields=["*"], limit=1)[0]
    client.delete(name, filter="pk == 0")
    try:
        with pytest.raises(MaxMatchError, match="holds 79 rows, not 80"):
            load_index(milvus_dir)
    finally:
        client.insert(name, [saved])
        client.flush(name)
    assert len(load_index(milvus_dir)) == 20


def test_resume_deletes_unflushed_rows(tmp_path, monkeypatch):
    """milvus-lite replaces a row inserted again under the same key, a Milvus server keeps both: a ledger of the
    rows such a server would hold checks that a resumed build first deletes the rows past the last flush."""
    from maxmatch_cli.retrieval.index.milvus import building as me  # build_collection reads connect here
    from maxmatch_cli.retrieval.index.milvus.connection import _props

    sets = F.normalize(torch.randn(12, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    real, ledger = me.connect(str(tmp_path / "r.db")), Counter()

    class Recording:
        def __init__(self, die_after):
            self.inserts, self.die_after = 0, die_after

        def __getattr__(self, name):
            return getattr(real, name)

        def insert(self, name, rows):
            self.inserts += 1
            if self.inserts > self.die_after:
                raise KeyboardInterrupt  # the process dies here
            ledger.update(r["pk"] for r in rows)
            return real.insert(name, rows)

        def delete(self, name, filter):
            assert filter.startswith("set_id >= ")
            for pk in [pk for pk in ledger if pk // 3 >= int(filter.split(">=")[1])]:
                del ledger[pk]
            return real.delete(name, filter=filter)

    monkeypatch.setenv(me.FLUSH_ENV, "6")  # a flush every 2 sets of K = 3
    state = tmp_path / "milvus.json"
    kwargs = dict(uri=str(tmp_path / "r.db"), collection="c", identity={"build": "b", "fingerprint": "f", "K": 3,
                                                                         "D": 8}, batch_size=1, show_progress=False)
    monkeypatch.setattr(me, "connect", lambda *a, **k: Recording(die_after=5))
    with pytest.raises(KeyboardInterrupt):
        me.build_collection(sets, list(range(12)), None, state, **kwargs)
    assert json.loads(state.read_text())["flushed"] == 4 and sum(ledger.values()) == 5 * 3  # set 4 unflushed
    assert _props(real, "c")["complete"] == "0"
    monkeypatch.setattr(me, "connect", lambda *a, **k: Recording(die_after=10**9))
    record = me.build_collection(sets, list(range(12)), None, state, **kwargs)
    assert ledger == Counter(range(36)) and not state.exists()  # every row exactly once
    assert _props(real, "c")["complete"] == "1" and record["n_elements"] == 36


@pytest.mark.slow
def test_build_killed_with_sigkill_resumes_without_duplicates(ckpt, tiny_h5, tmp_path, index_dir):
    out, uri = tmp_path / "ix", tmp_path / "k.db"
    args = ["index", str(ckpt), "--data", str(tiny_h5), "--split", "test", "--out", str(out), "--engine", "milvus",
            "--uri", str(uri), "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "MAXMATCH_MILVUS_TEST_DELAY": "0.3", "MAXMATCH_MILVUS_TEST_FLUSH_ROWS": "8",
           "MAXMATCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "maxmatch_cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / ".ix.partial" / "milvus.json"
    deadline = time.time() + 120
    flushed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            flushed = json.loads(state.read_text())["flushed"]
        except (OSError, ValueError, KeyError):
            pass
        if flushed >= 4:
            time.sleep(0.45)  # one more batch inserted but not flushed
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= flushed < 20, "the build ended before it could be killed mid-way"
    assert not out.exists()  # a half-built index is never published
    from maxmatch_cli.retrieval.index.milvus.connection import collection_for

    client, name = _client_at(uri, collection_for(out))
    assert client.describe_collection(name)["properties"]["maxmatch.complete"] == "0"
    result = invoke(*args)  # the same command resumes (milvus-lite keeps one row per key whatever happens: the
    # deletion of unflushed rows that a Milvus server needs is checked by test_resume_deletes_unflushed_rows)
    assert result.exit_code == 0, result.output
    client, name = _client(out)
    rows = _rows(client, name, ["pk", "set_id", "position"])
    assert sorted(r["pk"] for r in rows) == list(range(80))  # every row once
    exact = _query_json(index_dir, "--engine", "exact", "-k", 5)
    full = _query_json(out, "-k", 5, "--candidates", 80)
    assert [[h["row"] for h in q["results"]] for q in full["queries"]] == \
        [[h["row"] for h in q["results"]] for q in exact["queries"]]
