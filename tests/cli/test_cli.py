"""The command line end to end on tiny synthetic data, and its answers to bad input."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

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


def test_resume_continues(trained, tiny_h5, tiny_overrides, tmp_path):
    """--resume goes on from the checkpoint's step (6 of `trained`): the steps and the validation already logged
    stay, once, and the optimiser's step count carries on. On a copy: `trained` is shared by the other tests."""
    import shutil

    from maxmatch_cli.models.checkpoint import load_checkpoint

    def optimiser_steps(ckpt) -> set[int]:
        return {int(s["step"]) for s in ckpt.optim_state["state"].values()}

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = load_checkpoint(run / "last.safetensors")
    logged = (run / "steps.jsonl").read_text().splitlines()
    validated = (run / "metrics.jsonl").read_text().splitlines()
    assert before.train_state["global_step"] == 6 and optimiser_steps(before) == {6}
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line)["step"] for line in validated] == [6]
    result = invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
                    "--set", "train.max_steps=8", *tiny_overrides, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "8 steps" in result.output
    after = load_checkpoint(run / "last.safetensors")
    assert after.train_state["global_step"] == 8 and optimiser_steps(after) == {8}
    lines = (run / "steps.jsonl").read_text().splitlines()
    assert lines[:6] == logged and [json.loads(line)["step"] for line in lines[6:]] == [7, 8]
    # Only a resumed run has the validation at step 6 (where the first run stopped): a fresh 8-step run validates
    # once, at step 8, and would log the same steps 1-8 (training is deterministic).
    history = (run / "metrics.jsonl").read_text().splitlines()
    assert history[:1] == validated and [json.loads(line)["step"] for line in history] == [6, 8]
    assert [record["step"] for record in after.train_state["history"]] == [6, 8]


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


# ------------------------------------------------------------------------------------------------------------
# Messages and paths are never hard-wrapped (rich wraps at 80 columns when the output is not a terminal).


def _deep_folder(root, min_length=220):
    folder = root
    while len(str(folder)) < min_length:
        folder = folder / "a-rather-long-folder-name"
    folder.mkdir(parents=True)
    return folder


def test_long_paths_stay_on_one_line(tmp_path):
    junk = _deep_folder(tmp_path) / "junk.safetensors"
    assert len(str(junk)) > 200
    junk.write_bytes(b"not a checkpoint")
    result = invoke("evaluate", junk)
    assert result.exit_code == 2, result.output
    line = next((ln for ln in result.output.splitlines() if ln.startswith("error:")), "")
    assert f"error: {junk} is not a readable maxmatch checkpoint" in line, result.output
    assert any(ln.startswith("hint: ") and ln.endswith("pass another file") for ln in result.output.splitlines())


def test_brackets_in_paths_are_not_markup(tmp_path):
    junk = tmp_path / "[bold]x[red]y" / "junk.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint")
    result = invoke("evaluate", junk)
    assert result.exit_code == 2
    assert f"{junk} is not a readable maxmatch checkpoint" in result.output


def test_written_files_announced_on_one_line(trained, tmp_path):
    folder = _deep_folder(tmp_path)
    out_json, out_csv = folder / "m.json", folder / "m.csv"
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "best.safetensors"
    ckpt.write_bytes((trained / "best.safetensors").read_bytes())
    result = invoke("evaluate", ckpt, "--split", "test", "--json", out_json, "--csv", out_csv)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"wrote {out_json}" in lines and f"wrote {out_csv}" in lines
    cache = [ln for ln in lines if ln.startswith(f"wrote {run / 'embeddings'}/best.test.")]
    assert len(cache) == 1 and cache[0].endswith(".safetensors")
    # Second time the embeddings come from the cache: only the two result files are written.
    result = invoke("evaluate", ckpt, "--split", "test", "--json", out_json)
    assert [ln for ln in result.output.splitlines() if ln.startswith("wrote ")] == [f"wrote {out_json}"]


# ------------------------------------------------------------------------------------------------------------
# Run folders: train refuses to replace an earlier run unless told (train itself is stubbed out).


@pytest.fixture
def fake_train(monkeypatch):
    """Replace the training engine by a stub that writes a run's files; records its calls."""
    import maxmatch_cli.training.trainer as train_mod
    from maxmatch_cli.training.trainer import TrainResult

    calls = []

    def fake(recipe, out_dir, resume=False, show_progress=True):
        calls.append({"out": out_dir, "resume": resume})
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("best.safetensors", "last.safetensors", "metrics.jsonl", "recipe.toml"):
            (out_dir / name).write_text(f"run {len(calls)}")
        fields = {f.name: None for f in dataclasses.fields(TrainResult)}
        fields.update(out_dir=out_dir, steps=3, seconds=1.0, interrupted=False, best_rsum=1.0, last_metrics=None)
        return TrainResult(**fields)

    monkeypatch.setattr(train_mod, "train", fake)
    return calls


def _train(out, *flags):
    return invoke("train", "--recipe", "demo", "--set", "data.path=x.h5", "--out", out, *flags)


def test_train_refuses_a_folder_holding_a_run(fake_train, tmp_path):
    out = tmp_path / "run"
    assert _train(out).exit_code == 0 and len(fake_train) == 1
    result = _train(out)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{out} already holds a training run" in message
    assert "use --resume to continue it or --overwrite to replace it" in message
    assert "Traceback" not in result.output and len(fake_train) == 1  # refused before training
    assert (out / "best.safetensors").read_text() == "run 1"


@pytest.mark.parametrize("only", ["best.safetensors", "last.safetensors", "metrics.jsonl", "recipe.toml"])
def test_any_run_file_counts(fake_train, tmp_path, only):
    out = tmp_path / "run"
    out.mkdir()
    (out / only).write_text("old")
    result = _train(out)
    assert result.exit_code == 2 and only in result.output and not fake_train


def test_train_into_a_folder_of_other_files(fake_train, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _train(out)
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_the_run(fake_train, tmp_path):
    out = tmp_path / "run"
    _train(out)
    (out / "embeddings").mkdir()
    # Named like a cache but not one of this run's checkpoints: a user's file, kept (the run's own caches are
    # removed: tests/faults/test_resume_history.py::test_overwrite_removes_only_the_caches_of_the_runs_own_checkpoints).
    lookalike = out / "embeddings" / "best.test.0123456789ab.safetensors"
    lookalike.write_text("keep")
    for keep in ("notes.txt", "embeddings/mine.npy", "collapse-best-test/collapse.json"):
        (out / keep).parent.mkdir(parents=True, exist_ok=True)
        (out / keep).write_text("keep")
    result = _train(out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(fake_train) == 2 and fake_train[-1]["resume"] is False
    assert (out / "best.safetensors").read_text() == "run 2"
    for keep in ("notes.txt", "embeddings/mine.npy", "collapse-best-test/collapse.json",
                 "embeddings/best.test.0123456789ab.safetensors"):
        assert (out / keep).read_text() == "keep"
    lines = result.output.splitlines()
    assert f"wrote {out / 'best.safetensors'}" in lines and f"wrote {out / 'metrics.jsonl'}" in lines


def test_resume_keeps_the_run_and_conflicts_with_overwrite(fake_train, tmp_path):
    out = tmp_path / "run"
    _train(out)
    assert _train(out, "--resume").exit_code == 0 and fake_train[-1]["resume"] is True
    result = _train(out, "--resume", "--overwrite")
    assert result.exit_code == 2 and "--resume and --overwrite" in result.output and len(fake_train) == 2


# ------------------------------------------------------------------------------------------------------------
# Protocols, devices, features info --json.


def test_unknown_protocol_lists_the_known_ones(trained):
    for command in (["evaluate", trained], ["ensemble", trained, trained]):
        result = invoke(*command, "--split", "test", "--protocol", "coco2k")
        assert result.exit_code == 2, result.output
        assert "unknown protocol 'coco2k'" in result.output and "auto, full, coco1k, coco5k" in result.output


@pytest.mark.parametrize("protocol", ["coco1k", "coco5k"])
def test_coco_protocols_need_the_5k_split(trained, monkeypatch, protocol):
    from maxmatch_cli.evaluation import evaluate as ev

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded before the protocol was checked")

    monkeypatch.setattr(ev, "checkpoint_embeddings", must_not_encode)
    for command in (["evaluate", trained], ["ensemble", trained, trained]):
        result = invoke(*command, "--split", "test", "--protocol", protocol)
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        # The tiny data's test split has 20 images.
        assert f"protocol {protocol} needs the 5,000-image COCO test split, but split 'test' has 20 images" in message
        assert "--protocol full" in message


def test_evaluate_cuda_without_cuda_hints_at_the_option(trained, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("evaluate", trained, "--split", "test", "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "no CUDA device is available" in result.output
    assert "hint: use --device cpu or auto" in result.output and "train.device" not in result.output


def test_features_info_json(tiny_h5):
    from maxmatch_cli.features.store import describe_store

    result = invoke("features", "info", tiny_h5, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info == json.loads(json.dumps(describe_store(tiny_h5)))
    assert info["path"] == str(tiny_h5) and info["complete"] is True
    # The tiny preset: 40 / 12 / 20 images with 5 captions each, 12 regions of 32 dimensions.
    assert info["splits"]["train"] == {"images": 40, "captions": 200, "captions_per_image": 5}
    assert info["splits"]["test"]["images"] == 20 and info["feature_dim"] == 32
