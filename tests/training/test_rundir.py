"""prepare_run_dir: which files make a run, what --overwrite removes, what stays."""

import pytest

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.training.rundir import existing_run_files, prepare_run_dir


def test_new_or_missing_folder_is_fine(tmp_path):
    assert prepare_run_dir(tmp_path / "new") == [] and not (tmp_path / "new").exists()
    assert prepare_run_dir(tmp_path) == []


def _cache(path, checkpoint):
    """An embeddings cache file as `evaluate` writes it, encoded from ``checkpoint``."""
    import json

    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    key = {"format": "maxmatch-embeddings", "checkpoint": str(checkpoint.resolve())}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"key": json.dumps(key)})


def test_overwrite_removes_exactly_the_run_files(tmp_path):
    run = ["best.safetensors", "last.safetensors", "metrics.jsonl", "recipe.toml"]
    caches = ["embeddings/best.test.0123456789ab.safetensors", "embeddings/last.dev.0123456789ab.safetensors"]
    # A user's file and another run's cache that match the cache pattern are not this run's.
    keep = ["notes.txt", "best.safetensors.bak", "embeddings/other.test.0123456789ab.safetensors", "sub/recipe.toml",
            "embeddings/best.mine.safetensors"]
    for name in run + keep:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    for name in caches:
        _cache(tmp_path / name, tmp_path / f"{name.split('/')[1].split('.')[0]}.safetensors")
    _cache(tmp_path / "embeddings/last.test.ba9876543210.safetensors", tmp_path / "elsewhere" / "last.safetensors")
    keep.append("embeddings/last.test.ba9876543210.safetensors")
    run += caches
    assert sorted(existing_run_files(tmp_path)) == sorted(tmp_path / n for n in run)
    with pytest.raises(MaxMatchError, match="already holds a training run") as info:
        prepare_run_dir(tmp_path)
    assert info.value.hint.startswith("use --resume to continue it or --overwrite to replace it")
    assert all((tmp_path / n).exists() for n in run)
    assert sorted(prepare_run_dir(tmp_path, overwrite=True)) == sorted(tmp_path / n for n in run)
    assert not any((tmp_path / n).exists() for n in run)
    assert all((tmp_path / n).exists() for n in keep)
    assert all((tmp_path / n).read_text() == n for n in keep if not n.startswith("embeddings/last.test"))


def test_empty_cache_folder_removed_with_the_run(tmp_path):
    _cache(tmp_path / "embeddings" / "best.test.0123456789ab.safetensors", tmp_path / "best.safetensors")
    prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "embeddings").exists()


def test_resume_overwrite_and_file(tmp_path, monkeypatch):
    (tmp_path / "last.safetensors").write_text("x")
    assert prepare_run_dir(tmp_path, resume=True) == [] and (tmp_path / "last.safetensors").exists()
    with pytest.raises(MaxMatchError, match="--resume and --overwrite"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    with pytest.raises(MaxMatchError, match="is a file"):
        prepare_run_dir(tmp_path / "last.safetensors")
    # Under torchrun only rank 0 looks (and removes): the others would race with its writes.
    monkeypatch.setenv("RANK", "1")
    assert prepare_run_dir(tmp_path) == [] and prepare_run_dir(tmp_path, overwrite=True) == []
    assert (tmp_path / "last.safetensors").exists()
