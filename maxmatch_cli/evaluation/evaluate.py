"""Evaluate a checkpoint: encode a split once, score every image against every caption in blocks, report Recall@K.

The pieces live beside this module: protocols and their metrics in :mod:`~maxmatch_cli.evaluation.protocols`,
encoding and blockwise scoring in :mod:`~maxmatch_cli.evaluation.encoding`, the per-checkpoint embedding cache in
:mod:`~maxmatch_cli.evaluation.cache`, results and their files in :mod:`~maxmatch_cli.evaluation.results`.
:func:`evaluate_member` is the step ``evaluate`` and ``ensemble`` (:mod:`~maxmatch_cli.evaluation.ensemble`) share;
:func:`evaluate_checkpoint` can score one encoding with several similarities (§3.4's top-k beside exact MaxMatch).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from maxmatch_cli.data.datasets import split_layout
from maxmatch_cli.devices import resolve_device
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.cache import checkpoint_embeddings
from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, CocoIds, split_coco_ids
from maxmatch_cli.evaluation.encoding import Embeddings, score, similarity_options
from maxmatch_cli.evaluation.protocols import check_eval_protocol, metrics_for, resolve_protocol
from maxmatch_cli.evaluation.results import EvalResult, eval_provenance, run_evaluation_path, write_result
from maxmatch_cli.method.similarity import SIMILARITIES, check_similarity
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
    kind = similarity or default_similarity(ckpt)
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
    emb = checkpoint_embeddings(ckpt, store, split, device, cache=cache, show_progress=show_progress, written=written)
    return score_embeddings(ckpt, store, emb, split, protocol, kind, captions_per_image, device, coco_ids,
                            show_progress=show_progress)


def score_embeddings(ckpt: Checkpoint, store, emb: Embeddings, split: str, protocol: str, kind: str,
                     captions_per_image: int, device: torch.device, coco_ids: CocoIds | None = None, *,
                     show_progress: bool = True) -> tuple[EvalResult, torch.Tensor]:
    """:func:`evaluate_member` on embeddings already encoded: score them with ``kind`` (its options from the
    checkpoint's recipe) and report the protocol's metrics, so one encoding serves several similarities."""
    recipe = ckpt.recipe
    sims = score(emb.images, emb.captions, kind, device, recipe.eval.block_size, show_progress=show_progress,
                 **similarity_options(recipe, kind))
    result = metrics_for(sims, protocol, captions_per_image, coco_ids)
    result.similarity = kind
    result.checkpoint, result.split, result.data = str(ckpt.path), split, str(store.path)
    result.provenance = eval_provenance(ckpt)
    if coco_ids is not None:
        result.provenance["coco_caption_ids"] = coco_ids.source
    return result, sims


def parse_similarities(similarity: str | Sequence[str] | None) -> list[str] | None:
    """The similarities asked for, in order and each once: a name, a comma list (``"topk,maxmatch"``) or a
    sequence of names; None (or nothing but commas and spaces) leaves the choice to the checkpoint's recipe.

    Raises:
        MaxMatchError: a name that is no similarity (all such names in one message, each with its nearest).
    """
    if similarity is None:
        return None
    items = [similarity] if isinstance(similarity, str) else list(similarity)
    names = list(dict.fromkeys(n.strip() for item in items for n in str(item).split(",") if n.strip()))
    if not names:
        return None
    unknown = [n for n in names if n not in SIMILARITIES]
    if len(names) == 1 or not unknown:
        for name in unknown:
            check_similarity(name)  # the message of a single name
        return names
    near = [f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, SIMILARITIES, n=1))
            else repr(n) for n in unknown]
    raise MaxMatchError(f"unknown similarit{'y' if len(unknown) == 1 else 'ies'} {', '.join(near)} in the "
                        f"similarity list {','.join(names)!r}",
                        hint=f"list names separated by commas, each one of: {', '.join(SIMILARITIES)}")


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str | None = None,
                        protocol: str | None = None, similarity: str | Sequence[str] | None = None,
                        device: str = "auto", json_path: Path | None = None, csv_path: Path | None = None,
                        show_progress: bool = True, cache: bool = True,
                        coco_captions: str | Path | None = None, keep_with_run: bool = False) -> EvalResult:
    """Evaluate a checkpoint on a split; writes the JSON of DESIGN §5 (and a CSV) when asked.

    The JSON also records the checkpoint, split, feature file, similarity, sizes and provenance; metrics in files
    are rounded to :data:`~maxmatch_cli.evaluation.results.METRIC_DECIMALS`, those returned are not. Every file
    written is listed in ``result.files``. ``protocol`` may also be eccv or cxc; their caption annotation ids come
    from ``coco_captions`` (``captions_val2014.json``) or the feature file (:mod:`maxmatch_cli.evaluation.eccv`),
    and where they came from is recorded as ``provenance["coco_caption_ids"]``.

    ``similarity`` may name several similarities (``"topk,maxmatch"`` or a list; :func:`parse_similarities`):
    the split is encoded once and scored with each. The result is the first one's, with every one's result in
    ``result.by_similarity`` (the JSON's ``"by_similarity"``; ``"metrics"`` stays the first's).

    ``keep_with_run``: a checkpoint of a run folder also keeps each similarity's result with the run
    (:func:`keep_results`), for ``maxmatch compare RUN``.
    """
    check_eval_protocol(protocol, coco_captions)
    kinds = parse_similarities(similarity)  # before anything is loaded
    dev = resolve_device(device)
    opened = open_scoring(checkpoint, data, split, protocol, kinds[0] if kinds else None)
    ckpt, store, split, protocol = opened.ckpt, opened.store, opened.split, opened.protocol
    kinds = kinds or [opened.kind]
    cpi = ckpt.recipe.data.captions_per_image
    coco_ids = None
    if protocol in ECCV_PROTOCOLS:  # a missing id mapping costs no encoding
        coco_ids = split_coco_ids(store, split, cpi, coco_captions)
    files: list[Path] = []
    emb = checkpoint_embeddings(ckpt, store, split, dev, cache=cache, show_progress=show_progress, written=files)
    results = [score_embeddings(ckpt, store, emb, split, protocol, kind, cpi, dev, coco_ids,
                                show_progress=show_progress)[0] for kind in kinds]
    result = results[0]
    if len(results) > 1:
        result.by_similarity = {r.similarity: r for r in results}
    result.files = files
    write_result(result, json_path, csv_path)
    if keep_with_run:
        result.files += keep_results(results, default_similarity(ckpt), json_path)
    return result


def default_similarity(ckpt: Checkpoint) -> str:
    """The similarity a checkpoint is scored with when none is asked for: its recipe's test-time one, else its
    training one."""
    return ckpt.recipe.eval.similarity or ckpt.recipe.loss.similarity


def keep_results(results: Sequence[EvalResult], default: str, json_path: Path | None = None) -> list[Path]:
    """Keep each result of a run folder's checkpoint with its run, one file per similarity, each as an evaluation
    with that similarity alone would: ``RUN/eval/<split>-<protocol>.json`` for ``default`` (the checkpoint's own),
    ``…-<similarity>.json`` for another (:func:`~maxmatch_cli.evaluation.results.run_evaluation_path`). Nothing for
    a checkpoint outside a run folder, or where ``json_path`` was that file already; returns the files written."""
    written: list[Path] = []
    for r in results:
        kept = run_evaluation_path(r, rescored_with=None if r.similarity == default else r.similarity)
        if kept is not None and (json_path is None or kept.resolve() != Path(json_path).resolve()):
            single = replace(r, by_similarity={}, files=[])
            write_result(single, kept, None)
            written += single.files
    return written
