"""Result files: what evaluation JSON records, how it is rounded, and the permissions every result file gets."""

import json
import os
import shutil
import stat

import pytest
import torch

from maxmatch_cli import __version__
from maxmatch_cli.evaluation.ensemble import ensemble_checkpoints
from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint
from maxmatch_cli.evaluation.results import EvalResult, write_result
from maxmatch_cli.models.checkpoint import load_checkpoint, save_checkpoint
from maxmatch_cli.fileio import atomic_write, current_umask, file_mode
from maxmatch_cli.config.recipes import Recipe


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------------------------
# Permissions.


def test_current_umask_reads_without_changing(umask_022):
    assert current_umask() == 0o022 and file_mode() == 0o644
    os.umask(0o027)
    assert current_umask() == 0o027 and file_mode() == 0o640
    assert current_umask() == 0o027  # reading it left it as it was


def test_atomic_write_gives_ordinary_permissions(tmp_path, umask_022):
    path = atomic_write(tmp_path / "sub" / "x.txt", lambda tmp: tmp.write_text("x"))
    assert path.read_text() == "x" and mode(path) == 0o644
    os.umask(0o077)
    assert mode(atomic_write(tmp_path / "private.txt", lambda tmp: tmp.write_text("y"))) == 0o600
    assert not list(tmp_path.rglob("*.tmp"))


def test_result_files_are_0644_under_umask_022(ckpt, tmp_path, tiny_h5, umask_022):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    saved = save_checkpoint(tmp_path / "c.safetensors", model, Recipe(), None, {})
    assert mode(saved) == 0o644
    out_json, out_csv = tmp_path / "m.json", tmp_path / "m.csv"
    result = evaluate_checkpoint(ckpt, split="test", json_path=out_json, csv_path=out_csv, show_progress=False)
    cache = result.files[0]
    assert cache.parent == tmp_path / "embeddings"
    for path in (out_json, out_csv, cache):
        assert mode(path) == 0o644, path
    from maxmatch_cli.features.synthetic import generate_synthetic

    store = generate_synthetic(tmp_path / "f.h5", "tiny", progress=False)
    assert mode(store) == 0o644


def test_collapse_outputs_are_0644(ckpt, tmp_path, umask_022):
    from maxmatch_cli.evaluation.collapse import analyze_collapse
    from maxmatch_cli.reporting.collapse import write_collapse_report

    report = write_collapse_report(analyze_collapse(ckpt, split="test", show_progress=False), tmp_path / "collapse")
    assert report.files and all(mode(tmp_path / "collapse" / name) == 0o644 for name in report.files)


# ------------------------------------------------------------------------------------------------------------
# What the JSON records.


def test_evaluate_json_records_its_origin(ckpt, tmp_path, tiny_h5):
    out_json, out_csv = tmp_path / "m.json", tmp_path / "m.csv"
    result = evaluate_checkpoint(ckpt, split="test", json_path=out_json, csv_path=out_csv, show_progress=False)
    report = json.loads(out_json.read_text())
    assert list(report)[:3] == ["protocol", "metrics", "folds"]
    assert report["protocol"] == "full" and report["folds"] == []
    assert report["checkpoint"] == str(ckpt) and report["split"] == "test" and report["data"] == str(tiny_h5)
    assert report["similarity"] == "maxmatch"
    assert (report["n_images"], report["n_captions"]) == (20, 100)  # the tiny test split
    prov = report["provenance"]
    assert prov["checkpoint"] == load_checkpoint(ckpt).provenance and prov["checkpoint"]["package_version"]
    assert prov["maxmatch_version"] == __version__ and prov["date"].endswith("+00:00")
    # Files hold two decimals; the returned metrics are exact.
    assert report["metrics"] == {k: round(v, 2) for k, v in result.metrics.items()}
    assert result.files == [tmp_path / "embeddings" / result.files[0].name, out_json, out_csv]
    head, row = out_csv.read_text().splitlines()
    assert head.split(",")[1:] == list(result.metrics)
    assert row.split(",")[1:] == [f"{v:.2f}" for v in result.metrics.values()]


def test_rounding_only_in_files(tmp_path):
    metrics = {"i2t_r1": 33.33333333, "i2t_medr": 2.0, "i2t_meanr": 3.14159, "rsum": 123.456789}
    result = EvalResult(protocol="coco5k", metrics=dict(metrics), folds=[{"i2t_r1": 66.666666}],
                        folds_mean={"i2t_r1": 12.346}, checkpoint="c", split="test", data="d")
    write_result(result, tmp_path / "r.json", tmp_path / "r.csv")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"] == {"i2t_r1": 33.33, "i2t_medr": 2.0, "i2t_meanr": 3.14, "rsum": 123.46}
    assert report["folds"] == [{"i2t_r1": 66.67}]
    assert report["folds_mean"] == {"i2t_r1": 12.35}
    assert result.metrics == metrics  # untouched
    assert (tmp_path / "r.csv").read_text() == "protocol,i2t_r1,i2t_medr,i2t_meanr,rsum\ncoco5k,33.33,2.00,3.14,123.46\n"


def test_ensemble_json_records_members_and_origin(ckpt, tmp_path, tiny_h5):
    other = shutil.copy(ckpt, tmp_path / "b.safetensors")
    out_json = tmp_path / "e.json"
    result = ensemble_checkpoints([ckpt, other], split="test", json_path=out_json, show_progress=False)
    report = json.loads(out_json.read_text())
    assert list(report)[:3] == ["protocol", "metrics", "folds"]
    assert report["checkpoints"] == [str(ckpt), str(other)] and "checkpoint" not in report
    assert report["split"] == "test" and report["data"] == str(tiny_h5) and report["similarity"] == "maxmatch"
    assert (report["n_images"], report["n_captions"]) == (20, 100)
    assert report["provenance"]["maxmatch_version"] == __version__ and "checkpoint" not in report["provenance"]
    assert report["metrics"] == {k: round(v, 2) for k, v in result.ensemble.metrics.items()}
    for member, path in zip(report["members"], (ckpt, other)):
        assert member["checkpoint"] == str(path) and member["data"] == str(tiny_h5) and member["split"] == "test"
        assert member["provenance"]["checkpoint"] == load_checkpoint(path).provenance
        assert member["metrics"] == report["metrics"]  # identical weights
