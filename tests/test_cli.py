"""The command line end to end on tiny synthetic data, and its answers to bad input."""

import json

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli import app

runner = CliRunner()
# The fixtures tiny_h5, trained and tiny_overrides (the tiny model's --set list) live in conftest.py.


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "evaluate", "extract-features", "recipes", "features", "similarities"):
        assert command in result.output


def test_recipes_list_and_show():
    result = invoke("recipes")
    assert result.exit_code == 0 and "demo" in result.output
    result = invoke("recipes", "demo", "--set", "optim.lr=0.5")
    assert result.exit_code == 0 and "lr = 0.5" in result.output


def test_similarities_listed():
    result = invoke("similarities")
    assert result.exit_code == 0
    for kind in ("maxmatch", "chamfer", "mil", "topk"):
        assert kind in result.output


def test_features_info(tiny_h5):
    result = invoke("features", "info", tiny_h5)
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "test" in result.output


def test_train_writes_checkpoints_and_history(trained):
    assert (trained / "best.safetensors").is_file()
    assert (trained / "last.safetensors").is_file()
    assert (trained / "recipe.toml").is_file()
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert lines and "val/rsum" in json.loads(lines[-1])


def test_evaluate_writes_json(trained, tmp_path):
    out = tmp_path / "m.json"
    csv = tmp_path / "m.csv"
    result = invoke("evaluate", trained / "best.safetensors", "--split", "test", "--json", out, "--csv", csv)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "full" and data["folds"] == []
    keys = {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
            "t2i_meanr", "rsum"}
    assert keys <= set(data["metrics"])
    assert csv.read_text().startswith("protocol,")
    # Another similarity at test time works without any recipe flag.
    result = invoke("evaluate", trained, "--similarity", "chamfer", "--split", "test")
    assert result.exit_code == 0, result.output


def test_resume_continues(trained, tiny_h5, tiny_overrides):
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                    "--set", "train.max_steps=8", *tiny_overrides, "--out", trained, "--resume")
    assert result.exit_code == 0, result.output
    assert "8 steps" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--recipe", "demo", "--set", "optim.lrr=1"], "optim.lrr"),
    (["train", "--recipe", "nosuchrecipe"], "unknown recipe"),
    (["train", "--recipe", "demo", "--set", "data.path=/nonexistent/f.h5"], "/nonexistent/f.h5"),
    (["evaluate", "/nonexistent/ckpt.safetensors"], "does not exist"),
    (["features", "info", "/nonexistent/x.h5"], "/nonexistent/x.h5"),
    (["extract-features", "--synthetic", "nope", "--out", "/tmp/x.h5"], "nope"),
])
def test_bad_input_gives_one_clear_message(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_corrupt_inputs(tmp_path, trained):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    result = invoke("evaluate", junk)
    assert result.exit_code == 2 and "not a readable maxmatch checkpoint" in result.output
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    result = invoke("features", "info", bad_h5)
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = invoke("evaluate", trained, "--split", "nosplit")
    assert result.exit_code == 2 and "nosplit" in result.output


@pytest.mark.slow
def test_small_end_to_end_beats_chance(tmp_path, tiny_overrides):
    """generate -> train -> evaluate on a small synthetic set; recall must be far above chance."""
    from maxmatch_cli.features.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "small.h5", preset="tiny", n_train=400, n_dev=50, n_test=100,
                              feature_dim=64, n_regions=12)
    out = tmp_path / "run"
    # The pipeline, not hardest-negative mining, is under test: sum over all negatives, cosine schedule.
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={data}", "--set", "train.epochs=10",
                    *tiny_overrides, "--set", "model.image_feature_dim=64", "--set", "train.batch_size=32",
                    "--set", "optim.lr=2e-3", "--set", "loss.hardest_negatives=false",
                    "--set", "loss.warmup_epochs=0", "--set", "optim.schedule=cosine", "--out", out)
    assert result.exit_code == 0, result.output
    m = tmp_path / "m.json"
    result = invoke("evaluate", out, "--split", "test", "--json", m)
    assert result.exit_code == 0, result.output
    report = json.loads(m.read_text())
    chance_r1 = 100.0 / report["n_images"]
    assert report["metrics"]["i2t_r1"] > 5 * chance_r1, report["metrics"]
    assert report["metrics"]["t2i_r1"] > 5 * chance_r1, report["metrics"]
