"""The embedding cache: written once per checkpoint, feature file and split, read back bit for bit, invalidated
when the checkpoint changes."""

import os

import pytest
import torch

from maxmatch_cli.evaluation import cache
from maxmatch_cli.evaluation.cache import checkpoint_embeddings, embeddings_cache_path
from maxmatch_cli.features.store import open_store
from maxmatch_cli.models.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def test_embeddings_are_cached_and_invalidated(ckpt, monkeypatch):
    loaded = load_checkpoint(ckpt)
    store = open_store(loaded.recipe.data.path)
    fresh = checkpoint_embeddings(loaded, store, "test", CPU, show_progress=False)
    path = embeddings_cache_path(loaded, store, "test")
    assert path.is_file() and path.parent == ckpt.parent / "embeddings"

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded again although the cache is valid")

    monkeypatch.setattr(cache, "load_for_eval", must_not_encode)  # where checkpoint_embeddings looks it up
    cached = checkpoint_embeddings(loaded, store, "test", CPU, show_progress=False)
    assert torch.equal(cached.images, fresh.images) and torch.equal(cached.captions, fresh.captions)
    assert (cached.caption_indices == fresh.caption_indices).all()
    # A rewritten checkpoint (new mtime) is re-encoded.
    stat = os.stat(ckpt)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="encoded again"):
        checkpoint_embeddings(loaded, store, "test", CPU, show_progress=False)
    # So is every split, and nothing is cached with cache=False.
    monkeypatch.undo()
    checkpoint_embeddings(loaded, store, "dev", CPU, show_progress=False, cache=False)
    assert not embeddings_cache_path(loaded, store, "dev").exists()
