"""Ensembles (paper §4.2), on the session's tiny checkpoint."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from maxmatch_cli.evaluation.encoding import encode_split, load_for_eval, score
from maxmatch_cli.evaluation.ensemble import ensemble_checkpoints
from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint
from maxmatch_cli.evaluation.protocols import metrics_for
from maxmatch_cli.models.checkpoint import load_checkpoint, save_checkpoint
from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store

CPU = torch.device("cpu")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def variant(src, dst, *, noise=0.0, data_path=None):
    """A second checkpoint: the same model with seeded weight noise (a stand-in for another seed), optionally
    pointing at another feature file."""
    loaded = load_checkpoint(src)
    model, _ = load_for_eval(loaded, CPU)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    recipe = loaded.recipe
    if data_path is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path=str(data_path)))
    return save_checkpoint(dst, model, recipe, loaded.vocab_json, loaded.provenance)


def manual_sims(path):
    loaded = load_checkpoint(path)
    model, tokenizer = load_for_eval(loaded, CPU)
    store = open_store(loaded.recipe.data.path)
    emb = encode_split(model, store, "test", tokenizer, 5, CPU, show_progress=False)
    return score(emb.images, emb.captions, "maxmatch", CPU)


def test_self_ensemble_equals_single_model(ckpt):
    single = evaluate_checkpoint(ckpt, split="test", show_progress=False)
    result = ensemble_checkpoints([ckpt, ckpt], split="test", show_progress=False)
    assert result.ensemble.metrics == single.metrics
    assert [m.metrics for m in result.members] == [single.metrics, single.metrics]
    assert result.ensemble.similarity == "maxmatch"


def test_ensemble_averages_member_similarities(ckpt, tmp_path):
    other = variant(ckpt, tmp_path / "b.safetensors", noise=0.05)
    sims_a, sims_b = manual_sims(ckpt), manual_sims(other)
    assert not torch.allclose(sims_a, sims_b)  # the members really differ
    expected = metrics_for((sims_a + sims_b) / 2, "full", 5).metrics
    out_json, out_csv = tmp_path / "e.json", tmp_path / "e.csv"
    result = ensemble_checkpoints([ckpt, other], split="test", json_path=out_json, csv_path=out_csv,
                                  show_progress=False)
    assert result.ensemble.metrics == pytest.approx(expected)
    assert result.members[0].metrics == pytest.approx(metrics_for(sims_a, "full", 5).metrics)
    assert result.members[1].metrics == pytest.approx(metrics_for(sims_b, "full", 5).metrics)
    report = json.loads(out_json.read_text())
    assert {"protocol", "metrics", "folds", "members"} <= set(report)
    assert report["protocol"] == "full" and report["folds"] == []
    assert [m["checkpoint"] for m in report["members"]] == [str(ckpt), str(other)]
    assert report["metrics"] == pytest.approx(expected)
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("model,similarity,protocol,i2t_r1") and lines[-1].startswith("ensemble,")
    assert len(lines) == 4


def test_ensemble_cli_table_and_json(ckpt, tmp_path):
    other = variant(ckpt, tmp_path / "b.safetensors", noise=0.05)
    out = tmp_path / "e.json"
    result = invoke("ensemble", ckpt, other, "--split", "test", "--json", out)
    assert result.exit_code == 0, result.output
    assert "ensemble of 2" in result.output and "RSUM" in result.output
    assert len(json.loads(out.read_text())["members"]) == 2


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Tiny data sets that do not line up with the session's: another seed, and 64-dimensional features."""
    from maxmatch_cli.features.synthetic import generate_synthetic

    folder = tmp_path_factory.mktemp("other")
    return (generate_synthetic(folder / "seed1.h5", "tiny", seed=1, progress=False),
            generate_synthetic(folder / "dim64.h5", "tiny", feature_dim=64, progress=False))


def test_ensemble_bad_input(ckpt, tmp_path, other_data):
    seed1, dim64 = other_data
    result = invoke("ensemble", "/nonexistent/a.safetensors", ckpt)
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("ensemble", ckpt)
    assert result.exit_code == 2 and "at least two checkpoints" in result.output
    elsewhere = variant(ckpt, tmp_path / "elsewhere.safetensors", data_path=seed1)
    result = invoke("ensemble", ckpt, elsewhere, "--split", "test")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # the error console wraps long lines
    assert "does not line up" in message and "captions differ" in message
    result = invoke("ensemble", ckpt, ckpt, "--data", dim64, "--split", "test")
    assert result.exit_code == 2 and "64-dimensional" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_members_must_agree_on_split(ckpt, tmp_path):
    loaded = load_checkpoint(ckpt)
    model, _ = load_for_eval(loaded, CPU)
    recipe = dataclasses.replace(loaded.recipe, eval=dataclasses.replace(loaded.recipe.eval, split="dev"))
    dev_ckpt = save_checkpoint(tmp_path / "dev.safetensors", model, recipe, loaded.vocab_json, loaded.provenance)
    with pytest.raises(MaxMatchError, match="eval.split"):
        ensemble_checkpoints([ckpt, dev_ckpt], show_progress=False)
