"""Faults around resume and the run's history: a Ctrl-C at any point of a step, a kill -9 at any point of the
loop, torn history lines, stale temporary files, and what ``--overwrite`` may delete.

A resumed run must equal the uninterrupted one exactly: every tensor of the checkpoints (weights, BatchNorm
buffers, optimiser and RNG states), the saved train state, and every record of ``steps.jsonl`` and
``metrics.jsonl``. The tiny demo model has BatchNorm in the region encoder's MLP, whose running statistics a
forward pass updates, so an interrupt mid-step must not keep them.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.training import runlog as runlog_mod
from maxmatch_cli.training import trainer as train_mod

STEPS_PER_EPOCH = 10  # tiny store: 40 training images, batch 4
STOP = 13  # the step (1-based) a fault interrupts: mid-way through the second epoch


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(tiny_h5, tiny_overrides, out, *extra):
    return ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
            "--set", "train.epochs=2", "--set", "optim.schedule=cosine", *extra, "--out", out]


def checkpoint(path):
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    return load_file(str(path)), json.loads(meta["train_state"])


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(reference, out):
    """Every tensor and the train state of both checkpoints, and every logged record, exactly equal."""
    for name in ("last.safetensors", "best.safetensors"):
        (ref, ref_state), (got, got_state) = checkpoint(reference / name), checkpoint(out / name)
        assert ref.keys() == got.keys(), name
        assert any(".bn." in k and "running_mean" in k for k in ref), "the model must have BatchNorm buffers"
        for key in ref:
            assert torch.equal(ref[key], got[key]), f"{name}: {key}"
        assert got_state == ref_state, name
    for name in ("steps.jsonl", "metrics.jsonl"):
        assert jsonl(out / name) == jsonl(reference / name), name


@pytest.fixture(scope="module")
def straight(tiny_h5, tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = invoke(*train_args(tiny_h5, tiny_overrides, out))
    assert result.exit_code == 0, result.output
    return out


def _raise_on_call(real, n):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            calls["raised"] = True
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper, calls


def _interrupt(monkeypatch, point):
    """A KeyboardInterrupt in step STOP at ``point``; returns the call record of the hook."""
    if point == "before_forward":
        hook, calls = _raise_on_call(train_mod.loss_on_batch, STOP)
        monkeypatch.setattr(train_mod, "loss_on_batch", hook)
    elif point == "mid_forward":  # after the image encoder's BatchNorm updated its running statistics
        real, calls = train_mod.loss_on_batch, {"n": 0}

        def hook(model, batch, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == STOP:
                model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)
                calls["raised"] = True
                raise KeyboardInterrupt
            return real(model, batch, *args, **kwargs)

        monkeypatch.setattr(train_mod, "loss_on_batch", hook)
    elif point == "before_optimizer_step":  # after the forward and backward passes
        hook, calls = _raise_on_call(torch.optim.AdamW.step, STOP)
        monkeypatch.setattr(torch.optim.AdamW, "step", hook)
    elif point == "before_logging":  # the step is done, its losses not yet read back
        hook, calls = _raise_on_call(runlog_mod.RunLog.step, STOP)
        monkeypatch.setattr(runlog_mod.RunLog, "step", hook)
    else:
        raise AssertionError(point)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_forward", "mid_forward", "before_optimizer_step", "before_logging"])
def test_ctrl_c_at_any_point_of_a_step_then_resume_is_exact(tiny_h5, tiny_overrides, tmp_path, monkeypatch,
                                                             straight, point):
    out = tmp_path / "run"
    calls = _interrupt(monkeypatch, point)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out))
    assert calls.get("raised") and result.exit_code == 130, result.output
    monkeypatch.undo()
    _, state = checkpoint(out / "last.safetensors")
    done = STOP if point == "before_logging" else STOP - 1
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (done, 1, done - STEPS_PER_EPOCH)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out), "--resume")
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)


# ------------------------------------------------------------------------------------ the epoch's end, SIGTERM
@pytest.mark.parametrize("call", [1, 2])  # the first epoch's validation, and the run's last one
def test_interrupt_during_validation_then_resume_redoes_the_epoch_end(tiny_h5, tiny_overrides, tmp_path,
                                                                      monkeypatch, straight, call):
    import signal

    out = tmp_path / "run"
    hook, calls = _raise_on_call(train_mod._validate, call)
    monkeypatch.setattr(train_mod, "_validate", hook)
    handler = signal.getsignal(signal.SIGTERM)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out))
    assert calls.get("raised") and result.exit_code == 130, result.output
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after the run
    monkeypatch.undo()
    _, state = checkpoint(out / "last.safetensors")
    steps = call * STEPS_PER_EPOCH
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (steps, call, 0)
    assert state["epoch_end_due"] is True and len(state["history"]) == call - 1
    assert not (out / "metrics.jsonl").exists() if call == 1 else len(jsonl(out / "metrics.jsonl")) == 1
    result = invoke(*train_args(tiny_h5, tiny_overrides, out), "--resume")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in jsonl(out / "metrics.jsonl")] == [1, 2]  # every epoch once, validated
    assert all("val/rsum" in r for r in jsonl(out / "metrics.jsonl"))
    assert_same_run(straight, out)


def test_interrupt_during_the_end_of_a_run_cut_short_by_max_steps(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    args = lambda out: train_args(tiny_h5, tiny_overrides, out, "--set", f"train.max_steps={STOP}")  # noqa: E731
    reference = tmp_path / "straight"
    assert invoke(*args(reference)).exit_code == 0
    out = tmp_path / "run"
    hook, calls = _raise_on_call(runlog_mod.RunLog.write_record, 2)  # after the validation and the best save
    monkeypatch.setattr(runlog_mod.RunLog, "write_record", hook)
    result = invoke(*args(out))
    assert calls.get("raised") and result.exit_code == 130, result.output
    monkeypatch.undo()
    _, state = checkpoint(out / "last.safetensors")
    assert (state["global_step"], state["epoch"], state["step_in_epoch"], state["epoch_end_due"]) == (
        STOP, 1, STOP - STEPS_PER_EPOCH, True)
    result = invoke(*args(out), "--resume")
    assert result.exit_code == 0, result.output
    assert_same_run(reference, out)


SIGTERM_AT_STEP = """
import os, signal, sys
from maxmatch_cli.training import trainer

stop, args, calls = int(sys.argv[1]), sys.argv[2:], []
real = trainer.loss_on_batch

def loss_on_batch(*a, **k):
    calls.append(1)
    if len(calls) == stop:
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID`, SLURM preemption or Kubernetes send it
    return real(*a, **k)

trainer.loss_on_batch = loss_on_batch
from maxmatch_cli.cli.app import app
app(args, prog_name="maxmatch")
"""


def test_sigterm_saves_the_run_releases_the_lock_and_exits_143(tiny_h5, tiny_overrides, tmp_path, straight):
    import subprocess
    import sys

    from maxmatch_cli.locks import lock_inside

    out = tmp_path / "run"
    args = [str(a) for a in train_args(tiny_h5, tiny_overrides, out)]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AT_STEP, str(STOP), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "SIGTERM" in proc.stdout
    assert not lock_inside(out).exists()
    _, state = checkpoint(out / "last.safetensors")
    assert (state["global_step"], state["epoch"]) == (STOP - 1, 1)  # the step it landed in is not kept
    result = invoke(*train_args(tiny_h5, tiny_overrides, out), "--resume")
    assert result.exit_code == 0, result.output
    assert not lock_inside(out).exists()
    assert_same_run(straight, out)


# ------------------------------------------------------------------------------------------------ kill -9
KILLER = """
import os, signal, sys
from maxmatch_cli.training import runlog, trainer

point, args, calls = sys.argv[1], sys.argv[2:], []

def kill_on_second(real):
    def wrapper(*a, **k):
        calls.append(1)
        if point.startswith("before") and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if point.startswith("after") and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

if point == "after_metrics_append":  # the second epoch's record is written, its checkpoint is not
    runlog.RunLog.write_record = kill_on_second(runlog.RunLog.write_record)
else:  # "before_validation": the second epoch's steps are in steps.jsonl, past the checkpoint
    trainer.Trainer.validate = kill_on_second(trainer.Trainer.validate)
from maxmatch_cli.cli.app import app
app(args, prog_name="maxmatch")
"""


def _kill_during_run(tiny_h5, tiny_overrides, out, point):
    import subprocess
    import sys

    args = [str(a) for a in train_args(tiny_h5, tiny_overrides, out)]
    proc = subprocess.run([sys.executable, "-c", KILLER, point, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout + proc.stderr


def _tear_last_line(path):
    """Cut the file's last line in the middle, as a kill during its append does."""
    text = path.read_text()
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_metrics_append", "before_validation"])
def test_kill_9_then_resume_logs_every_step_and_epoch_once(tiny_h5, tiny_overrides, tmp_path, straight, point):
    out = tmp_path / "run"
    _kill_during_run(tiny_h5, tiny_overrides, out, point)
    _, state = checkpoint(out / "last.safetensors")
    assert state["global_step"] == STEPS_PER_EPOCH  # the first epoch's checkpoint; the second one's was never saved
    assert max(r["step"] for r in jsonl(out / "steps.jsonl")) == 2 * STEPS_PER_EPOCH  # history past the checkpoint
    if point == "after_metrics_append":
        assert len(jsonl(out / "metrics.jsonl")) == 2
        _tear_last_line(out / "metrics.jsonl")  # and a kill mid-append tore the last lines
        _tear_last_line(out / "steps.jsonl")
    result = invoke(*train_args(tiny_h5, tiny_overrides, out), "--resume")
    assert result.exit_code == 0, result.output
    assert "cut back to the checkpoint" in result.output
    assert_same_run(straight, out)


# ------------------------------------------------------------------------------------------------ readers
def _glue_torn_record(path):
    """A torn last line with the next record appended to it, as an old resume left it."""
    lines = path.read_text().splitlines()
    last = lines[-1]
    path.write_text("\n".join(lines[:-1] + [last[: len(last) // 2] + last]) + "\n")


def test_readers_skip_a_torn_line_with_a_warning_and_keep_the_glued_record(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("recipe.toml", "metrics.jsonl", "steps.jsonl", "best.safetensors"):
        (run / name).write_bytes((trained / name).read_bytes())
    want = [r for r in jsonl(run / "metrics.jsonl") if "val/rsum" in r][-1]
    earlier = {**want, "epoch": 0, "step": 1, "val/rsum": want["val/rsum"] / 2}  # an epoch before, worse
    (run / "metrics.jsonl").write_text(json.dumps(earlier) + "\n" + (run / "metrics.jsonl").read_text())
    want_steps = jsonl(run / "steps.jsonl")
    _glue_torn_record(run / "metrics.jsonl")
    _glue_torn_record(run / "steps.jsonl")
    lines = len((run / "metrics.jsonl").read_text().splitlines())

    result = invoke("compare", run, "--csv", tmp_path / "table.csv")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"metrics.jsonl:{lines}" in text and "torn" in text
    import csv

    row = next(csv.DictReader((tmp_path / "table.csv").open()))
    assert float(row["rsum_mean"]) == pytest.approx(want["val/rsum"])  # the glued (last) epoch, not the one before

    from maxmatch_cli.fileio import read_history

    warnings = []
    assert read_history(run / "steps.jsonl", warnings.append) == want_steps
    assert len(warnings) == 1 and "steps.jsonl:" in warnings[0]
    doubled = run / "doubled.jsonl"  # steps logged twice by a resume that did not cut the history
    doubled.write_text("".join(json.dumps(r) + "\n" for r in want_steps[:3] + want_steps[1:]))
    assert read_history(doubled, warnings.append) == want_steps
    assert "2 step(s) twice" in warnings[-1]
    result = invoke("plot", run)  # the curves read the same way
    assert result.exit_code == 0, result.output
    assert "steps.jsonl:" in " ".join(result.output.split())


# ------------------------------------------------------------------------------------- leftovers, --overwrite
def _copy_run(trained, dest):
    dest.mkdir()
    for name in ("recipe.toml", "metrics.jsonl", "steps.jsonl", "best.safetensors", "last.safetensors"):
        (dest / name).write_bytes((trained / name).read_bytes())
    return dest


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_run_removes_only_stale_temporary_files(trained, tiny_h5, tiny_overrides, tmp_path):
    import os
    import subprocess
    import sys
    import time

    run = _copy_run(trained, tmp_path / "run")
    (run / "embeddings").mkdir()
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [run / f".last.safetensors.{dead}.a1b2c3d4.tmp", run / "embeddings" / f".best.test.x.safetensors.{dead}.zz_9yy8x.tmp",
                 run / ".recipe.toml.q1w2e3r4.tmp"]  # the last: an older version's name, written before the lock
        kept = [run / f".last.safetensors.{live.pid}.a1b2c3d4.tmp",  # a live process writes it
                run / ".notes.q1w2e3r4.tmp", run / f".notes.{dead}.txt"]  # a user's files
        for path in stale + kept:
            path.write_text("x")
        past = time.time() - 3600
        os.utime(run / ".recipe.toml.q1w2e3r4.tmp", (past, past))
        result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                        "--set", "train.max_steps=6", *tiny_overrides, "--out", run, "--resume")
        assert result.exit_code == 0, result.output
        assert [p for p in stale if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
        assert "left by a run that was killed" in result.output
    finally:
        live.kill()
        live.wait()


def test_overwrite_removes_only_the_caches_of_the_runs_own_checkpoints(trained, tmp_path):
    from safetensors.torch import save_file

    from maxmatch_cli.training.rundir import prepare_run_dir

    run = _copy_run(trained, tmp_path / "run")
    cache = run / "embeddings"
    cache.mkdir()
    ours = cache / "best.test.0123456789ab.safetensors"
    key = {"format": "maxmatch-embeddings", "checkpoint": str((run / "best.safetensors").resolve())}
    save_file({"x": torch.zeros(1)}, str(ours), metadata={"key": json.dumps(key)})
    other = cache / "last.test.ba9876543210.safetensors"  # another run's cache copied here by the user
    save_file({"x": torch.zeros(1)}, str(other), metadata={"key": json.dumps({**key, "checkpoint": "/elsewhere"})})
    user = cache / "best.notes.safetensors"  # not a cache at all
    user.write_text("my notes")
    removed = prepare_run_dir(run, overwrite=True)
    assert ours in removed and not ours.exists()
    assert other.exists() and user.exists()
    assert not (run / "best.safetensors").exists()


# ------------------------------------------------------------------------------------------------ at chance
def test_chance_level_matches_random_rankings():
    from maxmatch_cli.evaluation.chance import chance_metrics
    from maxmatch_cli.evaluation.metrics import retrieval_metrics

    n, cpi, draws = 20, 5, 400
    gen = torch.Generator().manual_seed(0)
    mean = {}
    for _ in range(draws):
        for k, v in retrieval_metrics(torch.rand(n, n * cpi, generator=gen), cpi).items():
            mean[k] = mean.get(k, 0.0) + v / draws
    want = chance_metrics(n, cpi)
    assert want["t2i_r1"] == pytest.approx(100 / n)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert mean[key] == pytest.approx(want[key], rel=0.08, abs=0.5), key


def test_a_run_ending_at_chance_warns(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    from maxmatch_cli.evaluation.metrics import retrieval_metrics

    def at_random(model, store, recipe, *args):
        n = 10  # the tiny store's validation split
        return retrieval_metrics(torch.rand(n, n * recipe.data.captions_per_image,
                                            generator=torch.Generator().manual_seed(1)), recipe.data.captions_per_image)

    monkeypatch.setattr(train_mod, "_validate", at_random)
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
                    "--set", "train.max_steps=2", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "at chance level" in text and "loss.warmup_epochs" in text


def test_ensemble_warns_about_a_member_at_chance(capsys):
    from maxmatch_cli.evaluation.chance import chance_metrics
    from maxmatch_cli.evaluation.ensemble import _warn_members_at_chance
    from maxmatch_cli.evaluation.results import EvalResult

    good = EvalResult("full", {"rsum": 300.0}, n_images=100, checkpoint="a/best.safetensors")
    bad = EvalResult("full", chance_metrics(100, 5), n_images=100, checkpoint="b/best.safetensors")
    _warn_members_at_chance([good, bad], 5)
    out = " ".join(capsys.readouterr().out.split())
    assert "b/best.safetensors" in out and "at chance" in out and "a/best.safetensors" not in out
