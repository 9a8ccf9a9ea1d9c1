"""The milvus engine against a Milvus server process: milvus-lite's gRPC server (``python -m milvus_lite server``,
the Milvus protocol on a TCP port, its own data folder), reached as ``--uri http://127.0.0.1:PORT`` exactly as a
Milvus standalone would be. Build and query at full depth (the exact engine's results), the server killed with
SIGKILL mid-build (one clear error; restarted, the same command resumes with every row once), a query while the
server is down, and ``--db`` / ``--token`` as this server takes them (databases: yes; authentication: none, a
token is accepted and ignored). A real Milvus standalone or cluster is not run here (none is obtainable)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index import load_index, query_index

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

# Fixtures: ckpt, model, index_dir (the exact index of the same split) in conftest.py; tiny_h5, trained in
# tests/conftest.py.

QUERIES = ["a red car next to a small dog", "people"]
START_TIMEOUT = 30.0
"""Seconds a server may take to accept connections and answer."""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _prctl():
    """libc's prctl, looked up here in the test process (a dlopen between fork and exec could deadlock)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: teardown still kills the server


_PRCTL = _prctl()
_TEST_PID = os.getpid()


def _die_with_parent():
    """In the server process: SIGKILL it when the test process dies, even by kill -9 (PR_SET_PDEATHSIG), so that
    no server outlives a killed test run; if the test process died before that was set, leave at once."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != _TEST_PID:
            os._exit(1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m milvus_lite server`` process on 127.0.0.1:``port`` keeping its data in ``data_dir``."""

    def __init__(self, data_dir, port):
        self.data_dir, self.port, self.proc = data_dir, port, None
        self.uri = f"http://127.0.0.1:{port}"
        self.log = data_dir.parent / f"{data_dir.name}.stderr"

    def start(self):
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir), "--host",
                 "127.0.0.1", "--port", str(self.port), "--max-workers", "4"],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"},
                preexec_fn=_die_with_parent)
        self._wait_ready()
        return self

    def _wait_ready(self):
        """Until the port accepts connections and the server answers a request from this process (gRPC keeps a
        closed server's address in back-off for a while: a client of this process fails fast until it retries)."""
        import pymilvus

        deadline, last = time.monotonic() + START_TIMEOUT, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"milvus-lite server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                pymilvus.MilvusClient(uri=self.uri, timeout=2).list_collections(timeout=2)
                return
            except (OSError, pymilvus.exceptions.MilvusException) as exc:
                last = exc
                time.sleep(0.1)
        self.kill()
        pytest.fail(f"milvus-lite server on port {self.port} not ready after {START_TIMEOUT:.0f} s ({last}):\n"
                    f"{self.log.read_text()[-3000:]}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def start_server(tmp_path_factory):
    """``start_server()``: a fresh server (own data folder, free port), killed at teardown."""
    servers = []

    def start():
        server = Server(tmp_path_factory.mktemp("milvus-server") / "data", _free_port())
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("milvus-server") / "data", _free_port()).start()
    yield server
    server.kill()


def _build_args(ckpt, tiny_h5, out, uri, *more):
    return ["index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--engine", "milvus", "--uri", uri,
            "--device", "cpu", *more]


@pytest.fixture(scope="module")
def server_dir(server, ckpt, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("milvus-remote") / "gallery"
    result = invoke(*_build_args(ckpt, tiny_h5, out, server.uri, "--batch-size", 7))
    assert result.exit_code == 0, result.output
    assert "Milvus collection 'maxmatch_gallery_" in result.output and "index FLAT" in result.output
    return out


def _client(uri, db=""):
    import pymilvus

    return pymilvus.MilvusClient(uri=uri, db_name=db, timeout=10)  # a client of its own, not the engine's


def _pk_counts(client, name):
    return Counter(r["pk"] for r in client.query(name, filter="set_id >= 0", output_fields=["pk"], limit=16384))


def _rows_of(results):
    return [[h["row"] for h in q["results"]] for q in results["queries"]]


def _query_json(index_dir, *args):
    result = invoke("query", index_dir, *[a for q in QUERIES for a in ("--text", q)], "--json", "--device", "cpu",
                    *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_clean_error(result, *needles):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "hint:" in result.output, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_build_and_query_through_the_server(server, server_dir, index_dir, model):
    exact_index = load_index(index_dir)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    info = manifest["element_index"]
    assert info["kind"] == "milvus" and info["uri"] == server.uri and info["db"] == "" and info["metric"] == "COSINE"
    assert "milvus_lite_version" not in info  # a server, not an embedded file
    assert manifest["checkpoint"]["fingerprint"] == exact_index.manifest["checkpoint"]["fingerprint"]
    n, k, d = exact_index.sets.shape
    assert (manifest["K"], manifest["D"]) == (k, d) and info["n_elements"] == n * k
    # The rows are in the server process: a client of its own sees them, one per key.
    client = _client(server.uri)
    assert info["collection"] in client.list_collections()
    assert _pk_counts(client, info["collection"]) == Counter(range(n * k))
    props = client.describe_collection(info["collection"])["properties"]
    assert props["maxmatch.complete"] == "1"
    assert props["maxmatch.fingerprint"] == manifest["checkpoint"]["fingerprint"]
    assert (props["maxmatch.K"], props["maxmatch.D"]) == (str(k), str(d))
    exact = _query_json(index_dir, "--engine", "exact", "-k", 8)
    full = _query_json(server_dir, "-k", 8, "--candidates", n * k)
    assert full["engine"] == "milvus"
    for got, want in zip(full["queries"], exact["queries"]):
        assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
        np.testing.assert_allclose([h["score"] for h in got["results"]], [h["score"] for h in want["results"]],
                                   rtol=0, atol=1e-6)
        assert [h["matching"] for h in got["results"]] == [h["matching"] for h in want["results"]]
    assert _rows_of(full) == _rows_of(exact)
    hits, engine = query_index(load_index(server_dir), QUERIES, k=8, model=model, candidates=n * k)
    assert engine == "milvus" and [[h.row for h in q] for q in hits] == _rows_of(exact)
    np.testing.assert_array_equal(load_index(server_dir).sets[np.array([4, 0])],
                                  exact_index.sets[[4, 0]].astype(np.float32))


def _kill_when_flushed(server, state, sets, stop):
    """Kill ``server`` (SIGKILL) once the build records ``sets`` sets flushed and one more batch went in."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if json.loads(state.read_text())["flushed"] >= sets:
                time.sleep(0.45)  # a delay of 0.3 s per batch: one more batch inserted, not flushed
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    server.kill()


@pytest.mark.slow
def test_server_killed_mid_build_then_resumed(start_server, ckpt, tiny_h5, tmp_path, index_dir, monkeypatch):
    server = start_server()
    out = tmp_path / "ix"
    args = _build_args(ckpt, tiny_h5, out, server.uri, "--batch-size", 1)
    monkeypatch.setenv("MAXMATCH_MILVUS_TEST_DELAY", "0.3")
    monkeypatch.setenv("MAXMATCH_MILVUS_TEST_FLUSH_ROWS", "8")  # a flush every 2 sets of K = 4
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_flushed, args=(server, tmp_path / ".ix.partial" / "milvus.json", 4,
                                                                stop))
    killer.start()
    try:
        result = invoke(*args)
    finally:
        stop.set()
        killer.join()
    _assert_clean_error(result, server.uri, "run the same command again")
    assert not out.exists()  # a half-built index is never published
    flushed = json.loads((tmp_path / ".ix.partial" / "milvus.json").read_text())["flushed"]
    assert 4 <= flushed < 20, "the build ended before the server could be killed mid-way"

    server.start()  # the same data folder and port
    client = _client(server.uri)
    name = json.loads((tmp_path / ".ix.partial" / "milvus.json").read_text())["collection"]
    assert client.describe_collection(name)["properties"]["maxmatch.complete"] == "0"
    assert set(range(flushed * 4)) <= set(_pk_counts(client, name))  # the flushed rows survived the kill
    monkeypatch.delenv("MAXMATCH_MILVUS_TEST_DELAY")
    result = invoke(*args)  # the same command resumes (this server, like milvus-lite, keeps one row per key
    # whatever happens: the deletion of unflushed rows is checked by test_milvus.test_resume_deletes_unflushed_rows)
    assert result.exit_code == 0 and f"resumed at {flushed}" in result.output, result.output
    assert _pk_counts(client, name) == Counter(range(80))  # every row, once
    assert client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] == 80
    exact = _query_json(index_dir, "--engine", "exact", "-k", 5)
    assert _rows_of(_query_json(out, "-k", 5, "--candidates", 80)) == _rows_of(exact)


def test_query_while_the_server_is_down(start_server, ckpt, tiny_h5, tmp_path, index_dir, monkeypatch):
    server = start_server()
    out = tmp_path / "ix"
    assert invoke(*_build_args(ckpt, tiny_h5, out, server.uri)).exit_code == 0
    exact = _rows_of(_query_json(index_dir, "--engine", "exact", "-k", 3))
    assert _rows_of(_query_json(out, "-k", 3, "--candidates", 80)) == exact
    server.kill()
    result = invoke("query", out, "--text", "a dog", "--device", "cpu")
    _assert_clean_error(result, server.uri, "server is up")
    with pytest.raises(MaxMatchError, match=server.uri.replace(".", r"\.")):
        load_index(out)
    # Without the engine's cached client (as in a fresh process): the connection check names the URI.
    from maxmatch_cli.retrieval.index.milvus import connection

    monkeypatch.setattr(connection, "_CLIENTS", {})
    result = invoke("query", out, "--text", "a dog", "--device", "cpu")
    _assert_clean_error(result, f"Milvus server {server.uri} does not answer")
    server.start()  # back up: the same index answers again in this process
    assert _rows_of(_query_json(out, "-k", 3, "--candidates", 80)) == exact


def test_missing_database_is_one_clear_error(server, ckpt, tiny_h5, tmp_path):
    result = invoke(*_build_args(ckpt, tiny_h5, tmp_path / "ix", server.uri, "--db", "nowhere"))
    _assert_clean_error(result, server.uri, "no database 'nowhere'", "create_database('nowhere')")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    assert "nowhere" not in _client(server.uri).list_databases()  # not created behind the user's back


def test_database_and_token(server, server_dir, ckpt, tiny_h5, tmp_path, index_dir):
    """A build into another database of the server lives there only, and the index finds it there. This server
    has no authentication: it accepts any token (so only the token's path through our code is checked: used,
    never written into the index)."""
    _client(server.uri).create_database("galleries")
    out, secret = tmp_path / "ix", "reader:s3cret-token"
    result = invoke(*_build_args(ckpt, tiny_h5, out, server.uri, "--db", "galleries", "--token", secret,
                                 "--collection", "shared_name"))
    assert result.exit_code == 0, result.output
    info = json.loads((out / "manifest.json").read_text())["element_index"]
    assert info["db"] == "galleries" and info["collection"] == "shared_name"
    assert "shared_name" in _client(server.uri, "galleries").list_collections()
    assert "shared_name" not in _client(server.uri).list_collections()
    assert all(secret not in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    exact = _rows_of(_query_json(index_dir, "--engine", "exact", "-k", 4))
    assert _rows_of(_query_json(out, "-k", 4, "--candidates", 80, "--token", secret)) == exact
    # The default database's index is untouched by a collection of the same build in another database.
    assert len(load_index(server_dir)) == 20
