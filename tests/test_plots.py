"""Figures: training curves of a run and the collapse heatmaps, written as real PNG and PDF files."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli import app

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
