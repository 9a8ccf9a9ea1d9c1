"""Writing a set-collapse report (maxmatch_cli.reporting.collapse): files, their permissions, the default folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from maxmatch_cli.evaluation.collapse import analyze_collapse
from maxmatch_cli.reporting.collapse import default_out_dir, write_collapse_report


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    """The collapse analysis of a private copy of the tiny checkpoint, computed once (nothing written yet)."""
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = shutil.copy(trained / "best.safetensors", folder / "m.safetensors")
    return analyze_collapse(ckpt, split="test", show_progress=False, tsne=2)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_report_files_are_0644_under_umask_022(report, tmp_path, umask_022):
    write_collapse_report(report, tmp_path / "collapse")
    assert report.files
    for name in report.files:
        assert stat.S_IMODE((tmp_path / "collapse" / name).stat().st_mode) == 0o644, name


def test_written_files_and_json(report, tmp_path):
    out = tmp_path / "c"
    assert write_collapse_report(report, out) is report and report.out_dir == str(out)
    assert report.files[:5] == ["circular_variance.csv", "slot_ablation.csv", "heatmap_raw.csv",
                                "heatmap_aligned.csv", "slot_retrieval.csv"]
    assert "tsne.csv" in report.files and report.files[-1] == "collapse.json"
    assert sorted(p.name for p in out.iterdir()) == sorted(report.files)
    saved = json.loads((out / "collapse.json").read_text())
    # collapse.json holds the report, not the cache files or the t-SNE's raw points (those are tsne.csv).
    assert "points" not in saved and "cache_files" not in saved
    assert saved["files"] == report.files and saved["tsne"]["points"] == len(report.points.coords)


def test_default_folder_is_next_to_the_checkpoint(report):
    assert default_out_dir(report) == Path(report.checkpoint).parent / "collapse-m-test"
