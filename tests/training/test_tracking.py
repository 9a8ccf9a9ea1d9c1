"""train.report_to: TensorBoard event files hold the values of steps.jsonl and metrics.jsonl; bad or missing
backends fail at start with exit code 2 and the fix."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.config.recipes import TrainConfig
from maxmatch_cli.training.tracking import Trackers, backends, tracker_folders

# The fixtures tiny_h5 and tiny_overrides (the tiny model's --set list) live in conftest.py.


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tensorboard_scalars_equal_the_jsonl_records(tiny_h5, tiny_overrides, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                    "--set", "train.max_steps=4", "--set", "train.log_every=3",
                    "--set", "train.report_to=jsonl,tensorboard", *tiny_overrides, "--out", out)
    assert result.exit_code == 0, result.output
    wrote = [ln.split("wrote ", 1)[1] for ln in result.output.splitlines() if ln.startswith("wrote ")]
    assert wrote[-1] == str(out / "tensorboard") and str(out / "metrics.jsonl") in wrote  # every file announced
    steps = _jsonl(out / "steps.jsonl")
    metrics = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert any("val/rsum" in r for r in metrics)

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    loss_tags = {k for k in steps[0] if k.startswith("loss/")}
    assert {"lr", "loss/total", "val/rsum"} <= tags and loss_tags <= tags
    for tag in loss_tags | {"lr"}:
        events = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(events) == [r["step"] for r in steps], tag
        for r in steps:  # event files hold float32
            assert events[r["step"]] == pytest.approx(r[tag], rel=1e-6, abs=1e-7), (tag, r["step"])
    val = {e.step: e.value for e in acc.Scalars("val/rsum")}
    expected = {r["step"]: r["val/rsum"] for r in metrics if "val/rsum" in r}
    assert sorted(val) == sorted(expected)
    for step, rsum in expected.items():
        assert val[step] == pytest.approx(rsum, rel=1e-6, abs=1e-5)


def test_unknown_backend_is_a_clear_error(tiny_h5, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}",
                    "--set", "train.report_to=jsonl,tensorbord", *tiny_overrides, "--out", out)
    assert result.exit_code == 2, result.output
    assert "train.report_to" in result.output and "tensorbord" in result.output
    assert "tensorboard" in result.output  # the suggestion
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_wandb_fails_before_training(tiny_h5, tiny_overrides, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}",
                    "--set", "train.report_to=jsonl,wandb", *tiny_overrides, "--out", out)
    assert result.exit_code == 2, result.output
    assert "pip install wandb" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing trained, nothing written


def test_report_to_parsing():
    assert TrainConfig().report_to == "jsonl"
    assert backends("jsonl") == []
    assert backends("tensorboard, jsonl,tensorboard") == ["tensorboard"]
    for bad in ("", "jsonl,", "csv"):
        with pytest.raises(MaxMatchError, match="train.report_to"):
            TrainConfig(report_to=bad)


def test_trackers_close_every_tracker_even_when_one_fails():
    closed = []

    class Failing:
        def log(self, values, step):
            pass

        def close(self):
            closed.append("failing")
            raise OSError("disk full")

    class Fine(Failing):
        def close(self):
            closed.append("fine")

    trackers = Trackers([Failing(), Fine()])
    with pytest.raises(OSError, match="disk full"):
        trackers.close()
    assert closed == ["failing", "fine"]
    trackers.close()  # a second close does nothing
    assert closed == ["failing", "fine"]


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _fail_at(monkeypatch, step, exc):
    """``exc`` raised in training step ``step`` (the earlier ones complete)."""
    from maxmatch_cli.training import trainer as train_mod

    real, calls = train_mod.loss_on_batch, {"n": 0}

    def loss_on_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "loss_on_batch", loss_on_batch)


def _tb_args(tiny_h5, tiny_overrides, out):
    return ("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
            "--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "train.report_to=tensorboard",
            *tiny_overrides, "--out", out)


@pytest.mark.parametrize("exc, code", [(RuntimeError("boom"), None), (KeyboardInterrupt(), 130)])
def test_an_error_or_ctrl_c_mid_run_closes_the_writer(tiny_h5, tiny_overrides, tmp_path, monkeypatch, exc, code):
    pytest.importorskip("tensorboard")
    from maxmatch_cli.training import tracking

    closed = []
    real_close = tracking.TensorBoardTracker.close
    monkeypatch.setattr(tracking.TensorBoardTracker, "close", lambda self: (closed.append(1), real_close(self)))
    out = tmp_path / "run"
    _fail_at(monkeypatch, 2, exc)
    result = invoke(*_tb_args(tiny_h5, tiny_overrides, out))
    if code is None:
        assert isinstance(result.exception, RuntimeError), result.output
    else:
        assert result.exit_code == code, result.output
    assert closed == [1]
    steps = _jsonl(out / "steps.jsonl")  # jsonl is written whatever report_to says
    assert [r["step"] for r in steps] == [1]
    assert _scalars(out, "loss/total") == [(r["step"], pytest.approx(r["loss/total"], rel=1e-6)) for r in steps]


def test_ctrl_c_then_resume_logs_every_step_once(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    _fail_at(monkeypatch, 3, KeyboardInterrupt())
    result = invoke(*_tb_args(tiny_h5, tiny_overrides, out))
    assert result.exit_code == 130, result.output
    assert [s for s, _ in _scalars(out, "loss/total")] == [1, 2]
    monkeypatch.undo()
    result = invoke(*_tb_args(tiny_h5, tiny_overrides, out), "--resume")
    assert result.exit_code == 0, result.output
    steps = _jsonl(out / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert _scalars(out, "loss/total") == [(r["step"], pytest.approx(r["loss/total"], rel=1e-6)) for r in steps]
    assert _scalars(out, "lr") == [(r["step"], pytest.approx(r["lr"], rel=1e-6)) for r in steps]


def test_wandb_receives_the_jsonl_values_offline(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    """The W&B backend through a stand-in module that records the calls (wandb itself is the user's to install):
    an offline run under OUT/wandb, every step's raw losses and lr at its step, each validation, then finish."""
    import importlib.machinery
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                    "--set", "train.max_steps=4", "--set", "train.log_every=3",
                    "--set", "train.report_to=jsonl,wandb", *tiny_overrides, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(calls["init"]) == 1 and calls["finish"] == 1
    init = calls["init"][0]
    assert init["mode"] == "offline" and init["dir"] == str(out) and init["project"] == "maxmatch"
    assert init["config"]["train"]["seed"] is not None  # the resolved recipe
    steps = _jsonl(out / "steps.jsonl")
    logged = {}
    for step, values in calls["log"]:
        logged.setdefault(step, {}).update(values)
    for r in steps:
        for tag in (k for k in r if k.startswith("loss/") or k == "lr"):
            assert logged[r["step"]][tag] == pytest.approx(r[tag], rel=1e-9), (tag, r["step"])
    metrics = _jsonl(out / "metrics.jsonl")
    for r in (r for r in metrics if "val/rsum" in r):
        assert logged[r["step"]]["val/rsum"] == pytest.approx(r["val/rsum"], rel=1e-9)


def test_tracker_folders_are_those_of_report_to_that_were_written(tmp_path):
    """`train` prints a `wrote` line for each (OUT/tensorboard, OUT/wandb): only the asked-for ones that exist."""
    (tmp_path / "wandb").mkdir()
    (tmp_path / "tensorboard").mkdir()
    assert tracker_folders("jsonl,wandb", tmp_path) == [tmp_path / "wandb"]
    assert tracker_folders("tensorboard,wandb", tmp_path) == [tmp_path / "tensorboard", tmp_path / "wandb"]
    assert tracker_folders("jsonl", tmp_path) == []  # a folder left from another run is not this run's
    (tmp_path / "wandb").rmdir()
    assert tracker_folders("wandb", tmp_path) == []
