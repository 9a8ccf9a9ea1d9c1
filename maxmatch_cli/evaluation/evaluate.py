"""Evaluate a checkpoint: encode a split once, score every image against every caption in blocks, report Recall@K.

The pieces live beside this module: protocols and their metrics in :mod:`~maxmatch_cli.evaluation.protocols`,
encoding and blockwise scoring in :mod:`~maxmatch_cli.evaluation.encoding`, the per-checkpoint embedding cache in
:mod:`~maxmatch_cli.evaluation.cache`, results and their files in :mod:`~maxmatch_cli.evaluation.results`.
:func:`evaluate_member` is the step ``evaluate`` and ``ensemble`` (:mod:`~maxmatch_cli.evaluation.ensemble`) share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maxmatch_cli.data.datasets import split_layout
from maxmatch_cli.devices import resolve_device
from maxmatch_cli.evaluation.cache import checkpoint_embeddings
from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, CocoIds, split_coco_ids
from maxmatch_cli.evaluation.encoding import score, similarity_options
from maxmatch_cli.evaluation.protocols import check_eval_protocol, metrics_for, resolve_protocol
from maxmatch_cli.evaluation.results import EvalResult, eval_provenance, write_result
from maxmatch_cli.method.similarity import check_similarity
from maxmatch_cli.models.checkpoint import Checkpoint, load_checkpoint


@dataclass
class Scoring:
    """A checkpoint opened to score one split: what ``evaluate`` and ``analyze-collapse`` resolve before encoding."""

    ckpt: Checkpoint
    store: Any
    split: str
    kind: str
    """The set similarity: the one asked for, else the recipe's test-time one, else its training one."""
    protocol: str
    """The resolved protocol (checked against the split's size before anything is encoded)."""


def open_scoring(checkpoint: str | Path, data: str | None, split: str | None, protocol: str | None,
                 similarity: str | None) -> Scoring:
    """Load ``checkpoint``, open its feature file (or ``data``), and resolve the split, similarity and protocol
    from the arguments, falling back to the checkpoint's recipe."""
    from maxmatch_cli.features.store import open_store

    ckpt = load_checkpoint(checkpoint)
    recipe = ckpt.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    kind = similarity or recipe.eval.similarity or recipe.loss.similarity
    images, _ = split_layout(store, split, recipe.data.captions_per_image)
    protocol = resolve_protocol(protocol or recipe.eval.protocol, len(images), split)
    return Scoring(ckpt, store, split, kind, protocol)


def evaluate_member(ckpt: Checkpoint, store, split: str, protocol: str, kind: str, captions_per_image: int,
                    device: torch.device, coco_ids: CocoIds | None = None, *, cache: bool = True,
                    show_progress: bool = True, written: list[Path] | None = None) -> tuple[EvalResult, torch.Tensor]:
    """One checkpoint's metrics on a split, and the (images, captions) similarity matrix they come from.

    Args:
        ckpt: a loaded checkpoint (checked against ``store`` by
            :func:`~maxmatch_cli.evaluation.cache.checkpoint_embeddings`).
        store: an open feature store.
        split: split name.
        protocol: a resolved protocol (:func:`~maxmatch_cli.evaluation.protocols.resolve_protocol`).
        kind: the set similarity to score with; its options come from the checkpoint's recipe.
        captions_per_image: captions per image of the split.
        device: where to encode and score.
        coco_ids: eccv / cxc: the split's COCO ids.
        cache: use the embedding cache.
        show_progress: progress bars.
        written: a (re)written cache file is appended here.

    Returns:
        The :class:`~maxmatch_cli.evaluation.results.EvalResult` (similarity, checkpoint, split, data and
        provenance filled in) and the matrix.
    """
    recipe = ckpt.recipe
    emb = checkpoint_embeddings(ckpt, store, split, device, cache=cache, show_progress=show_progress, written=written)
    sims = score(emb.images, emb.captions, kind, device, recipe.eval.block_size, show_progress=show_progress,
                 **similarity_options(recipe, kind))
    result = metrics_for(sims, protocol, captions_per_image, coco_ids)
    result.similarity = kind
    result.checkpoint, result.split, result.data = str(ckpt.path), split, str(store.path)
    result.provenance = eval_provenance(ckpt)
    if coco_ids is not None:
        result.provenance["coco_caption_ids"] = coco_ids.source
    return result, sims


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                        protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                        json_path: Path | None = None, csv_path: Path | None = None,
                        show_progress: bool = True, cache: bool = True,
                        coco_captions: str | Path | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split; writes the JSON of DESIGN §5 (and a one-row CSV) when asked.

    The JSON also records the checkpoint, split, feature file, similarity, sizes and provenance; metrics in files
    are rounded to :data:`~maxmatch_cli.evaluation.results.METRIC_DECIMALS`, those returned are not. Every file
    written is listed in ``result.files``. ``protocol`` may also be eccv or cxc; their caption annotation ids come
    from ``coco_captions`` (``captions_val2014.json``) or the feature file (:mod:`maxmatch_cli.evaluation.eccv`),
    and where they came from is recorded as ``provenance["coco_caption_ids"]``.
    """
    check_eval_protocol(protocol, coco_captions)
    check_similarity(similarity)  # before anything is loaded
    dev = resolve_device(device)
    opened = open_scoring(checkpoint, data, split, protocol, similarity)
    ckpt, store, split, kind, protocol = opened.ckpt, opened.store, opened.split, opened.kind, opened.protocol
    recipe = ckpt.recipe
    coco_ids = None
    if protocol in ECCV_PROTOCOLS:  # a missing id mapping costs no encoding
        coco_ids = split_coco_ids(store, split, recipe.data.captions_per_image, coco_captions)
    files: list[Path] = []
    result, _ = evaluate_member(ckpt, store, split, protocol, kind, recipe.data.captions_per_image, dev, coco_ids,
                                cache=cache, show_progress=show_progress, written=files)
    result.files = files
    write_result(result, json_path, csv_path)
    return result
