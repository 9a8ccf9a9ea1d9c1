"""Set-collapse analyses (paper §4.4, Table 4, Figure 4, §4.5) on hand-built embeddings and the tiny checkpoint."""

import itertools
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from maxmatch_cli.evaluation import collapse
from maxmatch_cli.cli.app import app
from maxmatch_cli.evaluation.collapse import circular_variance, pair_heatmaps, slot_ablation, slot_retrieval, variance_summary
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.reporting.collapse import write_collapse_report

CPI = 5


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def slot0_signal(n=20, k=4, dim=128, seed=0):
    """Image and caption sets where only element 0 carries the pairing; the other elements are unrelated noise."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, dim, generator=g)
    images = torch.randn(n, k, dim, generator=g)
    captions = torch.randn(n * CPI, k, dim, generator=g)
    images[:, 0] = signal + 0.1 * torch.randn(n, dim, generator=g)
    captions[:, 0] = signal.repeat_interleave(CPI, 0) + 0.1 * torch.randn(n * CPI, dim, generator=g)
    return images, captions


@pytest.mark.parametrize("kind", ["maxmatch", "chamfer"])
def test_slot_ablation_finds_the_informative_slot(kind):
    images, captions = slot0_signal()
    result = slot_ablation(images, captions, kind, "full", CPI)
    assert result["full"]["rsum"] == pytest.approx(600.0)
    for side in ("image", "text"):
        rows = result[side]
        assert [r["slot"] for r in rows] == [1, 2, 3, 4]
        assert rows[0]["rsum"] > 590  # element 0 alone retrieves as well as the whole set
        assert all(r["rsum"] < 350 for r in rows[1:])  # chance is about 150 here


def test_slot_ablation_uses_the_reduced_sets():
    from maxmatch_cli.evaluation.metrics import retrieval_metrics
    from maxmatch_cli.method.similarity import set_similarity

    g = torch.Generator().manual_seed(3)
    images, captions = torch.randn(6, 3, 8, generator=g), torch.randn(30, 3, 8, generator=g)
    result = slot_ablation(images, captions, "maxmatch", "full", CPI)
    for k in range(3):
        expected = retrieval_metrics(set_similarity(images, captions[:, k: k + 1]), CPI)
        assert result["text"][k]["rsum"] == pytest.approx(expected["rsum"])
        expected = retrieval_metrics(set_similarity(images[:, k: k + 1], captions), CPI)
        assert result["image"][k]["i2t_r1"] == pytest.approx(expected["i2t_r1"])


def test_heatmaps_match_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    n, cpi, k = 4, 3, 3
    images, captions = torch.randn(n, k, 8, generator=g), torch.randn(n * cpi, k, 8, generator=g)
    raw = torch.zeros(k, k, dtype=torch.float64)
    aligned = torch.zeros_like(raw)
    for i in range(n):
        for j in range(i * cpi, (i + 1) * cpi):
            c = F.normalize(images[i], dim=-1) @ F.normalize(captions[j], dim=-1).T
            raw += c
            best = max(itertools.permutations(range(k)), key=lambda p: sum(c[r, p[r]] for r in range(k)))
            aligned += c[:, list(best)]  # column m holds the text element matched to image element m
    out = pair_heatmaps(images, captions, cpi, block_size=3)  # uneven blocks
    torch.testing.assert_close(out["raw"], raw / (n * cpi))
    torch.testing.assert_close(out["aligned"], aligned / (n * cpi))
    # the aligned diagonal holds the best matching, so its mean is at least the raw diagonal's
    assert out["aligned"].diagonal().sum() >= out["raw"].diagonal().sum() - 1e-9


def test_heatmap_separates_the_matched_slot():
    images, captions = slot0_signal()
    maps = pair_heatmaps(images, captions, CPI)
    assert maps["raw"][0, 0] > 0.9 and maps["raw"][1:, 1:].abs().max() < 0.1
    with pytest.raises(MaxMatchError, match="do not fit"):
        pair_heatmaps(images, captions[:-1], CPI)


def brute_force_top1(queries, gallery):
    q, g = F.normalize(queries, dim=-1), F.normalize(gallery, dim=-1)
    return torch.tensor([[max(range(len(g)), key=lambda j: float((g[j] @ q[i, k]).max()))
                          for k in range(q.shape[1])] for i in range(q.shape[0])])


def test_slot_retrieval_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(2)
    images, captions = torch.randn(5, 3, 16, generator=g), torch.randn(25, 3, 16, generator=g)
    result = slot_retrieval(images, captions, CPI, block_size=2)
    i2t = brute_force_top1(images, captions)
    t2i = brute_force_top1(captions, images)
    owner = torch.arange(5).unsqueeze(1)
    assert result["i2t"]["r1"] == pytest.approx((100.0 * (i2t // CPI == owner).double().mean(0)).tolist())
    assert result["t2i"]["r1"] == pytest.approx(
        (100.0 * (t2i == torch.arange(25).unsqueeze(1) // CPI).double().mean(0)).tolist())
    assert result["i2t"]["distinct"] == pytest.approx(sum(len(set(r)) for r in i2t.tolist()) / 5)
    assert result["t2i"]["distinct"] == pytest.approx(sum(len(set(r)) for r in t2i.tolist()) / 25)


def test_slot_retrieval_diversity_extremes():
    g = torch.Generator().manual_seed(4)
    n, k, cpi = 3, 4, 4
    captions = torch.randn(n * cpi, k, 64, generator=g)
    # Each image element copies element 0 of another of its own captions: K elements, K different captions.
    diverse = captions[:, 0].reshape(n, cpi, 64).clone()
    result = slot_retrieval(diverse, captions, cpi)
    assert result["i2t"]["r1"] == [100.0] * k and result["i2t"]["r1_any"] == 100.0
    assert result["i2t"]["distinct"] == k and result["i2t"]["distinct_images"] == 1
    # A collapsed set: every element is the same vector, so all retrieve the same item.
    collapsed = diverse[:, :1].expand(n, k, 64).contiguous()
    assert slot_retrieval(collapsed, captions, cpi)["i2t"]["distinct"] == 1


def test_variance_summary():
    sets = torch.randn(7, 4, 16, generator=torch.Generator().manual_seed(5))
    summary = variance_summary(sets)
    cv = circular_variance(sets)
    assert summary["mean"] == pytest.approx(float(cv.mean()))
    assert summary["log_mean"] == pytest.approx(math.log(float(cv.mean())))
    same = torch.zeros(3, 4, 8)
    same[..., 0] = 2.0  # every element along one axis: exactly collapsed
    assert variance_summary(same)["mean"] == 0 and variance_summary(same)["log_mean"] is None  # log(0) -> None


@pytest.fixture
def ckpt(trained, tmp_path):
    """A private copy of the tiny checkpoint, so caches and reports land in tmp_path."""
    return shutil.copy(trained / "best.safetensors", tmp_path / "m.safetensors")


def test_analyze_collapse_cli_report(ckpt, tmp_path):
    from maxmatch_cli.models.checkpoint import load_checkpoint
    from maxmatch_cli.evaluation.cache import checkpoint_embeddings
    from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint
    from maxmatch_cli.features.store import open_store

    out = tmp_path / "analysis"
    result = invoke("analyze-collapse", ckpt, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    for text in ("Circular variance", "Per-slot ablation", "S^V(1) only", "Pair heatmap", "Per-element retrieval"):
        assert text in result.output
    report = json.loads((out / "collapse.json").read_text())
    for name in ("circular_variance.csv", "slot_ablation.csv", "heatmap_raw.csv", "heatmap_aligned.csv",
                 "slot_retrieval.csv", "collapse.json"):
        assert (out / name).is_file() and name in report["files"]
    # The report's numbers are those of the library functions on the same embeddings.
    loaded = load_checkpoint(ckpt)
    emb = checkpoint_embeddings(loaded, open_store(loaded.recipe.data.path), "test", torch.device("cpu"),
                                show_progress=False)
    for name, sets in (("image", emb.images), ("text", emb.captions)):
        mean = float(circular_variance(sets).double().mean())
        assert report["variance"][name]["mean"] == pytest.approx(mean)
        assert report["variance"][name]["log_mean"] == pytest.approx(math.log(mean))
    assert report["K"] == emb.images.shape[1] == len(report["ablation"]["image"]) == len(report["heatmaps"]["raw"])
    full = evaluate_checkpoint(ckpt, split="test", show_progress=False).metrics
    assert report["ablation"]["full"] == pytest.approx(full)
    lines = (out / "slot_ablation.csv").read_text().splitlines()
    assert lines[0].startswith("set,slot,i2t_r1") and len(lines) == 1 + 1 + 2 * report["K"]
    assert (out / "heatmap_raw.csv").read_text().splitlines()[0] == ",text1,text2,text3,text4"
    if "heatmaps.png" not in report["files"]:
        assert any("matplotlib" in note for note in report["notes"])


def test_png_is_skipped_with_a_note_without_matplotlib(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = write_collapse_report(collapse.analyze_collapse(ckpt, split="test", show_progress=False), tmp_path / "a")
    assert "heatmaps.png" not in report.files and not (tmp_path / "a" / "heatmaps.png").exists()
    assert any("matplotlib is not installed" in note for note in report.notes)


def test_default_output_folder_is_next_to_the_checkpoint(ckpt):
    report = collapse.analyze_collapse(ckpt, split="test", show_progress=False)
    # Computing writes no report (only the embedding cache); writing it is the reporting stage's job.
    assert report.files == [] and report.out_dir == "" and not (ckpt.parent / "collapse-m-test").exists()
    assert write_collapse_report(report) is report
    assert (ckpt.parent / "collapse-m-test" / "collapse.json").is_file()
    assert report.out_dir == str(ckpt.parent / "collapse-m-test")


def test_analyze_collapse_bad_input(ckpt, tmp_path):
    from maxmatch_cli.features.synthetic import generate_synthetic

    result = invoke("analyze-collapse", "/nonexistent/m.safetensors")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("analyze-collapse", ckpt, "--split", "nosplit", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "nosplit" in result.output
    wide = generate_synthetic(tmp_path / "dim64.h5", "tiny", feature_dim=64, progress=False)
    result = invoke("analyze-collapse", ckpt, "--data", wide, "--split", "test", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "64-dimensional" in " ".join(result.output.split())
    assert "Traceback" not in result.output
