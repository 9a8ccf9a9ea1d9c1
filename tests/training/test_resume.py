"""`maxmatch train --resume` continues a run exactly (data.num_workers=0).

Training N epochs straight must give the same weights as stopping and resuming: at an epoch boundary (stopped by
``train.max_steps``, which with the step schedule leaves the learning rate untouched), and after a Ctrl-C in the
middle of an epoch or at the first step of one (cosine schedule, whose factor depends on the total step count).
A Ctrl-C lands mid-step, after the next batch has drawn its word and region dropout from the CPU generator, so the
checkpoint must hold the RNG state of the last step boundary, and a resumed run must restore it after making the
epoch's DataLoader iterator (which draws a seed too).

Not exact by design: stopping a *cosine* run with a smaller ``train.max_steps`` or ``train.epochs`` (the schedule
is defined by the run's length, and resuming with a longer one re-stretches it), and a mid-epoch resume with
``data.num_workers > 0`` (the workers' augmentation streams restart; weights, optimiser, step and data order are
still exact).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from maxmatch_cli.training import trainer as train_mod
from maxmatch_cli.cli.app import app

STEPS_PER_EPOCH = 10  # tiny store: 40 training images, batch 4 images (x 5 captions)
EPOCHS = 3


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(tiny_h5, tiny_overrides, out, schedule, *extra):
    return ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", *tiny_overrides,
            "--set", f"train.epochs={EPOCHS}", "--set", f"optim.schedule={schedule}", "--set", "optim.step_epochs=1",
            *extra, "--out", out]


def model_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def train_state(path):
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["train_state"])


def assert_same_weights(a, b):
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def last_lr(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"]


@pytest.fixture(scope="module")
def straight(tiny_h5, tiny_overrides, tmp_path_factory):
    """{schedule: run folder} of uninterrupted runs, made on first use."""
    runs = {}

    def get(schedule):
        if schedule not in runs:
            out = tmp_path_factory.mktemp(f"straight-{schedule}")
            result = invoke(*train_args(tiny_h5, tiny_overrides, out, schedule))
            assert result.exit_code == 0, result.output
            assert f"{EPOCHS * STEPS_PER_EPOCH} steps" in result.output
            runs[schedule] = out
        return runs[schedule]

    return get


def interrupt_after(monkeypatch, steps, during_save=None):
    """Raise KeyboardInterrupt in the step after ``steps`` completed ones (after its batch was loaded)."""
    real = train_mod.loss_on_batch
    calls = {"n": 0}

    def loss_on_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == steps + 1:
            calls["interrupted"] = True
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "loss_on_batch", loss_on_batch)
    return calls


def test_resume_at_epoch_boundary_is_exact(tiny_h5, tiny_overrides, tmp_path, straight):
    out = tmp_path / "run"
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "step", "--set", f"train.max_steps={STEPS_PER_EPOCH}"))
    assert result.exit_code == 0, result.output
    assert train_state(out / "last.safetensors")["global_step"] == STEPS_PER_EPOCH
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "step", "--set", "train.max_steps=0"), "--resume")
    assert result.exit_code == 0, result.output
    assert f"{EPOCHS * STEPS_PER_EPOCH} steps" in result.output
    reference = straight("step")
    assert_same_weights(reference / "last.safetensors", out / "last.safetensors")
    assert last_lr(out) == last_lr(reference)  # the step schedule continued from the global step


@pytest.mark.parametrize("stop", [5, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7])
def test_ctrl_c_then_resume_is_exact(tiny_h5, tiny_overrides, tmp_path, straight, monkeypatch, stop):
    out = tmp_path / "run"
    calls = interrupt_after(monkeypatch, stop)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "cosine"))
    assert calls.get("interrupted") and result.exit_code == 130, result.output
    assert "interrupted" in result.output
    saved = train_state(out / "last.safetensors")
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (
        stop, stop // STEPS_PER_EPOCH, stop % STEPS_PER_EPOCH)
    monkeypatch.undo()

    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "cosine"), "--resume")
    assert result.exit_code == 0, result.output
    assert f"{EPOCHS * STEPS_PER_EPOCH} steps" in result.output
    final = train_state(out / "last.safetensors")
    assert (final["global_step"], final["epoch"], final["step_in_epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS, 0)
    reference = straight("cosine")
    assert_same_weights(reference / "last.safetensors", out / "last.safetensors")
    assert last_lr(out) == last_lr(reference)  # the cosine factor continued over the same total


def test_second_ctrl_c_does_not_abort_the_save(tiny_h5, tiny_overrides, tmp_path, monkeypatch):
    """torchrun forwards SIGINT to its workers, so a worker gets a second one right after the terminal's."""
    out = tmp_path / "run"
    calls = interrupt_after(monkeypatch, 3)
    real_save = train_mod.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        if calls.get("interrupted"):
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_checkpoint)
    handler = signal.getsignal(signal.SIGINT)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "cosine"))
    assert result.exit_code == 130, result.output
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the save
    assert train_state(out / "last.safetensors")["global_step"] == 3


def test_resume_with_another_world_size_warns(tiny_h5, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "step", "--set", "train.max_steps=2"))
    assert result.exit_code == 0, result.output
    path = out / "last.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    meta["provenance"] = json.dumps({**json.loads(meta["provenance"]), "world_size": 4})
    save_file(load_file(str(path)), str(path), metadata=meta)
    result = invoke(*train_args(tiny_h5, tiny_overrides, out, "step", "--set", "train.max_steps=3"), "--resume")
    assert result.exit_code == 0, result.output
    assert "trained by 4 process" in " ".join(result.output.split())
