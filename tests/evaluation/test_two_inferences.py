"""One checkpoint scored with several similarities (§3.4's top-k beside exact MaxMatch): one encoding, each
similarity's metrics as a separate evaluation gives them, and a JSON that stays readable as a single one."""

import json
import shutil

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation import cache as cache_mod
from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint, parse_similarities
from maxmatch_cli.evaluation.protocols import metrics_for
from maxmatch_cli.features.store import open_store
from maxmatch_cli.models.checkpoint import load_checkpoint

# The fixtures tiny_h5, trained and ckpt (a private copy of the tiny checkpoint) live in the conftest files.


def test_parse_similarities_reads_lists_in_order_each_once():
    assert parse_similarities(None) is None and parse_similarities(" , ") is None
    assert parse_similarities("topk") == ["topk"]
    assert parse_similarities(" topk, maxmatch ,topk") == ["topk", "maxmatch"]
    assert parse_similarities(["mil", "topk,chamfer"]) == ["mil", "topk", "chamfer"]


def test_parse_similarities_one_error_for_every_unknown_name():
    with pytest.raises(MaxMatchError) as single:
        parse_similarities("mxmatch")
    assert single.value.message == "unknown similarity 'mxmatch' (did you mean 'maxmatch'?)"  # as a single name was
    with pytest.raises(MaxMatchError) as several:
        parse_similarities("topk,mxmatch,nope")
    message = several.value.message
    assert message == ("unknown similarities 'mxmatch' (did you mean 'maxmatch'?), 'nope' in the similarity list "
                       "'topk,mxmatch,nope'")
    assert "maxmatch, chamfer, mil, topk, sinkhorn" in several.value.hint


def _count_encodings(monkeypatch) -> list[int]:
    calls = []
    real = cache_mod.encode_split

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "encode_split", counting)
    return calls


def _brute_topk(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """§3.4 as read here, pair by pair: mean of exp(c) - 1 over the K largest of the K x K cosines."""
    img = torch.nn.functional.normalize(images.double(), dim=-1)
    cap = torch.nn.functional.normalize(captions.double(), dim=-1)
    out = torch.empty(len(img), len(cap), dtype=torch.float64)
    for i in range(len(img)):
        for j in range(len(cap)):
            c = img[i] @ cap[j].T
            top = sorted(c.flatten().tolist(), reverse=True)[: c.shape[0]]
            out[i, j] = sum(torch.tensor(top, dtype=torch.float64).exp() - 1) / len(top)
    return out


def test_both_inferences_from_one_encoding_equal_separate_evaluations(ckpt, monkeypatch):
    calls = _count_encodings(monkeypatch)
    both = evaluate_checkpoint(ckpt, split="test", similarity="topk,maxmatch", cache=False, show_progress=False)
    assert len(calls) == 1  # encoded once, scored twice
    assert list(both.by_similarity) == ["topk", "maxmatch"]
    assert both is both.by_similarity["topk"] and both.similarity == "topk"
    assert both.metrics != both.by_similarity["maxmatch"].metrics  # two inferences, two sets of numbers
    for name, result in both.by_similarity.items():
        alone = evaluate_checkpoint(ckpt, split="test", similarity=name, cache=False, show_progress=False)
        assert result.similarity == name and result.metrics == alone.metrics and result.folds == alone.folds
        assert alone.by_similarity == {}
    # top-k's numbers are those of an independent pair-by-pair top-K score (k = K, the recipes' reading).
    loaded = load_checkpoint(ckpt)
    emb = cache_mod.checkpoint_embeddings(loaded, open_store(loaded.recipe.data.path), "test", torch.device("cpu"),
                                          cache=False, show_progress=False)
    reference = metrics_for(_brute_topk(emb.images, emb.captions).float(), "full", 5).metrics
    assert both.metrics == pytest.approx(reference)


def test_json_keeps_both_and_stays_a_single_evaluation_for_old_readers(ckpt, tmp_path):
    out_json, out_csv = tmp_path / "both.json", tmp_path / "both.csv"
    both = evaluate_checkpoint(ckpt, split="test", similarity=["maxmatch", "topk"], json_path=out_json,
                               csv_path=out_csv, show_progress=False)
    report = json.loads(out_json.read_text())
    # What a reader of a single evaluation uses is the first similarity's.
    assert list(report)[:3] == ["protocol", "metrics", "folds"] and report["similarity"] == "maxmatch"
    assert report["metrics"] == {k: round(v, 2) for k, v in both.metrics.items()}
    assert list(report["by_similarity"]) == ["maxmatch", "topk"]
    for name, scores in report["by_similarity"].items():
        assert scores == {"metrics": {k: round(v, 2) for k, v in both.by_similarity[name].metrics.items()},
                          "folds": []}
    head, *rows = out_csv.read_text().splitlines()
    assert head.split(",")[:2] == ["protocol", "similarity"] and head.split(",")[2:] == list(both.metrics)
    assert [row.split(",")[:2] for row in rows] == [["full", "maxmatch"], ["full", "topk"]]
    assert rows[1].split(",")[2:] == [f"{v:.2f}" for v in both.by_similarity["topk"].metrics.values()]
    # A single similarity writes what it always wrote: no by_similarity, no similarity column.
    evaluate_checkpoint(ckpt, split="test", json_path=out_json, csv_path=out_csv, show_progress=False)
    assert "by_similarity" not in json.loads(out_json.read_text())
    assert out_csv.read_text().splitlines()[0].split(",")[:2] == ["protocol", "i2t_r1"]


def _run_copy(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "recipe.toml", "metrics.jsonl"):
        shutil.copy2(trained / name, run / name)
    return run


def test_a_run_keeps_each_similarity_as_its_own_evaluation(trained, tmp_path):
    """The demo run trains and scores with maxmatch: its own similarity is kept as RUN/eval/test-full.json (what a
    plain `evaluate` keeps), the other one beside it, each as that similarity alone would write it."""
    run = _run_copy(trained, tmp_path)
    both = evaluate_checkpoint(run, split="test", similarity="topk,maxmatch", show_progress=False, keep_with_run=True)
    own, other = run / "eval" / "test-full.json", run / "eval" / "test-full-topk.json"
    assert sorted((run / "eval").iterdir()) == sorted([own, other]) and both.files[-2:] == [other, own]
    for path, name in ((own, "maxmatch"), (other, "topk")):
        kept = json.loads(path.read_text())
        assert kept["similarity"] == name and "by_similarity" not in kept
        assert kept["metrics"] == {k: round(v, 2) for k, v in both.by_similarity[name].metrics.items()}
    plain = evaluate_checkpoint(run, split="test", show_progress=False, keep_with_run=True)
    assert plain.files == [own] and plain.metrics == both.by_similarity["maxmatch"].metrics


def test_validation_scores_with_the_recipes_test_time_similarity(tiny_h5, tiny_overrides, tmp_path):
    """Per-epoch validation (which picks `best`) uses eval.similarity, as the paper recipes' top-k: its numbers are
    those `evaluate` gives the checkpoint on the dev split with top-k, not with the training similarity."""
    from typer.testing import CliRunner

    from maxmatch_cli.cli.app import app

    out = tmp_path / "run"
    args = ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=2",
            "--set", "train.max_steps=6", *tiny_overrides, "--set", "eval.similarity=topk", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = {k.removeprefix("val/"): v for k, v in records[-1].items() if k.startswith("val/")}
    both = evaluate_checkpoint(out / "last.safetensors", split="dev", protocol="full", similarity="topk,maxmatch",
                               cache=False, show_progress=False)
    assert both.by_similarity["maxmatch"].metrics != both.metrics  # the two inferences are told apart here
    assert validated == pytest.approx(both.metrics)
