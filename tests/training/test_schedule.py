"""The learning-rate schedule against its formulas (paper App. B; DESIGN.md §2: cosine per iteration, SetDiv).

With W warm-up steps, T steps in the run, E steps per epoch and base rate lr, the rate at global step s (from 0) is
    lr × (s + 1) / W                          for s < W (linear warm-up)
    lr × ½ (1 + cos(π · min(s / T, 1)))       cosine (not shifted by the warm-up)
    lr × γ ^ (⌊s / E⌋ // step_epochs)         step decay
    lr                                        constant
The formulas are written here independently of :mod:`maxmatch_cli.training.schedule`; a tiny real run checks
that the optimiser used them at every step (the lr it logs in ``steps.jsonl``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.config.recipes import load_recipe
from maxmatch_cli.training import trainer as train_mod
from maxmatch_cli.training.schedule import lr_factor, remember_base_lr, set_lr


def optim(**values):
    return load_recipe("demo").replace(**{f"optim.{k}": v for k, v in values.items()})


def expected_factor(s, total, per_epoch, schedule, warmup=0, gamma=0.1, step_epochs=1):
    """The schedule as the paper and DESIGN.md state it (see the module docstring)."""
    if s < warmup:
        return (s + 1) / warmup
    if schedule == "cosine":
        return (1 + math.cos(math.pi * min(s, total) / total)) / 2
    if schedule == "step":
        epoch = s // per_epoch
        return gamma ** (epoch // step_epochs)
    return 1.0


def test_cosine_at_hand_computed_points():
    r = optim(schedule="cosine", warmup_steps=0)
    assert lr_factor(0, 100, 10, r) == 1.0  # starts at the base rate
    assert lr_factor(50, 100, 10, r) == pytest.approx(0.5, abs=1e-15)  # half-way
    assert lr_factor(25, 100, 10, r) == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-15)  # cos(π/4) = √½
    assert lr_factor(100, 100, 10, r) == pytest.approx(0.0, abs=1e-15)  # ends at zero
    assert lr_factor(150, 100, 10, r) == pytest.approx(0.0, abs=1e-15)  # and stays there past the end
    # Per iteration, not per epoch: consecutive steps of one epoch differ, and it only decreases.
    values = [lr_factor(s, 100, 10, r) for s in range(101)]
    assert values[1] < values[0] and all(b < a for a, b in zip(values, values[1:]))


def test_warm_up_is_linear_and_then_the_cosine_is_not_shifted():
    r = optim(schedule="cosine", warmup_steps=4)
    assert [lr_factor(s, 40, 10, r) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # warm-up end: the base rate
    # After the warm-up the cosine continues at its own step, as if there had been none.
    assert lr_factor(4, 40, 10, r) == pytest.approx((1 + math.cos(math.pi * 4 / 40)) / 2, rel=1e-15)
    assert lr_factor(20, 40, 10, r) == pytest.approx(0.5, abs=1e-15)


def test_step_decay_multiplies_by_gamma_every_step_epochs():
    r = optim(schedule="step", gamma=0.1, step_epochs=2, warmup_steps=0)
    per_epoch = 10
    assert [lr_factor(s, 100, per_epoch, r) for s in (0, 9, 10, 19)] == [1.0] * 4  # epochs 0 and 1
    assert lr_factor(20, 100, per_epoch, r) == pytest.approx(0.1, rel=1e-15)  # epoch 2
    assert lr_factor(39, 100, per_epoch, r) == pytest.approx(0.1, rel=1e-15)  # epoch 3
    assert lr_factor(40, 100, per_epoch, r) == pytest.approx(0.01, rel=1e-15)  # epoch 4


def test_constant_with_warm_up():
    r = optim(schedule="constant", warmup_steps=2)
    assert [lr_factor(s, 10, 5, r) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule, warmup, gamma, step_epochs", [
    ("cosine", 0, 0.1, 1), ("cosine", 7, 0.1, 1), ("step", 0, 0.1, 1), ("step", 3, 0.5, 2), ("step", 0, 0.3, 3),
    ("constant", 0, 0.1, 1), ("constant", 5, 0.1, 1)])
def test_every_step_follows_the_formula(schedule, warmup, gamma, step_epochs):
    r = optim(schedule=schedule, warmup_steps=warmup, gamma=gamma, step_epochs=step_epochs)
    total, per_epoch = 60, 12
    for s in range(total + 1):
        want = expected_factor(s, total, per_epoch, schedule, warmup, gamma, step_epochs)
        assert lr_factor(s, total, per_epoch, r) == pytest.approx(want, rel=1e-12, abs=1e-15), s


def test_set_lr_scales_each_groups_base_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], lr=1e-3)
    remember_base_lr(opt)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * 0.25, 1e-4 * 0.25]
    set_lr(opt, 1.0)  # from the base, not compounded on the last rate
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_the_trainer_uses_this_schedule():
    assert train_mod.lr_factor is lr_factor


# ------------------------------------------------------------------------------------------------------------
# A real run: the lr the optimiser used at each step, as logged, is the base rate times the formula.

STEPS_PER_EPOCH = 10  # tiny store: 40 training images, batch 4 images


@pytest.mark.parametrize("schedule, extra", [
    ("cosine", ["optim.warmup_steps=3"]),
    ("step", ["optim.step_epochs=1", "optim.gamma=0.5", "optim.warmup_steps=2"])])
def test_a_real_runs_learning_rate_follows_the_formula(tiny_h5, tiny_overrides, tmp_path, schedule, extra):
    out, epochs = tmp_path / "run", 2
    sets = [a for kv in [f"optim.schedule={schedule}", f"train.epochs={epochs}", "data.val_split=", *extra]
            for a in ("--set", kv)]
    result = CliRunner().invoke(app, ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}",
                                      *tiny_overrides, *sets, "--out", str(out)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe("demo").replace(**dict(kv.split("=", 1) for kv in extra))
    with safe_open(str(out / "last.safetensors"), framework="pt") as fh:
        group0 = json.loads(fh.metadata()["optim"])["param_groups"][0]
    base = group0["base_lr"]
    assert base == pytest.approx(recipe.optim.lr * group0["lr_scale"], rel=1e-15)  # the group logged in steps.jsonl

    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    total = epochs * STEPS_PER_EPOCH
    assert [r["step"] for r in records] == list(range(1, total + 1))
    o = recipe.optim
    for r in records:  # record n is the step taken at global step n - 1
        want = base * expected_factor(r["step"] - 1, total, STEPS_PER_EPOCH, schedule, o.warmup_steps, o.gamma,
                                      o.step_epochs)
        assert r["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), r["step"]
    if schedule == "cosine":
        assert records[o.warmup_steps - 1]["lr"] == base  # warm-up end: the base rate, exactly
    else:
        assert records[-1]["lr"] == pytest.approx(base * 0.5 ** (epochs - 1), rel=1e-15)
