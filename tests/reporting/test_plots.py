"""Figures: training curves of a run, the collapse heatmaps, Recall@K bars of a comparison and the t-SNE of set
elements (Figure 3), written as real PNG and PDF files; what they draw checked on the figure objects."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

pytest.importorskip("matplotlib")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_training_curves_png_and_pdf(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps and {"step", "lr", "loss/total", "loss/tri"} <= set(steps[0])
    result = invoke("plot", run)
    assert result.exit_code == 0, result.output
    png, pdf = run / "curves.png", run / "curves.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    assert f"wrote {png}" in result.output.replace("\n", "")
    assert png.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_plot_of_a_folder_without_records_is_a_clear_error(tmp_path):
    result = invoke("plot", tmp_path)
    assert result.exit_code == 2 and "holds no steps.jsonl or metrics.jsonl" in result.output
    assert "Traceback" not in result.output


def test_collapse_heatmaps_as_png_and_pdf(trained, tiny_h5, tmp_path):
    out = tmp_path / "collapse"
    result = invoke("analyze-collapse", trained / "best.safetensors", "--data", tiny_h5, "--split", "test",
                    "--out", out, "--no-cache")
    assert result.exit_code == 0, result.output
    assert (out / "heatmaps.png").read_bytes()[:4] == b"\x89PNG" and (out / "heatmaps.pdf").read_bytes()[:4] == b"%PDF"
    assert {"heatmaps.png", "heatmaps.pdf"} <= set(json.loads((out / "collapse.json").read_text())["files"])


def _umask() -> int:
    import os

    old = os.umask(0)
    os.umask(old)
    return old


# ------------------------------------------------------------------------------------------ Recall@K bars


def _results(rows):
    """RunResults of demo_results.json kind: ``rows`` = {name: [i2t R@1 of each seed]}; other recalls follow."""
    from pathlib import Path

    from maxmatch_cli.reporting.compare import RunResult

    out = []
    for name, values in rows.items():
        for seed, v in enumerate(values):
            m = {"i2t_r1": v, "i2t_r5": v + 10, "i2t_r10": v + 20, "t2i_r1": v / 2, "t2i_r5": v / 2 + 10,
                 "t2i_r10": v / 2 + 20}
            m["rsum"] = sum(m.values())
            out.append(RunResult(path=Path("d.json"), file=Path("d.json"), metrics=m, kind="demo", split="test",
                                 protocol="full", name=name, seed=seed, index=len(out)))
    return out


def test_recall_bars_one_bar_per_row_with_std_error_bars():
    from matplotlib.container import BarContainer

    from maxmatch_cli.reporting.compare import compare
    from maxmatch_cli.reporting.plots import recall_bars_figure

    comp = compare(_results({"maxmatch": [40.0, 44.0, 48.0], "chamfer": [30.0]}))
    fig = recall_bars_figure(comp.frame)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["maxmatch (n=3)", "chamfer (n=1)"]
    heights = [[p.get_height() for p in b.patches] for b in bars]
    assert heights[0] == pytest.approx([44, 54, 64, 22, 32, 42])  # the means, in i2t R@1/5/10, t2i R@1/5/10 order
    assert heights[1] == pytest.approx([30, 40, 50, 15, 25, 35])
    # Error bars (sample std 4 and 2) only on the row with several seeds.
    assert bars[0].errorbar is not None and bars[1].errorbar is None
    segments = bars[0].errorbar.lines[2][0].get_segments()
    assert [abs(s[1][1] - s[0][1]) / 2 for s in segments] == pytest.approx([4, 4, 4, 2, 2, 2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["R@1", "R@5", "R@10"] * 2
    assert "test/full" in ax.get_title() and "std" in ax.get_title()
    # Bars of one group sit side by side, groups apart: every i2t bar left of every t2i bar.
    x = [[p.get_x() for p in b.patches] for b in bars]
    assert max(max(row[:3]) for row in x) < min(min(row[3:]) for row in x)
    fig.clf()


def test_recall_bars_from_plain_columns():
    from matplotlib.container import BarContainer

    from maxmatch_cli.reporting.plots import RECALL_GROUPS, recall_bars_figure

    # A dict of lists draws as a DataFrame does: figures need numbers, not the Comparison class.
    frame = {"label": ["a", "b"], "source": ["test/full", "test/full"], "n": [1, 2]}
    for r, (metric, _) in enumerate(RECALL_GROUPS):
        frame[f"{metric}_mean"] = [10.0 + r, 20.0 + r]
        frame[f"{metric}_std"] = [0.0, 1.0]
    fig = recall_bars_figure(frame, title="plain")
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["a (n=1)", "b (n=2)"]
    assert [p.get_height() for p in bars[1].patches] == pytest.approx([20, 21, 22, 23, 24, 25])
    assert bars[0].errorbar is None and bars[1].errorbar is not None and fig.axes[0].get_title() == "plain"
    fig.clf()


def test_heatmaps_and_tsne_figures_from_plain_arrays():
    from maxmatch_cli.reporting.plots import heatmaps_figure, tsne_figure

    raw = np.array([[0.9, 0.1], [0.2, 0.8]])
    fig = heatmaps_figure(raw, raw[:, ::-1], "two panels")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["stored order", "MaxMatch-aligned"]
    assert [im.get_clim() for ax in fig.axes[:2] for im in ax.images] == [(0.1, 0.9)] * 2  # one shared scale
    assert fig.texts[0].get_text() == "two panels"
    fig.clf()
    coords = np.arange(12, dtype=float).reshape(6, 2)
    modality = np.array(["image"] * 2 + ["text"] * 4)
    slot = np.array([0, 1, 0, 1, 0, 1])
    fig = tsne_figure(coords, modality, slot, "points")
    ax = fig.axes[0]
    # One scatter per (modality, element): text first, then image; each holds its own points.
    sizes = [len(c.get_offsets()) for c in ax.collections]
    assert sizes == [2, 2, 1, 1] and ax.get_title() == "points"
    fig.clf()


def test_compare_figure_writes_png_and_pdf(tmp_path):
    runs = [{"config": c, "seed": s, "metrics": {"i2t_r1": v + s, "i2t_r5": 50.0, "i2t_r10": 60.0, "t2i_r1": 20.0,
                                                  "t2i_r5": 40.0, "t2i_r10": 50.0, "rsum": 220.0 + v + s}}
            for c, v in (("maxmatch", 40.0), ("chamfer", 30.0)) for s in range(2)]
    results = tmp_path / "demo_results.json"
    results.write_text(json.dumps({"split": "test", "runs": runs, "commands": {}}))
    for given, stem in (("bars", "bars"), ("named.png", "named")):
        result = invoke("compare", results, "--figure", tmp_path / given)
        assert result.exit_code == 0, result.output
        png, pdf = tmp_path / f"{stem}.png", tmp_path / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
        assert f"wrote {png}\n" in result.output and f"wrote {pdf}\n" in result.output
    assert not (tmp_path / "named.png.png").exists()


def test_compare_figure_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    good = tmp_path / "e.json"
    m = {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 1.0, "t2i_r5": 2.0, "t2i_r10": 3.0, "rsum": 12.0}
    good.write_text(json.dumps({"protocol": "full", "metrics": m, "folds": [], "split": "test"}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke("compare", good, "--figure", tmp_path / "bars", "--csv", tmp_path / "t.csv")
    assert result.exit_code == 2 and "matplotlib" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("bars*")) and not (tmp_path / "t.csv").exists()  # nothing half-done


# ------------------------------------------------------------------------------------------ t-SNE (Figure 3)


def _clustered(n=8, k=3, cpi=5, dim=32, noise=0.05, seed=0):
    """Sets whose element k of an image lies near centre k, element k of a caption near centre K + k."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[: 2 * k] * 3
    images = centres[:k] + noise * torch.randn(n, k, dim, generator=g)
    captions = centres[k:] + noise * torch.randn(n * cpi, k, dim, generator=g)
    return images, captions


def test_tsne_points_count_and_labels():
    from maxmatch_cli.evaluation.collapse import tsne_points

    images, captions = _clustered(n=8, k=3)
    pts = tsne_points(images, captions, n_images=4, captions_per_image=5)
    n_img, n_txt = 4 * 3, 4 * 5 * 3  # N K image points, N cpi K text points
    assert pts.coords.shape == (n_img + n_txt, 2) and np.isfinite(pts.coords).all()
    assert list(pts.modality) == ["image"] * n_img + ["text"] * n_txt
    assert list(pts.slot[:6]) == [0, 1, 2, 0, 1, 2] and list(pts.item[:6]) == [0, 0, 0, 1, 1, 1]
    assert list(pts.item[n_img:][-3:]) == [19, 19, 19]  # the 20 captions of the first 4 images
    assert pts.summary()["points"] == n_img + n_txt and pts.summary()["n_captions"] == 20
    assert tsne_points(images, captions, n_images=100).n_images == 8  # at most the split


def test_tsne_is_deterministic_for_a_seed():
    from maxmatch_cli.evaluation.collapse import tsne_points

    images, captions = _clustered(n=5, k=2, noise=0.5)
    a = tsne_points(images, captions, 5, random_state=3)
    b = tsne_points(images, captions, 5, random_state=3)
    assert np.array_equal(a.coords, b.coords) and a.kl_divergence == b.kl_divergence


def test_tsne_separates_clusters_by_element_and_modality():
    from maxmatch_cli.evaluation.collapse import tsne_points

    images, captions = _clustered(n=10, k=3, noise=0.05)
    pts = tsne_points(images, captions, 10)
    group = pts.slot + np.where(pts.modality == "text", 3, 0)  # 6 clusters
    centres = np.stack([pts.coords[group == g].mean(0) for g in range(6)])
    nearest = np.linalg.norm(pts.coords[:, None] - centres[None], axis=-1).argmin(1)
    assert (nearest == group).all()
    spread = max(np.linalg.norm(pts.coords[group == g] - centres[g], axis=1).max() for g in range(6))
    gap = min(np.linalg.norm(centres[i] - centres[j]) for i in range(6) for j in range(i + 1, 6))
    assert gap > 2 * spread


def test_tsne_needs_an_image():
    from maxmatch_cli.evaluation.collapse import tsne_points
    from maxmatch_cli.errors import MaxMatchError

    images, captions = _clustered()
    with pytest.raises(MaxMatchError, match="at least one image"):
        tsne_points(images, captions, 0)


def test_analyze_collapse_tsne_files_and_figure(trained, tmp_path, monkeypatch):
    from maxmatch_cli.reporting import plots

    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "m.safetensors")
    figures = {}
    real = plots.save_figure

    def keep(fig, stem):
        figures[stem.name] = (fig.texts[0].get_text() if fig.texts else "", fig.axes[0].get_title(),
                              [im.get_clim() for ax in fig.axes for im in ax.images])
        return real(fig, stem)

    monkeypatch.setattr(plots, "save_figure", keep)
    out = tmp_path / "collapse"
    result = invoke("analyze-collapse", ckpt, "--split", "test", "--out", out, "--tsne", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "collapse.json").read_text())
    k = report["K"]
    assert report["tsne"]["points"] == 3 * k + 3 * 5 * k and report["tsne"]["random_state"] == 0
    rows = (out / "tsne.csv").read_text().splitlines()
    assert rows[0] == "modality,item,element,x,y" and len(rows) == 1 + 3 * k * 6
    assert sum(r.startswith("image,") for r in rows) == 3 * k
    for name in ("tsne.csv", "tsne.png", "tsne.pdf"):
        assert name in report["files"] and f"wrote {out / name}" in result.output.replace("\n", "")
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    title = figures["tsne"][1]
    assert "m.safetensors" in title and "split test" in title and "3 images" in title
    # Heatmaps (Figure 4): checkpoint and split in the title, one colour scale fitted to the values.
    suptitle, _, clims = figures["heatmaps"]
    assert "m.safetensors" in suptitle and "split test" in suptitle
    values = [v for name in ("raw", "aligned") for row in report["heatmaps"][name] for v in row]
    assert clims == [pytest.approx((min(values), max(values)))] * 2


def test_tsne_csv_one_row_a_point():
    from maxmatch_cli.evaluation.collapse import tsne_points
    from maxmatch_cli.reporting.collapse import tsne_csv

    images, captions = _clustered(n=2, k=2)
    pts = tsne_points(images, captions, 2)
    rows = tsne_csv(pts).splitlines()
    assert rows[0] == "modality,item,element,x,y" and len(rows) == 1 + len(pts.coords)
    x, y = pts.coords[0]
    assert rows[1] == f"image,0,1,{x:.6f},{y:.6f}" and rows[-1].startswith("text,9,2,")


def test_analyze_collapse_without_tsne_writes_none(trained, tmp_path):
    ckpt = shutil.copy(trained / "best.safetensors", tmp_path / "m.safetensors")
    result = invoke("analyze-collapse", ckpt, "--split", "test", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "c" / "tsne.csv").exists()
    assert json.loads((tmp_path / "c" / "collapse.json").read_text())["tsne"] == {}
    result = invoke("analyze-collapse", ckpt, "--split", "test", "--out", tmp_path / "d", "--tsne", -1)
    assert result.exit_code == 2 and "--tsne -1" in result.output and "Traceback" not in result.output
