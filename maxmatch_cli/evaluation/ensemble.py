"""Ensembles (paper §4.2): the mean of several checkpoints' similarity matrices, and each member's own metrics.

Every member is evaluated as ``evaluate`` does (:func:`~maxmatch_cli.evaluation.evaluate.evaluate_member`), after
checking that all of them see the same images and captions of the split, in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maxmatch_cli.data.datasets import split_layout
from maxmatch_cli.devices import resolve_device
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, split_coco_ids
from maxmatch_cli.evaluation.encoding import check_features
from maxmatch_cli.evaluation.evaluate import evaluate_member
from maxmatch_cli.evaluation.protocols import check_eval_protocol, metrics_for, resolve_protocol
from maxmatch_cli.evaluation.results import METRIC_DECIMALS, EvalResult, eval_provenance, rounded, rounded_record
from maxmatch_cli.fileio import write_text
from maxmatch_cli.method.similarity import check_similarity
from maxmatch_cli.models.checkpoint import Checkpoint, load_checkpoint


@dataclass
class EnsembleResult:
    """Metrics of the averaged similarities (``ensemble``) and of each member alone."""

    ensemble: EvalResult
    members: list[EvalResult]
    checkpoints: list[str]
    files: list[Path] = field(default_factory=list)
    """Files written (embedding caches, --json, --csv), in order."""

    def to_json(self) -> dict[str, Any]:
        """The ensemble's record (as ``evaluate``'s, with ``checkpoints`` for ``checkpoint``) plus ``members``."""
        out = self.ensemble.to_json()
        del out["checkpoint"]
        out = {**out, "checkpoints": list(self.checkpoints)}
        out["members"] = [{"checkpoint": path, **m.to_json()} for path, m in zip(self.checkpoints, self.members)]
        return out


def _agreed(ckpts: Sequence[Checkpoint], value, what: str, flag: str | None):
    values = [value(c.recipe) for c in ckpts]
    if any(v != values[0] for v in values):
        listed = ", ".join(f"{c.path}: {v}" for c, v in zip(ckpts, values))
        raise MaxMatchError(f"the checkpoints disagree on {what} ({listed})",
                            hint=f"pass {flag} to choose one" if flag else "ensemble checkpoints of one dataset")
    return values[0]


def _split_identity(store, split: str, captions_per_image: int) -> tuple[np.ndarray, list[str]]:
    images, captions = split_layout(store, split, captions_per_image)
    return np.asarray(store.image_ids)[images], store.captions_text(captions)


def _first_difference(a, b) -> str:
    if len(a) != len(b):
        return f"{len(a):,} vs {len(b):,} entries"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"first difference at position {i}: {a[i]!r} vs {b[i]!r}"


def check_aligned(first: tuple[Path, Any], other: tuple[Path, Any], split: str, captions_per_image: int) -> None:
    """Raise unless two (checkpoint, store) pairs see the same images and captions, in the same order."""
    (ckpt_a, store_a), (ckpt_b, store_b) = first, other
    if Path(store_a.path).resolve() == Path(store_b.path).resolve():
        return
    (ids_a, caps_a), (ids_b, caps_b) = (_split_identity(s, split, captions_per_image) for s in (store_a, store_b))
    for what, a, b in (("image ids", ids_a.tolist(), ids_b.tolist()), ("captions", caps_a, caps_b)):
        if a != b:
            raise MaxMatchError(
                f"split '{split}' of {store_b.path} (for {ckpt_b}) does not line up with {store_a.path} "
                f"(for {ckpt_a}): {what} differ, {_first_difference(a, b)}",
                hint="ensemble checkpoints on the same images and captions: pass --data FILE for all of them, "
                     "or feature files of the same dataset split")


def _open_members(ckpts: Sequence[Checkpoint], data: str | None, split: str,
                  captions_per_image: int) -> list[tuple[Checkpoint, Any]]:
    """Each checkpoint with its feature store (``data`` or its recipe's; a file shared is opened once), every
    store checked against its checkpoint and lined up with the first member's."""
    from maxmatch_cli.features.store import open_store

    stores: dict[Path, Any] = {}
    members = []
    for ckpt in ckpts:
        path = Path(data or ckpt.recipe.data.path)
        if path.resolve() not in stores:
            stores[path.resolve()] = open_store(path)
        store = stores[path.resolve()]
        check_features(ckpt, store)
        members.append((ckpt, store))
        check_aligned((members[0][0].path, members[0][1]), (ckpt.path, store), split, captions_per_image)
    return members


def ensemble_checkpoints(checkpoints: Sequence[str | Path], data: str | None = None, split: str | None = None,
                         protocol: str | None = None, similarity: str | None = None, device: str = "auto",
                         json_path: Path | None = None, csv_path: Path | None = None, show_progress: bool = True,
                         cache: bool = True, coco_captions: str | Path | None = None) -> EnsembleResult:
    """Average the similarity matrices of several checkpoints (paper §4.2: two seeds) and report Recall@K.

    Each checkpoint is rebuilt from its own recipe and vocabulary, reads ``data`` or its own recipe's feature
    file, and scores with ``similarity`` or its own test-time similarity; the ensemble score is the plain mean of
    the members' scores (so mixing similarities of different ranges, e.g. maxmatch and chamfer, weighs them
    unequally). All members must see the same images and captions of ``split``, in the same order.

    Args:
        checkpoints: two or more checkpoint files or run folders.
        data: feature file for every member (default: each recipe's ``data.path``).
        split, protocol: as for :func:`~maxmatch_cli.evaluation.evaluate.evaluate_checkpoint` (eccv and cxc too:
            the ensemble and every member get their metrics); default the recipes' (which must then agree).
        similarity: one similarity for every member (default: each checkpoint's).
        device: auto, cpu, cuda or cuda:N.
        json_path, csv_path: also write the results there (JSON: DESIGN §5 keys, what they come from, and
            ``members``, each a record as ``evaluate`` writes it; ``data`` is one path, or a list when the members
            read different files). Metrics in files are rounded to
            :data:`~maxmatch_cli.evaluation.results.METRIC_DECIMALS`.
        show_progress: progress bars.
        cache: use the embedding cache (:func:`~maxmatch_cli.evaluation.cache.checkpoint_embeddings`).
        coco_captions: eccv / cxc: ``captions_val2014.json``, as for
            :func:`~maxmatch_cli.evaluation.evaluate.evaluate_checkpoint`.

    Returns:
        :class:`EnsembleResult`.
    """
    check_eval_protocol(protocol, coco_captions)
    if len(checkpoints) < 2:
        raise MaxMatchError(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}",
                            hint="pass two or more checkpoints (e.g. two seeds), or use `maxmatch evaluate`")
    check_similarity(similarity)
    dev = resolve_device(device)
    ckpts = [load_checkpoint(c) for c in checkpoints]
    split = split or _agreed(ckpts, lambda r: r.eval.split, "eval.split", "--split")
    protocol = protocol or _agreed(ckpts, lambda r: r.eval.protocol, "eval.protocol", "--protocol")
    cpi = _agreed(ckpts, lambda r: r.data.captions_per_image, "data.captions_per_image", None)
    members = _open_members(ckpts, data, split, cpi)
    images, _ = split_layout(members[0][1], split, cpi)
    protocol = resolve_protocol(protocol, len(images), split)  # before the encoding
    coco_ids = None
    if protocol in ECCV_PROTOCOLS:  # the members are aligned: the first one's ids are every member's
        coco_ids = split_coco_ids(members[0][1], split, cpi, coco_captions)
    total, results, files = None, [], []
    for ckpt, store in members:
        kind = similarity or ckpt.recipe.eval.similarity or ckpt.recipe.loss.similarity
        result, sims = evaluate_member(ckpt, store, split, protocol, kind, cpi, dev, coco_ids, cache=cache,
                                       show_progress=show_progress, written=files)
        results.append(result)
        total = sims if total is None else total.add_(sims)
    total /= len(members)
    _warn_members_at_chance(results, cpi)
    ensemble = metrics_for(total, protocol, cpi, coco_ids)
    kinds = list(dict.fromkeys(r.similarity for r in results))
    ensemble.similarity = kinds[0] if len(kinds) == 1 else "mean(" + ", ".join(kinds) + ")"
    data_files = list(dict.fromkeys(r.data for r in results))
    ensemble.split, ensemble.data = split, data_files[0] if len(data_files) == 1 else data_files
    ensemble.provenance = eval_provenance()
    if coco_ids is not None:
        ensemble.provenance["coco_caption_ids"] = coco_ids.source
    out = EnsembleResult(ensemble, results, [str(c.path) for c in ckpts], files)
    write_ensemble(out, json_path, csv_path)
    return out


def _warn_members_at_chance(results: Sequence[EvalResult], captions_per_image: int) -> None:
    """A member no better than a random ranking only adds noise to the mean: say which."""
    from maxmatch_cli.evaluation.chance import at_chance
    from maxmatch_cli.progress import console

    for result in results:
        sentence = at_chance(result.metrics, result.n_images, captions_per_image)
        if sentence:
            console.print(f"[yellow]warning:[/] ensemble member {result.checkpoint}: {sentence}; it adds noise to "
                          f"the ensemble (leave it out, or train it longer)", soft_wrap=True)


def write_ensemble(out: EnsembleResult, json_path: Path | None, csv_path: Path | None) -> None:
    """Write the ensemble's JSON record and a CSV row per member plus one for the ensemble (metrics rounded);
    each path is appended to ``out.files``."""
    if json_path:
        out.files.append(write_text(json_path, json.dumps(rounded_record(out.to_json()), indent=2) + "\n"))
    if csv_path:
        keys = list(out.ensemble.metrics)
        rows = ["model,similarity,protocol," + ",".join(keys)]
        for label, r in [*zip(out.checkpoints, out.members), ("ensemble", out.ensemble)]:
            values = rounded(r.metrics)
            rows.append(",".join([_csv_field(label), _csv_field(r.similarity), r.protocol,
                                  *(f"{values[k]:.{METRIC_DECIMALS}f}" for k in keys)]))
        out.files.append(write_text(csv_path, "\n".join(rows) + "\n"))


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
