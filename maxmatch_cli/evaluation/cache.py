"""The embedding cache: a split's set embeddings under a checkpoint, encoded once and then read back.

Embeddings are cached per (checkpoint, feature file, split) in a safetensors file under ``embeddings/`` next to the
checkpoint (:func:`embeddings_cache_path`); the file's key holds the checkpoint's size and mtime, the feature
file's fingerprint, the split and the package version, so a retrained checkpoint or a changed feature file is
re-encoded (:func:`checkpoint_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maxmatch_cli.data.datasets import split_layout
from maxmatch_cli.data.images import build_image_source
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.encoding import Embeddings, check_features, encode_split, load_for_eval
from maxmatch_cli.fileio import atomic_write
from maxmatch_cli.models.checkpoint import Checkpoint

EMBEDDINGS_FORMAT = "maxmatch-embeddings"


def _cache_key(ckpt: Checkpoint, store, split: str) -> dict[str, Any]:
    """Everything the cached embeddings depend on; a cache file whose key differs is stale."""
    from maxmatch_cli import __version__

    stat = Path(ckpt.path).stat()
    return {"format": EMBEDDINGS_FORMAT, "package_version": __version__, "checkpoint": str(Path(ckpt.path).resolve()),
            "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "data_fingerprint": store.fingerprint(), "split": split,
            "captions_per_image": ckpt.recipe.data.captions_per_image, "max_len": ckpt.recipe.data.max_caption_len}


def embeddings_cache_path(ckpt: Checkpoint, store, split: str, cache_dir: Path | None = None) -> Path:
    """``<checkpoint folder>/embeddings/<stem>.<split>.<hash>.safetensors`` (or under ``cache_dir``).

    The name depends on the checkpoint path, feature file and split only, so a retrained checkpoint overwrites
    its stale cache instead of adding one.
    """
    ident = json.dumps([str(Path(ckpt.path).resolve()), store.fingerprint(), split])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe_split = re.sub(r"[^A-Za-z0-9_-]", "_", split)
    folder = Path(cache_dir) if cache_dir is not None else Path(ckpt.path).parent / "embeddings"
    return folder / f"{Path(ckpt.path).stem}.{safe_split}.{digest}.safetensors"


def stored_key(path: Path) -> dict[str, Any] | None:
    """The key a cache file was written with; None for a missing, truncated or foreign file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            key = json.loads((fh.metadata() or {}).get("key", "null"))
    except Exception:  # not a safetensors file, or a key that is no JSON
        return None
    return key if isinstance(key, dict) and key.get("format") == EMBEDDINGS_FORMAT else None


def _read_cache(path: Path, key: dict[str, Any]) -> Embeddings | None:
    from safetensors.torch import load_file

    if stored_key(path) != key:
        return None
    try:
        t = load_file(str(path))
        return Embeddings(t["images"], t["captions"], t["image_indices"].numpy(), t["caption_indices"].numpy())
    except Exception:  # a missing, truncated or foreign file is simply re-encoded
        return None


def _write_cache(path: Path, key: dict[str, Any], emb: Embeddings) -> bool:
    from safetensors.torch import save_file

    tensors = {"images": emb.images.contiguous(), "captions": emb.captions.contiguous(),
               "image_indices": torch.from_numpy(np.asarray(emb.image_indices, dtype=np.int64)),
               "caption_indices": torch.from_numpy(np.asarray(emb.caption_indices, dtype=np.int64))}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)}))
    except (MaxMatchError, OSError):
        return False  # a read-only checkpoint folder or a full disk only costs the re-encoding next time
    return True


def _training_in(ckpt: Checkpoint) -> bool:
    """Warn when another process is training into the checkpoint's folder (its lock, :mod:`maxmatch_cli.locks`).

    Evaluating a run while it trains is allowed (to follow it), and checkpoints are replaced whole, so the file read
    is a complete one; but it is a snapshot the run may replace at its next epoch, and neither the embedding cache
    nor the result kept with the run (:func:`~maxmatch_cli.evaluation.results.run_evaluation_path`) is written into
    a folder another process writes.
    """
    from maxmatch_cli.locks import live_holder, lock_inside
    from maxmatch_cli.progress import console
    from rich.markup import escape

    folder = Path(ckpt.path).parent
    holder = live_holder(lock_inside(folder))
    if holder is None:
        return False
    state = ckpt.train_state or {}
    when = (f"as saved after epoch {state['epoch']} (step {state.get('global_step', '?')})" if "epoch" in state
            else "as it is now")
    console.print(f"[yellow]warning:[/] {escape(str(folder))} is being written by a training run in progress "
                  f"({escape(holder.describe())}): {escape(Path(ckpt.path).name)} is scored {when}, and the run "
                  "may still replace it; the embedding cache and the result kept with the run are not written into "
                  "the live run folder",
                  soft_wrap=True)
    return True


def checkpoint_embeddings(ckpt: Checkpoint, store, split: str, device: torch.device, *, cache: bool = True,
                          cache_dir: Path | None = None, show_progress: bool = True,
                          written: list[Path] | None = None) -> Embeddings:
    """A split's set embeddings under a checkpoint, encoded once and then read from the cache.

    Args:
        ckpt: a loaded checkpoint (its recipe and vocabulary rebuild the model).
        store: an open feature store.
        split: split name.
        device: where to encode.
        cache: read and write the cache (:func:`embeddings_cache_path`); float32, so cached and fresh
            embeddings are identical.
        cache_dir: cache folder instead of ``embeddings/`` next to the checkpoint.
        show_progress: progress bars while encoding.
        written: the cache file is appended here when it is (re)written.

    Returns:
        :class:`Embeddings` on the CPU.
    """
    check_features(ckpt, store)
    split_layout(store, split, ckpt.recipe.data.captions_per_image)  # a clear error before loading the model
    path = embeddings_cache_path(ckpt, store, split, cache_dir) if cache else None
    if _training_in(ckpt) and cache_dir is None:
        path = None  # the run folder has one writer: its training run
    key = _cache_key(ckpt, store, split) if cache else None
    if path is not None and (cached := _read_cache(path, key)) is not None:
        return cached
    model, tokenizer = load_for_eval(ckpt, device)
    recipe = ckpt.recipe
    cnn = recipe.model.image_encoder == "cnn"  # decoding image files is worth worker processes, stored features not
    emb = encode_split(model, store, split, tokenizer, recipe.data.captions_per_image, device,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len,
                       show_progress=show_progress, num_workers=recipe.data.num_workers if cnn else 0,
                       image_source=build_image_source(store, recipe, train=False))
    if path is not None and _write_cache(path, key, emb) and written is not None:
        written.append(path)
    return emb
