"""A full disk: saving a checkpoint, writing a feature file, building an index.

Each must end in one message naming the file, the space it needed and the space free (exit 2, no traceback, no
crash, no signal), keep the last good state (no temporary file left behind), and the same command must succeed
once there is space. Two variants: the real thing on a small tmpfs (where this machine lets the test mount one;
CI runs as root) and an injected ENOSPC that runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import StoreWriter
from maxmatch_cli.features.store import writer as writer_mod
from maxmatch_cli.fileio import DiskFullError, atomic_write, is_disk_full, reserve_space
from maxmatch_cli.models import checkpoint as checkpoint_mod
from maxmatch_cli.retrieval.index import build as build_mod
from maxmatch_cli.training.rundir import RUN_FILES

MESSAGE = "not enough disk space to write"
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })')


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_disk_full(result, names: str):
    """Exit 2, the one message naming the file and the sizes, no traceback."""
    assert result.exit_code == 2, result.output
    assert MESSAGE in result.output and names in result.output, result.output
    assert "free on" in result.output and "needs" in result.output, result.output
    assert "Traceback" not in result.output, result.output


def leftovers(folder: Path) -> list[str]:
    """Temporary files anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) and p.is_file())


def train_args(tiny_h5, tiny_overrides, out, *extra):
    """Two steps per epoch (40 training images, batch 20), three steps in all: quick."""
    return ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides, "--set", "train.epochs=2",
            "--set", "train.batch_size=20", "--set", "train.max_steps=3", *extra, "--out", out]


# ------------------------------------------------------------------------------------------------- a small disk


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``; yields a function that remounts it with another size."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root); the injected-ENOSPC tests cover the logic")
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        def resize(new_size: str) -> None:
            again = _run("mount", "-o", f"remount,size={new_size}", str(folder))
            assert again.returncode == 0, again.stderr

        yield resize
    finally:
        if _run("umount", str(folder)).returncode != 0:
            _run("umount", "-l", str(folder))


def fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``folder``'s file system."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_train_on_a_full_tmpfs_then_again(tmp_path, tiny_h5, tiny_overrides):
    """The first last.safetensors does not fit: one message, the run's files removed (nothing could resume
    them), and the same command trains once the disk is larger."""
    disk = tmp_path / "disk"
    with small_disk(disk, "400k") as resize:  # best (130 KB) fits, last (390 KB, optimiser state) does not
        out = disk / "run"
        result = invoke(*train_args(tiny_h5, tiny_overrides, out))
        assert_disk_full(result, "last.safetensors")
        assert "run the same command again" in result.output
        assert not [p for p in RUN_FILES if (out / p).exists()] and leftovers(disk) == []
        resize("4m")
        again = invoke(*train_args(tiny_h5, tiny_overrides, out))
        assert again.exit_code == 0, again.output
        assert (out / "last.safetensors").is_file() and (out / "best.safetensors").is_file()


def test_feature_file_on_a_full_tmpfs_then_again(tmp_path, tiny_h5):
    """extract-features synthetic: refused before writing (or stopped between batches, while HDF5 can still
    close the file), never a segfault; the same command writes the same file once there is space."""
    disk = tmp_path / "disk"
    with small_disk(disk, "128k") as resize:
        out = disk / "tiny.h5"
        result = invoke("extract-features", "synthetic", "tiny", "--out", out)
        assert_disk_full(result, "tiny.h5")
        assert leftovers(disk) == [] and not out.exists()
        resize("400k")  # the up-front estimate fits, the file does not: stopped between batches
        result = invoke("extract-features", "synthetic", "tiny", "--out", out)
        assert_disk_full(result, "tiny.h5")
        assert leftovers(disk) == [] and not out.exists()  # synthetic starts over: nothing kept to resume
        resize("1m")
        again = invoke("extract-features", "synthetic", "tiny", "--out", out)
        assert again.exit_code == 0, again.output
        with h5py.File(out, "r") as got, h5py.File(tiny_h5, "r") as ref:
            assert np.array_equal(got["images/features"][:], ref["images/features"][:])


def _store_writer(out, **kw):
    return StoreWriter(out, feature_kind="region", source="test", feature_dim=32, regions_per_image=12,
                       n_images=200, with_boxes=True, flush_every=20, args_fingerprint="fp", resume=True, **kw)


def _features(n=200):
    return np.random.default_rng(0).standard_normal((n, 12, 32)).astype(np.float32)


def _write_store(out, feats, filler_at=None, disk=None):
    with _store_writer(out) as w:
        for i in range(w.n_written, len(feats), 10):
            if i == filler_at:
                fill(disk, 60_000)
            w.write_images(feats[i:i + 10], boxes=np.zeros((10, 12, 4)))
        w.set_captions(["a caption"] * len(feats), np.arange(len(feats)))
        w.add_split("test", np.arange(len(feats)))


def test_resumable_feature_file_fills_the_tmpfs_midway(tmp_path):
    """A resumable writer stops between batches with the .partial flushed; the same call resumes after the space
    is freed and the finished file holds every image exactly."""
    disk = tmp_path / "disk"
    feats = _features()
    with small_disk(disk, "2m"):
        out = disk / "f.h5"
        with pytest.raises(DiskFullError) as err:
            _write_store(out, feats, filler_at=100, disk=disk)
        assert "f.h5" in str(err.value) and "resumes after the 100 images" in str(err.value)
        with h5py.File(out.with_name("f.h5.partial"), "r") as f:
            assert int(f.attrs["n_written"]) == 100
        (disk / "filler").unlink()
        _write_store(out, feats)
        with h5py.File(out, "r") as f:
            assert np.array_equal(f["images/features"][:], feats.astype(np.float16))
        assert leftovers(disk) == []


def test_index_on_a_full_tmpfs_then_again(tmp_path, trained, tiny_h5):
    """sets.npy is reserved before it is mapped: a full disk is a message, never a SIGBUS; the same command then
    builds the index."""
    disk = tmp_path / "disk"
    with small_disk(disk, "1m"):
        out = disk / "idx"
        args = ["index", trained, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--device", "cpu",
                "--batch-size", "16", "--out", out]
        filler = fill(disk, 24 * 1024)  # room for the header, the progress record and a few pages, not the sets
        result = invoke(*args)
        assert_disk_full(result, "sets.npy")
        assert not out.exists()
        filler.unlink()
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert json.loads((out / "manifest.json").read_text())["n_items"] == 100
        assert not (disk / ".idx.partial").exists() and leftovers(disk) == []


# ------------------------------------------------------------------------------------------ an injected ENOSPC


@pytest.mark.parametrize("error", [SafetensorError(SAFETENSORS_FULL), OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded")],
                         ids=["safetensors", "enospc", "edquot"])
def test_checkpoint_write_error_is_one_message(tmp_path, monkeypatch, error):
    """Whatever raises it, a full disk while writing a checkpoint: one message, no temporary file, the old file
    intact."""
    import torch

    from maxmatch_cli.config.recipes import load_recipe

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "best.safetensors"
    checkpoint_mod.save_checkpoint(path, model, load_recipe("demo"), None, {})
    before = path.read_bytes()

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise error

    monkeypatch.setattr(checkpoint_mod, "save_file", failing)
    with pytest.raises(DiskFullError) as err:
        checkpoint_mod.save_checkpoint(path, model, load_recipe("demo"), None, {})
    assert str(path) in str(err.value) and "needs about" in str(err.value) and "free on" in str(err.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


@pytest.mark.slow
def test_first_checkpoint_fails_then_the_same_command_trains(tmp_path, monkeypatch, tiny_h5, tiny_overrides):
    """The first last.safetensors cannot be written: the run's files go (no resume is possible from them) and
    the same command is not refused afterwards."""
    real = checkpoint_mod.save_file

    def no_room_for_last(tensors, filename, metadata=None):
        if ".last.safetensors." in str(filename):
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, metadata=metadata)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint_mod, "save_file", no_room_for_last)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out))
    assert_disk_full(result, "last.safetensors")
    assert "were removed" in result.output and "run the same command again" in result.output
    assert not [p for p in RUN_FILES if (out / p).exists()] and leftovers(tmp_path) == []
    monkeypatch.setattr(checkpoint_mod, "save_file", real)
    again = invoke(*train_args(tiny_h5, tiny_overrides, out))
    assert again.exit_code == 0, again.output


@pytest.mark.slow
def test_later_checkpoint_fails_then_resume(tmp_path, monkeypatch, tiny_h5, tiny_overrides):
    """After a checkpoint exists, a failed save keeps it whole and says to --resume, which then completes."""
    real = checkpoint_mod.save_file
    saves = []

    def second_last_fails(tensors, filename, metadata=None):
        if ".last.safetensors." in str(filename):
            saves.append(filename)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    out = tmp_path / "run"
    args = train_args(tiny_h5, tiny_overrides, out, "--set", "data.val_split=")
    monkeypatch.setattr(checkpoint_mod, "save_file", second_last_fails)
    result = invoke(*args)
    assert_disk_full(result, "last.safetensors")
    assert "--resume" in result.output and leftovers(tmp_path) == []
    first = checkpoint_mod.load_checkpoint(out / "last.safetensors").train_state
    assert first["global_step"] == 2  # the epoch-1 checkpoint, whole
    monkeypatch.setattr(checkpoint_mod, "save_file", real)
    again = invoke(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert checkpoint_mod.load_checkpoint(out / "last.safetensors").train_state["global_step"] == 3


def test_a_run_without_a_checkpoint_is_discarded_whole(tmp_path):
    """What a run that failed before its first last.safetensors wrote is removed, nothing else; a run with a
    checkpoint is kept."""
    from maxmatch_cli.training.rundir import discard_unsaved_run, existing_run_files

    for name in ("best.safetensors", "metrics.jsonl", "steps.jsonl", "recipe.toml", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = discard_unsaved_run(tmp_path)
    assert sorted(p.name for p in removed) == ["best.safetensors", "metrics.jsonl", "recipe.toml", "steps.jsonl"]
    assert existing_run_files(tmp_path) == [] and (tmp_path / "notes.txt").is_file()
    for name in ("last.safetensors", "steps.jsonl"):
        (tmp_path / name).write_text("x")
    assert discard_unsaved_run(tmp_path) == [] and (tmp_path / "steps.jsonl").is_file()


def test_feature_file_refused_up_front_when_it_cannot_fit(tmp_path, monkeypatch):
    """The images still to write do not fit: refused before any is written, no .partial left."""
    monkeypatch.setattr(writer_mod, "free_space", lambda path: 10_000)
    with pytest.raises(DiskFullError) as err:
        _write_store(tmp_path / "f.h5", _features())
    assert "f.h5" in str(err.value) and "9.8 KiB free" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_feature_file_stops_between_batches_and_resumes(tmp_path, monkeypatch):
    """The disk fills up while writing: the writer stops between batches while HDF5 can still flush and close,
    and the same call resumes; the file equals one written in one go."""
    feats = _features()
    calls = {"n": 0}

    def shrinking(path):
        calls["n"] += 1
        return 1 << 40 if calls["n"] <= 12 else 50_000

    monkeypatch.setattr(writer_mod, "free_space", shrinking)
    out = tmp_path / "f.h5"
    with pytest.raises(DiskFullError) as err:
        _write_store(out, feats)
    n = int(str(err.value).split("resumes after the ")[1].split()[0])
    assert 0 < n < 200
    monkeypatch.setattr(writer_mod, "free_space", lambda path: 1 << 40)
    _write_store(out, feats)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["images/features"][:], feats.astype(np.float16))
        assert f.attrs["complete"]


def test_hdf5_meets_a_full_disk(tmp_path, monkeypatch):
    """An ENOSPC from HDF5 itself (the checks could not foresee it: another process filled the disk): one
    message; the .partial, which HDF5 could not finish writing, is removed rather than resumed from."""
    feats = _features()
    count = {"n": 0}
    real_setitem = h5py.Dataset.__setitem__

    def failing_setitem(self, key, value):
        if self.name == "/images/features":
            count["n"] += 1
            if count["n"] == 5:
                raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, error message = 'No "
                                            "space left on device')")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_setitem)
    out = tmp_path / "f.h5"
    with pytest.raises(DiskFullError) as err:
        _write_store(out, feats)
    assert "f.h5" in str(err.value) and "run the same command again" in str(err.value)
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real_setitem)
    _write_store(out, feats)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["images/features"][:], feats.astype(np.float16))


def test_index_reservation_fails_then_resumes(tmp_path, monkeypatch, trained, tiny_h5):
    """The space of sets.npy cannot be reserved: one message naming it and its size, before any row is encoded;
    the same command builds the index."""
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "idx"
    args = ["index", trained, "--data", tiny_h5, "--split", "test", "--kind", "captions", "--device", "cpu",
            "--out", out]
    monkeypatch.setattr(build_mod, "reserve_space", no_room)
    result = invoke(*args)
    assert_disk_full(result, "sets.npy")
    assert "25.0 KiB" in result.output  # 100 captions x K=4 x D=32 float16
    assert not out.exists()
    monkeypatch.setattr(build_mod, "reserve_space", reserve_space)
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert not (tmp_path / ".idx.partial").exists()


# --------------------------------------------------------------------------------------------- the file helpers


def test_is_disk_full_reads_every_library():
    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert is_disk_full(OSError(errno.EDQUOT, "x"))
    assert is_disk_full(SafetensorError(SAFETENSORS_FULL))
    assert is_disk_full(RuntimeError("Unable to flush file (file write failed: ..., errno = 28, error message = "
                                     "'No space left on device')"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(MaxMatchError("no space left on device is mentioned in a user message"))


def test_atomic_write_refuses_a_known_size_that_does_not_fit(tmp_path, monkeypatch):
    from maxmatch_cli import fileio

    target = tmp_path / "r.json"
    target.write_text("old")
    monkeypatch.setattr(fileio, "free_space", lambda path: 100)
    with pytest.raises(DiskFullError) as err:
        atomic_write(target, lambda tmp: tmp.write_text("new" * 100), size=300)
    assert "300 bytes" in str(err.value) and "100 bytes free" in str(err.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_reserve_space_falls_back_to_zeros_past_the_data(tmp_path, monkeypatch):
    """Without fallocate the range is written with zeros, and only the range: rows already there stay."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * 10)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    fd = os.open(path, os.O_RDWR)
    try:
        reserve_space(fd, 10, 3 << 20)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:10] == b"\1" * 10 and len(data) == 10 + (3 << 20) and not any(data[10:])
