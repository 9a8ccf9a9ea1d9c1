"""`maxmatch evaluate --similarity topk,maxmatch`: both inferences in one table, kept with the run, and one clear
error for a name that is no similarity."""

import json
import shutil

from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_reports_both_inferences_in_one_table(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "recipe.toml", "metrics.jsonl"):
        shutil.copy2(trained / name, run / name)
    out = tmp_path / "both.json"
    result = invoke("evaluate", run, "--split", "test", "--similarity", "topk,maxmatch", "--json", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Recall@K (%) · similarities topk, maxmatch" in text
    assert text.index("topk · full (20 images)") < text.index("maxmatch · full (20 images)")
    report = json.loads(out.read_text())
    assert report["similarity"] == "topk" and list(report["by_similarity"]) == ["topk", "maxmatch"]
    rsums = {name: f"{scores['metrics']['rsum']:.2f}" for name, scores in report["by_similarity"].items()}
    for name, rsum in rsums.items():  # each row group shows its own similarity's numbers
        row = text[text.index(f"{name} · full"):].split("│")[7]
        assert row.strip() == rsum
    # `compare RUN` finds the run's own evaluation among the two kept (the demo's own similarity is maxmatch).
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["test-full-topk.json", "test-full.json"]
    result = invoke("compare", run)
    assert result.exit_code == 0, result.output
    assert f"{report['by_similarity']['maxmatch']['metrics']['rsum']:.1f}" in result.output
    assert f"{report['by_similarity']['topk']['metrics']['rsum']:.1f}" not in result.output
    # `compare both.json` shows a row per similarity: the recipe's own (maxmatch) as before, topk as a rescoring.
    result = invoke("compare", out)
    assert result.exit_code == 0, result.output
    rows = {ln.split("│")[1].strip(): ln for ln in result.output.splitlines() if ln.count("│") > 5 and "demo" in ln}
    assert sorted(rows) == ["demo", "demo (scored with topk)"]
    for label, name in (("demo", "maxmatch"), ("demo (scored with topk)", "topk")):
        assert f"{report['by_similarity'][name]['metrics']['rsum']:.1f}" in rows[label]


def test_unknown_names_in_the_list_are_one_error_before_any_encoding(trained, monkeypatch):
    from maxmatch_cli.evaluation import evaluate as ev

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded before the similarities were checked")

    monkeypatch.setattr(ev, "checkpoint_embeddings", must_not_encode)
    result = invoke("evaluate", trained, "--split", "test", "--similarity", "topk,mxmatch,chamfr")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert ("unknown similarities 'mxmatch' (did you mean 'maxmatch'?), 'chamfr' (did you mean 'chamfer'?) in "
            "the similarity list 'topk,mxmatch,chamfr'") in message
    assert "Traceback" not in result.output and message.count("error:") == 1


def test_help_shows_the_list_form():
    result = invoke("evaluate", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--similarity topk,maxmatch" in text and "NAME,..." in text
