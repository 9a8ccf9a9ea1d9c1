"""One writer per run folder, feature file and index: the lock file, and two processes on one output.

The lock unit is checked against the file it writes and against real processes (a live one, one that exited, one
whose pid now names another process). The commands are checked with a real second process holding the lock
(a small Python process that takes it through :mod:`maxmatch_cli.locks` and sleeps) and, for ``train``, with two
real ``maxmatch train`` processes on one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.locks import LockHeld, acquire, hold, live_holder, lock_beside, lock_inside, read_holder
from maxmatch_cli.training.rundir import run_lock

ROOT = Path(__file__).resolve().parents[2]

_HOLDER = (
    "import sys, time\n"
    "from maxmatch_cli.locks import acquire\n"
    "acquire(sys.argv[1], sys.argv[2])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@contextmanager
def held_elsewhere(lock_file: Path, target: str = "the target"):
    """Another live process holds ``lock_file`` for the block (killed after it: kill -9 leaves the lock behind)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_file), target], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def write_lock(lock_file: Path, **fields) -> dict:
    data = {"pid": 999_999, "host": socket.gethostname(), "started": "2025-01-01T00:00:00",
            "command": "maxmatch train --recipe demo", "proc_start": None, **fields}
    lock_file.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return data


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: its pid names no process now
    return proc.pid


# ----------------------------------------------------------------------------------------------- the lock unit


def test_lock_file_names_its_holder_and_is_removed_on_release(tmp_path):
    lock_file = lock_beside(tmp_path / "features.h5")
    assert lock_file == tmp_path / ".features.h5.lock"
    with hold(lock_file, "feature file x") as lock:
        data = json.loads(lock_file.read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert data["started"][:4].isdigit() and "T" in data["started"] and data["command"]
        assert lock.holder == read_holder(lock_file)
        assert live_holder(lock_file) is None  # held by this very process: not another writer
        with hold(lock_file):  # re-entrant within one process (train's CLI and train() both take it)
            pass
        assert lock_file.exists()
    assert not lock_file.exists()


def test_an_existing_lock_file_is_never_overwritten(tmp_path, monkeypatch):
    """O_CREAT|O_EXCL: the create fails on any existing file, whose content stays as it was."""
    calls = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a: calls.append(flags) or real_open(path, flags, *a))
    lock_file = tmp_path / ".x.lock"
    with held_elsewhere(lock_file):
        before = lock_file.read_bytes()
        with pytest.raises(LockHeld):
            acquire(lock_file, "x")
        assert lock_file.read_bytes() == before
    assert calls and all(f & os.O_CREAT and f & os.O_EXCL for f in calls if f & os.O_CREAT)


def test_a_live_holder_is_refused_with_its_name(tmp_path):
    lock_file = tmp_path / ".x.lock"
    with held_elsewhere(lock_file) as proc:
        with pytest.raises(LockHeld) as err:
            acquire(lock_file, "run folder runs/a")
        assert live_holder(lock_file).pid == proc.pid
    message = str(err.value.message)
    assert message.startswith(f"run folder runs/a is being written by pid {proc.pid} on host {socket.gethostname()}"
                              " since ")
    assert "-c" in message  # its command line
    assert f"kill {proc.pid}" in err.value.hint and "wait" in err.value.hint


def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path, capsys):
    lock_file = tmp_path / ".x.lock"
    pid = dead_pid()
    write_lock(lock_file, pid=pid)
    assert live_holder(lock_file) is None
    with hold(lock_file, "feature file f.h5"):
        assert read_holder(lock_file).pid == os.getpid()
    out = capsys.readouterr().out
    assert f"feature file f.h5: took over the stale lock of pid {pid}" in out and "no longer runs" in out


def test_a_recycled_pid_is_not_the_holder(tmp_path, capsys):
    """The lock records the process's start time; a live process with that pid but another start time is not it."""
    lock_file = tmp_path / ".x.lock"
    with held_elsewhere(tmp_path / ".other.lock") as proc:  # a live process, started after the "holder"
        write_lock(lock_file, pid=proc.pid, proc_start=1)
        if not Path(f"/proc/{proc.pid}/stat").exists():
            pytest.skip("no /proc: a recycled pid cannot be told from its holder")
        with hold(lock_file):
            pass
    assert "took over the stale lock" in capsys.readouterr().out


def test_another_hosts_lock_is_refused_with_how_to_remove_it(tmp_path):
    lock_file = tmp_path / ".x.lock"
    write_lock(lock_file, pid=dead_pid(), host="gpu-node-7")
    with pytest.raises(LockHeld) as err:
        acquire(lock_file, "index idx")
    assert "gpu-node-7" in err.value.message and "cannot be checked from here" in err.value.message
    assert str(lock_file) in err.value.hint and "remove" in err.value.hint and "gpu-node-7" in err.value.hint
    assert read_holder(lock_file).host == "gpu-node-7"  # kept


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_released_when_the_block_fails(tmp_path, error):
    lock_file = tmp_path / ".x.lock"
    with pytest.raises(error):
        with hold(lock_file):
            raise error()
    assert not lock_file.exists()
    with hold(lock_file):  # and free again
        pass


def test_an_empty_lock_left_by_a_killed_taker_is_taken_over(tmp_path, capsys):
    lock_file = tmp_path / ".x.lock"
    lock_file.write_bytes(b"")  # created, then killed before writing its holder
    old = time.time() - 60
    os.utime(lock_file, (old, old))
    with hold(lock_file):
        assert read_holder(lock_file).pid == os.getpid()
    assert "unreadable lock file" in capsys.readouterr().out


def test_a_read_only_folder_is_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(MaxMatchError, match="cannot create the lock file"):
            acquire(tmp_path / ".x.lock")
    finally:
        tmp_path.chmod(0o755)


def test_only_rank_0_holds_the_run_folder_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    with held_elsewhere(lock_inside(out)):
        monkeypatch.setenv("RANK", "1")
        with run_lock(out):  # a rank > 0 writes nothing in the folder: it neither takes nor fails
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(LockHeld):
            with run_lock(out):
                pass


# --------------------------------------------------------------------------------------- two writers, one output


def _fake_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("best.safetensors", "last.safetensors", "metrics.jsonl", "steps.jsonl", "recipe.toml"):
        (folder / name).write_bytes(name.encode())
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_train_on_a_folder_being_trained_is_refused_before_anything_is_removed(tmp_path, tiny_h5, tiny_overrides,
                                                                            flag):
    out = tmp_path / "run"
    files = _fake_run(out)
    with held_elsewhere(lock_inside(out), f"run folder {out}") as proc:
        result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                        *([flag] if flag else []), "--out", out)
        assert result.exit_code == 2, result.output
        assert f"run folder {out} is being written by pid {proc.pid} on host" in result.output
        assert f"kill {proc.pid}" in result.output and "Traceback" not in result.output
        assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == files


def test_train_takes_over_the_lock_of_a_killed_run(tmp_path, tiny_h5, tiny_overrides):
    out = tmp_path / "run"
    out.mkdir()
    with held_elsewhere(lock_inside(out)):
        pass  # killed with -9: its lock stays
    assert lock_inside(out).exists()
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                    "--set", "train.max_steps=2", "--set", "train.epochs=2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "took over the stale lock" in result.output
    assert (out / "best.safetensors").is_file() and not lock_inside(out).exists()


def test_a_refused_train_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new"
    result = invoke("train", "--recipe", "demo", "--out", out, "--resume")  # no last.safetensors to resume
    assert result.exit_code == 2
    assert not out.exists()


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_train_processes_on_one_folder(tmp_path, tiny_h5, tiny_overrides):
    """Two real `maxmatch train` on one --out: the second exits 2 naming the first, which goes on untouched."""
    out = tmp_path / "run"
    env = {**os.environ, "MAXMATCH_NO_PROGRESS": "1", "MAXMATCH_THREADS": "1"}

    def train(seed, *extra):
        return [sys.executable, "-m", "maxmatch_cli", "train", "--recipe", "demo", "--set", f"data.path={tiny_h5}",
                *tiny_overrides, "--set", f"train.seed={seed}", *extra, "--out", str(out)]

    # SIGINT at its default even where the test runner itself ignores it (a job started with `&` or nohup).
    first = subprocess.Popen(train(11, "--set", "train.epochs=500"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "steps.jsonl").exists():  # the first run trains: its lock, recipe and steps are there
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.2)
        second = subprocess.run(train(22, "--overwrite"), cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGINT)  # Ctrl-C: it saves last.safetensors and exits 130
        output = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    said = " ".join((second.stdout + second.stderr).split())
    assert f"run folder {out} is being written by pid {first.pid} on host {socket.gethostname()} since" in said
    assert "(maxmatch train --recipe demo" in said and f"kill {first.pid}" in said
    assert first.returncode == 130, output
    # The first run's files, and only its: its recipe (seed 11), each step once, a checkpoint at its last step.
    assert "seed = 11" in (out / "recipe.toml").read_text()
    steps = _steps(out / "steps.jsonl")
    assert steps == sorted(set(steps)) and steps
    with open(out / "last.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert json.loads(header["__metadata__"]["train_state"])["global_step"] >= steps[-1]
    assert not lock_inside(out).exists()


def test_concurrent_extraction_is_refused_naming_the_writer(tmp_path, capsys):
    out = tmp_path / "features.h5"
    with held_elsewhere(lock_beside(out), f"feature file {out}") as proc:
        result = invoke("extract-features", "--synthetic", "tiny", "--out", out)
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert f"feature file {out} is being written by pid {proc.pid}" in said
        assert "writable" not in said  # not a permissions problem
        assert sorted(p.name for p in tmp_path.iterdir()) == [".features.h5.lock"]  # no .partial was started
    # That process was killed (-9): its lock stays, and the next extraction takes it over.
    result = invoke("extract-features", "--synthetic", "tiny", "--out", out)
    assert result.exit_code == 0, result.output
    assert "took over the stale lock" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]


@pytest.mark.slow
def test_two_real_extractions_one_output(tmp_path):
    """Two `extract-features` processes started together: one writes the file, the other fails cleanly (its lock or
    the finished file) or finds the identical finished file; never a traceback, and the file is whole."""
    out = tmp_path / "f.h5"
    cmd = [sys.executable, "-m", "maxmatch_cli", "extract-features", "--synthetic", "tiny", "--out", str(out)]
    env = {**os.environ, "MAXMATCH_NO_PROGRESS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), outputs
    assert all("Traceback" not in o for o in outputs)
    if codes == [0, 2]:
        loser = " ".join(outputs[[p.returncode for p in procs].index(2)].split())
        assert "is being written by pid" in loser or "already exists" in loser, loser
    from maxmatch_cli.features.store import open_store

    assert open_store(out).n_images > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_concurrent_index_build_is_refused_naming_the_builder(tmp_path, trained):
    out = tmp_path / "idx"
    with held_elsewhere(lock_beside(out), f"index {out}") as proc:
        result = invoke("index", trained, "--split", "test", "--out", out)
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert f"index {out} is being written by pid {proc.pid}" in said and "partial" not in said
        assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock"]
    result = invoke("index", trained, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    assert "took over the stale lock" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_shard_build_locks_its_shard_only(tmp_path, trained):
    out = tmp_path / "sharded"
    out.mkdir()
    with held_elsewhere(lock_beside(out / "shard-0-of-2")):
        refused = invoke("index", trained, "--split", "test", "--shard", "0/2", "--out", out)
        other = invoke("index", trained, "--split", "test", "--shard", "1/2", "--out", out)
    assert refused.exit_code == 2 and "shard-0-of-2 is being written by pid" in " ".join(refused.output.split())
    assert other.exit_code == 0, other.output


def test_evaluate_a_run_in_progress_warns_and_writes_nothing_there(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("embeddings"))
    before = sorted(p.name for p in run.iterdir())
    with held_elsewhere(lock_inside(run), f"run folder {run}") as proc:
        result = invoke("evaluate", run, "--split", "test")
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())
        assert f"{run} is being written by a training run in progress (pid {proc.pid} on host" in said
        assert "scored as saved after epoch" in said and "are not written into the live run folder" in said
        assert sorted(p.name for p in run.iterdir()) == sorted(before + [".maxmatch.lock"])  # no cache
    result = invoke("evaluate", run, "--split", "test")  # the run ended (its lock is stale): cached as usual
    assert result.exit_code == 0 and "in progress" not in result.output
    assert (run / "embeddings").is_dir()


def test_evaluate_a_run_that_has_no_checkpoint_yet(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with held_elsewhere(lock_inside(run)) as proc:
        result = invoke("evaluate", run)
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert f"training run in progress (pid {proc.pid}" in said and "has not saved a checkpoint yet" in said
