"""`maxmatch extract-features` sources and `maxmatch features info/merge` through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.features.store import StoreWriter, open_store, partial_path

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MAXMATCH_NO_PROGRESS", "1")


def _precomp(folder):
    folder.mkdir()
    feats = np.random.default_rng(0).random((3, 4, 8), dtype=np.float32)
    np.save(folder / "test_ims.npy", feats)
    (folder / "test_caps.txt").write_text("".join(f"image {i} caption {k}\n" for i in range(3) for k in range(5)))
    return feats


def test_precomp_through_cli_and_rerun(tmp_path):
    _precomp(tmp_path / "f30k_precomp")
    out = tmp_path / "f.h5"
    args = ["extract-features", "--from-precomp", str(tmp_path / "f30k_precomp"), "--dataset", "f30k", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scan-precomp:f30k" in result.output and open_store(out).split("test")[0].tolist() == [0, 1, 2]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already complete" in _text(again)


def test_source_errors(tmp_path):
    result = runner.invoke(app, ["extract-features", "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "exactly one source" in _text(result)
    result = runner.invoke(app, ["extract-features", "--synthetic", "tiny", "--from-precomp", str(tmp_path),
                                 "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "--synthetic, --from-precomp" in _text(result)
    # --images without --captions indexes a gallery; a folder with no image files is the error.
    result = runner.invoke(app, ["extract-features", "--images", str(tmp_path), "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and f"no image files under {tmp_path}" in _text(result)
    result = runner.invoke(app, ["extract-features", "--from-precomp", str(tmp_path / "missing"),
                                 "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "does not exist" in _text(result) and "Traceback" not in result.output


def test_info_shows_unfinished_files(tmp_path):
    out = tmp_path / "p.h5"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(out, feature_kind="grid", source="t", feature_dim=8, regions_per_image=4, n_images=5) as w:
            w.write_images(np.ones((2, 4, 8), np.float32))
            raise KeyboardInterrupt
    assert partial_path(out).exists()
    result = runner.invoke(app, ["features", "info", str(out)])
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "False" in result.output and "images_written" in result.output


def test_merge_command(tmp_path):
    paths = []
    for k in range(2):
        path = tmp_path / f"s{k}.h5"
        with StoreWriter(path, feature_kind="grid", source="t", feature_dim=8, regions_per_image=4) as w:
            w.write_images(np.full((2, 4, 8), k, np.float32), ids=[10 * k, 10 * k + 1])
        paths.append(str(path))
    result = runner.invoke(app, ["features", "merge", *paths, "--out", str(tmp_path / "m.h5"), "--keep-shards"])
    assert result.exit_code == 0, result.output
    assert open_store(tmp_path / "m.h5").image_ids.tolist() == [0, 1, 10, 11]


# ------------------------------------------------------------------------------------------------------------
# One subcommand per source; the earlier spelling (--synthetic, --from-precomp, ...) makes the same call.


def test_synthetic_subcommand_equals_the_earlier_spelling(tmp_path):
    new, old = tmp_path / "new.h5", tmp_path / "old.h5"
    result = runner.invoke(app, ["extract-features", "synthetic", "tiny", "--seed", "3", "--out", str(new)])
    assert result.exit_code == 0, result.output
    assert f"wrote {new}" in result.output
    result = runner.invoke(app, ["extract-features", "--synthetic", "tiny", "--seed", "3", "--out", str(old)])
    assert result.exit_code == 0, result.output
    a, b = open_store(new), open_store(old)
    for split in ("train", "test"):
        assert np.array_equal(a.split(split)[0], b.split(split)[0])
    assert all(np.array_equal(a.image_features(i), b.image_features(i)) for i in range(4))
    assert a.captions_text(range(10)) == b.captions_text(range(10))


def test_precomp_subcommand_and_rerun(tmp_path):
    _precomp(tmp_path / "f30k_precomp")
    out = tmp_path / "f.h5"
    args = ["extract-features", "precomp", str(tmp_path / "f30k_precomp"), "--dataset", "f30k", "--split", "test",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scan-precomp:f30k" in result.output and open_store(out).split("test")[0].tolist() == [0, 1, 2]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already complete" in _text(again)


def test_subcommand_errors(tmp_path):
    out = str(tmp_path / "o.h5")
    result = runner.invoke(app, ["extract-features", "tsv", str(tmp_path / "a.tsv"), "--out", out])
    assert result.exit_code == 2 and "--captions" in _text(result)  # required by the tsv source
    result = runner.invoke(app, ["extract-features", "images", str(tmp_path), "--out", out])
    assert result.exit_code == 2 and f"no image files under {tmp_path}" in _text(result)
    result = runner.invoke(app, ["extract-features", "precomp", str(tmp_path / "missing"), "--out", out])
    assert result.exit_code == 2 and "does not exist" in _text(result) and "Traceback" not in result.output
    # Options of a source belong after its name; before it they are refused with the right spelling.
    result = runner.invoke(app, ["extract-features", "--out", out, "synthetic", "tiny"])
    assert result.exit_code == 2 and "give a source's options after it" in _text(result)
    assert not (tmp_path / "o.h5").exists()
    # The earlier spelling still needs --out, as it always did.
    result = runner.invoke(app, ["extract-features", "--synthetic", "tiny"])
    assert result.exit_code == 2 and "Missing option '--out'" in _text(result)


def test_bare_extract_features_shows_the_sources():
    result = runner.invoke(app, ["extract-features"])
    for source in ("synthetic", "precomp", "tsv", "images"):
        assert source in result.output
