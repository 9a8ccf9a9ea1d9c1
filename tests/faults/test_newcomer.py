"""A newcomer's first hour: bad options refused at once, inputs named for what they are, results kept with
their run and labelled by split, progress lines in a log, and copy-paste commands that run.

Each command's bad option must be refused (exit 2, one message) before any model, feature file or result is
loaded: the loaders are replaced by ones that record the call, and the test fails if one was called.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# (module, attribute): everything that loads a model, a feature file, training data or results.
LOADERS = [
    ("maxmatch_cli.models.checkpoint", "load_checkpoint"),
    ("maxmatch_cli.evaluation.evaluate", "load_checkpoint"),
    ("maxmatch_cli.evaluation.ensemble", "load_checkpoint"),
    ("maxmatch_cli.retrieval.api", "load_checkpoint"),
    ("maxmatch_cli.retrieval.api", "load"),
    ("maxmatch_cli.features.store", "open_store"),
    ("maxmatch_cli.training.trainer", "train"),
    ("h5py", "File"),  # any feature file opened or written
    ("maxmatch_cli.features.images", "build_grid_model"),
    ("maxmatch_cli.features.images", "build_detector"),
    ("maxmatch_cli.reporting.compare", "load_results"),
]


def forbid_loading(monkeypatch) -> list[str]:
    """Replace every loader by one that records its call (and fails); returns the list of calls."""
    import importlib

    calls: list[str] = []
    modules = {module: importlib.import_module(module) for module, _ in LOADERS}  # all bound before any patch
    for module, name in LOADERS:
        mod = modules[module]

        def loader(*args, _what=f"{module}.{name}", **kwargs):
            calls.append(_what)
            raise AssertionError(f"{_what} called before the options were checked")

        monkeypatch.setattr(mod, name, loader)
    return calls


@pytest.fixture(scope="module")
def tiny_index(trained, tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("newcomer") / "index"
    result = invoke("index", trained / "best.safetensors", "--data", tiny_h5, "--split", "test", "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


CKPT = "{ckpt}"  # replaced by a file that exists (its content never read: the loaders are replaced)

BAD_OPTIONS = [
    # evaluate
    (["evaluate", CKPT, "--protocol", "bogus"], "unknown protocol 'bogus'"),
    (["evaluate", CKPT, "--similarity", "bogus"], "unknown similarity 'bogus'"),
    (["evaluate", CKPT, "--device", "bogus"], "unknown device 'bogus'"),
    (["evaluate", CKPT, "--data", "{tmp}/missing.h5"], "--data {tmp}/missing.h5 does not exist"),
    (["evaluate", CKPT, "--coco-captions", "{tmp}/c.json"], "--coco-captions"),
    (["evaluate", CKPT, "--protocol", "full", "--coco-captions", CKPT], "eccv and cxc protocols only"),
    # ensemble
    (["ensemble", CKPT, CKPT, "--protocol", "bogus"], "unknown protocol 'bogus'"),
    (["ensemble", CKPT, CKPT, "--similarity", "chamfr"], "unknown similarity 'chamfr' (did you mean 'chamfer'?)"),
    (["ensemble", CKPT, CKPT, "--device", "bogus"], "unknown device 'bogus'"),
    (["ensemble", CKPT, CKPT, "--data", "{tmp}/missing.h5"], "does not exist"),
    (["ensemble", CKPT], "at least two checkpoints"),
    # analyze-collapse
    (["analyze-collapse", CKPT, "--protocol", "bogus"], "unknown protocol 'bogus'"),
    (["analyze-collapse", CKPT, "--protocol", "eccv"], "evaluate` and `ensemble` only"),
    (["analyze-collapse", CKPT, "--similarity", "bogus"], "unknown similarity 'bogus'"),
    (["analyze-collapse", CKPT, "--tsne", "-1"], "--tsne -1 is negative"),
    (["analyze-collapse", CKPT, "--device", "bogus"], "unknown device 'bogus'"),
    (["analyze-collapse", CKPT, "--data", "{tmp}/missing.h5"], "does not exist"),
    # index
    (["index", CKPT, "--out", "{tmp}/idx", "--kind", "bogus"], "unknown index kind 'bogus'"),
    (["index", CKPT, "--out", "{tmp}/idx", "--engine", "bogus"], "bogus"),
    (["index", CKPT, "--out", "{tmp}/idx", "--engine", "faiss", "--nlist", "0"], "nlist"),
    (["index", CKPT, "--out", "{tmp}/idx", "--batch-size", "0"], "batch size must be positive"),
    (["index", CKPT, "--out", "{tmp}/idx", "--shard", "3/2"], "shard"),
    (["index", CKPT, "--out", "{tmp}/idx", "--device", "bogus"], "unknown device 'bogus'"),
    (["index", CKPT, "--out", "{tmp}/idx", "--data", "{tmp}/missing.h5"], "does not exist"),
    # query (a real index; the model is never loaded)
    (["query", "{index}", "--text", "a dog", "-k", "0"], "k must be a positive integer"),
    (["query", "{index}", "--text", "a dog", "--engine", "bogus"], "bogus"),
    (["query", "{index}", "--text", "a dog", "--candidates", "0"], "candidates must be a positive integer"),
    (["query", "{index}", "--text", "a dog", "--nprobe", "-1"], "nprobe must be a positive integer"),
    (["query", "{index}", "--text", "a dog", "--device", "bogus"], "unknown device 'bogus'"),
    (["query", "{index}", "--text", "a dog", "--checkpoint", "{tmp}/gone.safetensors"], "does not exist"),
    (["query", "{index}", "--image", "{tmp}/missing.jpg"], "--image {tmp}/missing.jpg does not exist"),
    (["query", "{index}", "--image-id", "1", "--data", "{tmp}/missing.h5"], "does not exist"),
    (["query", "{index}", "--text", ""], "empty query"),
    (["query", "{index}", "--image-id", "1"], "holds images"),
    # train
    (["train", "--recipe", "bogus", "--out", "{tmp}/run"], "bogus"),
    (["train", "--recipe", "demo", "--set", "optim.lrr=1", "--out", "{tmp}/run"], "did you mean 'optim.lr'?"),
    (["train", "--recipe", "demo", "--set", "loss.similarity=bogus", "--out", "{tmp}/run"], "loss.similarity"),
    # extract-features
    (["extract-features", "synthetic", "bogus", "--out", "{tmp}/f.h5"], "bogus"),
    (["extract-features", "precomp", "{tmp}/missing", "--out", "{tmp}/f.h5"], "missing"),
    (["extract-features", "images", "{tmp}", "--kind", "bogus", "--out", "{tmp}/f.h5"], "unknown --kind 'bogus'"),
    (["extract-features", "tsv", "{tmp}/a.tsv", "--captions", CKPT, "--out", "{tmp}/f.h5"], "a.tsv does not exist"),
    (["extract-features", "tsv", CKPT, "--captions", "{tmp}/missing.json", "--out", "{tmp}/f.h5"], "missing.json"),
    (["extract-features", "images", "{tmp}/nofolder", "--out", "{tmp}/f.h5"], "nofolder"),
    (["extract-features", "images", "{tmp}", "--kind", "grid", "--backbone", "bogus", "--out", "{tmp}/f.h5"],
     "bogus"),
    (["extract-features", "precomp", "{tmp}", "--dataset", "bogus", "--out", "{tmp}/f.h5"], "unknown dataset"),
    # compare
    (["compare", "{tmp}", "--layout", "bogus"], "unknown --layout 'bogus'"),
    (["compare", "{tmp}", "--decimals", "9"], "--decimals 9 is out of range"),
    (["compare", "{tmp}", "--group-by", "bogus"], "unknown --group-by 'bogus'"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a[:1] + a[2:] if a[1] in (CKPT, "{index}")
                                                                        else a)[:60] for a, _ in BAD_OPTIONS])
def test_bad_options_are_refused_before_anything_loads(args, message, tmp_path, request, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"never read")
    index = request.getfixturevalue("tiny_index") if "{index}" in args else None
    fill = {"{ckpt}": str(ckpt), "{tmp}": str(tmp_path), "{index}": str(index)}

    def filled(text):
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    loaded = forbid_loading(monkeypatch)
    result = invoke(*map(filled, args))
    assert not loaded, f"loaded before refusing: {loaded}"
    assert result.exit_code == 2, result.output
    assert filled(message) in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ item 13: named inputs


def test_a_feature_file_passed_as_a_checkpoint_is_named_as_one(tiny_h5):
    result = invoke("evaluate", tiny_h5, "--split", "test")
    assert result.exit_code == 2
    assert "is an HDF5 feature file, not a checkpoint" in result.output and "--data" in result.output
    assert "header too large" not in result.output


def test_a_run_folder_passed_to_query_is_named_as_one(trained):
    result = invoke("query", trained, "--text", "a dog")
    assert result.exit_code == 2
    assert f"{trained} is a training run folder" in result.output and "maxmatch index" in result.output
    assert "interrupted" not in result.output


# ------------------------------------------------------------------------------- item 14: results kept with the run


def test_evaluate_keeps_the_result_with_the_run_and_compare_shows_it(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("eval", "*.json"))  # other tests evaluate it too
    result = invoke("evaluate", run / "best.safetensors", "--split", "test", "--device", "cpu")
    assert result.exit_code == 0, result.output
    kept = run / "eval" / "test-full.json"
    assert f"wrote {kept}" in result.output
    record = json.loads(kept.read_text())
    assert record["split"] == "test" and record["protocol"] == "full"

    from maxmatch_cli.reporting import compare as cmp

    row = cmp.compare_runs([run]).frame.loc[0]
    assert row["source"] == "test/full" and row["rsum_mean"] == record["metrics"]["rsum"]
    shown = invoke("compare", run)
    assert shown.exit_code == 0 and "test/full" in shown.output  # the split is a column, not a guess

    shutil.rmtree(run / "eval")  # no test evaluation: the validation, labelled as such
    row = cmp.compare_runs([run]).frame.loc[0]
    assert row["source"].endswith("/last val")
    assert "last val" in invoke("compare", run).output


def test_row_labels_name_settings_that_change_results(tmp_path, tiny_overrides):
    from maxmatch_cli.config.recipes import load_recipe, to_toml
    from maxmatch_cli.reporting import compare as cmp

    def run(name, **sets):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "recipe.toml").write_text(to_toml(load_recipe("demo", sets)))
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, **{f"val/{k}": 10.0 for k in cmp.METRICS}})
                                              + "\n")
        return folder

    a = run("a", **{"train.report_to": "jsonl,tensorboard", "data.path": "x/features.h5"})
    b = run("b", **{"data.path": "y/features.h5", "data.num_workers": "0"})
    c = run("c", **{"optim.lr": "0.0005", "data.path": "x/features.h5"})
    labels = list(cmp.compare_runs([a, b, c]).frame["label"])
    assert labels[2] == "demo optim.lr=0.0005"
    assert not any("report_to" in label or "num_workers" in label for label in labels)
    # a and b differ only in the data file: that is what tells their rows apart
    assert labels[0] == "demo data.path=x/features.h5" and labels[1] == "demo data.path=y/features.h5"


# ------------------------------------------------------------------------------- item 15: progress lines in a log


def test_long_commands_print_progress_lines_when_output_is_a_log(trained, tiny_h5, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXMATCH_LOG_INTERVAL", "0")  # a line at every step instead of every 10 s
    out = tmp_path / "index"
    result = runner.invoke(app, ["index", str(trained / "best.safetensors"), "--data", str(tiny_h5), "--split",
                                 "test", "--out", str(out), "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "encoding images: started" in result.stderr  # stderr: stdout stays the command's result
    steps = [row for row in result.stderr.splitlines() if row.startswith("encoding images: ") and "/" in row]
    assert len(steps) >= 2 and "(100%)" in steps[-1] and "done in" in steps[-1]

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    result = runner.invoke(app, ["analyze-collapse", str(copy / "best.safetensors"), "--data", str(tiny_h5),
                                 "--split", "test", "--device", "cpu", "--out", str(tmp_path / "collapse")])
    assert result.exit_code == 0, result.output
    scorings = [row for row in result.stderr.splitlines() if row.startswith("scoring (") and "done in" in row]
    assert len(scorings) >= 3  # the full sets and one per slot of the ablation, each announced


def test_query_json_stays_clean_json_with_progress_lines(trained, tiny_h5, tmp_path, monkeypatch):
    monkeypatch.setenv("MAXMATCH_LOG_INTERVAL", "0")
    out = tmp_path / "index"
    assert runner.invoke(app, ["index", str(trained), "--data", str(tiny_h5), "--split", "test", "--out", str(out),
                               "--device", "cpu"]).exit_code == 0
    result = runner.invoke(app, ["query", str(out), "--text", "a dog", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["queries"][0]["results"]


def test_an_evaluation_older_than_the_checkpoint_is_not_the_runs_result(trained, tmp_path):
    import os

    from maxmatch_cli.reporting import compare as cmp

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("eval", "*.json"))
    assert invoke("evaluate", run, "--split", "test", "--device", "cpu").exit_code == 0
    assert cmp.compare_runs([run]).frame.loc[0, "source"] == "test/full"
    best = run / "best.safetensors"  # the run continued (or was replaced) since: a newer best
    later = (run / "eval" / "test-full.json").stat().st_mtime_ns + 10**9
    os.utime(best, ns=(later, later))
    assert cmp.compare_runs([run]).frame.loc[0, "source"].endswith("/last val")
