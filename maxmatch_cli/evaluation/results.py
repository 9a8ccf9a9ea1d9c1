"""What an evaluation reports (:class:`EvalResult`) and the files it writes.

The JSON of DESIGN §5 with what the numbers come from, and a one-row CSV; metrics are rounded to
:data:`METRIC_DECIMALS` in files only, the values returned stay exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maxmatch_cli.fileio import write_text
from maxmatch_cli.models.checkpoint import Checkpoint


@dataclass
class EvalResult:
    """Metrics of one similarity matrix under a protocol, and what produced them."""

    protocol: str
    metrics: dict[str, float]
    folds: list[dict[str, float]] = field(default_factory=list)
    folds_mean: dict[str, float] | None = None
    n_images: int = 0
    n_captions: int = 0
    similarity: str = ""
    checkpoint: str = ""
    split: str = ""
    data: str | list[str] = ""
    """Feature file (an ensemble whose members read different files: their list)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    """Files written while evaluating (the embedding cache, --json, --csv), in order."""
    by_similarity: dict[str, EvalResult] = field(default_factory=dict)
    """Where one encoding was scored with several similarities: each one's result by name, in the order asked,
    this one (the first) included; empty for a single similarity."""

    def scores_json(self) -> dict[str, Any]:
        """The numbers alone: {"metrics", "folds"} and "folds_mean" where there is one (unrounded)."""
        out: dict[str, Any] = {"metrics": self.metrics, "folds": self.folds}
        if self.folds_mean is not None:
            out["folds_mean"] = self.folds_mean
        return out

    def to_json(self) -> dict[str, Any]:
        """DESIGN §5's {"protocol", "metrics", "folds"} and what the numbers come from (unrounded); "metrics" is
        the first similarity's, and with several, "by_similarity" maps each name to its :meth:`scores_json`."""
        out: dict[str, Any] = {"protocol": self.protocol, **self.scores_json()}
        out.update({"checkpoint": self.checkpoint, "split": self.split, "data": self.data,
                    "similarity": self.similarity, "n_images": self.n_images, "n_captions": self.n_captions,
                    "provenance": self.provenance})
        if self.by_similarity:
            out["by_similarity"] = {name: r.scores_json() for name, r in self.by_similarity.items()}
        return out


METRIC_DECIMALS = 2
"""Decimals of every metric in the files written (recalls in %, ranks, RSUM): the paper reports one."""


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics rounded to :data:`METRIC_DECIMALS` for the files written (the returned values stay exact)."""
    return {key: round(float(value), METRIC_DECIMALS) for key, value in metrics.items()}


def rounded_record(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON record with its metrics, folds and members' metrics :func:`rounded` (a copy)."""
    out = dict(record)
    for key in ("metrics", "folds_mean"):
        if out.get(key) is not None:
            out[key] = rounded(out[key])
    out["folds"] = [rounded(fold) for fold in out.get("folds", [])]
    if "members" in out:
        out["members"] = [rounded_record(member) for member in out["members"]]
    if "by_similarity" in out:
        out["by_similarity"] = {name: rounded_record(scores) for name, scores in out["by_similarity"].items()}
    return out


def eval_provenance(ckpt: Checkpoint | None = None) -> dict[str, Any]:
    """What an evaluation file records of its origin: the checkpoint's provenance, this maxmatch, the date."""
    from maxmatch_cli import __version__

    out: dict[str, Any] = {"checkpoint": ckpt.provenance} if ckpt is not None else {}
    out.update({"maxmatch_version": __version__,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return out


def write_result(result: EvalResult, json_path: Path | None, csv_path: Path | None) -> None:
    """Write the JSON record and a one-row CSV (metrics rounded); each path is appended to ``result.files``."""
    if json_path:
        result.files.append(write_text(json_path, json.dumps(rounded_record(result.to_json()), indent=2) + "\n"))
    if csv_path:
        result.files.append(write_text(csv_path, _csv(result)))


def _csv(result: EvalResult) -> str:
    """One row of rounded metrics; with several similarities, a ``similarity`` column and one row for each."""
    keys = list(result.metrics)
    several = list(result.by_similarity.values())
    head = ["protocol", *(["similarity"] if several else []), *keys]
    rows = []
    for r in several or [result]:
        values = rounded(r.metrics)
        rows.append([r.protocol, *([r.similarity] if several else []),
                     *(f"{values[k]:.{METRIC_DECIMALS}f}" for k in keys)])
    return "\n".join(",".join(row) for row in [head, *rows]) + "\n"


RUN_EVAL_DIR = "eval"
"""Where a run folder keeps the evaluations of its checkpoints (read back by ``maxmatch compare RUN``)."""
RUN_MARKERS = ("metrics.jsonl", "recipe.toml")
"""Files that make a checkpoint's folder a training run folder."""


def run_evaluation_path(result: EvalResult, rescored_with: str | None = None) -> Path | None:
    """Where an evaluation of a run's checkpoint is kept with the run: ``RUN/eval/<split>-<protocol>.json`` for
    ``best.safetensors`` (``last-<split>-<protocol>.json`` for ``last``, ``-<similarity>`` added when scored with
    ``rescored_with``); None for a checkpoint outside a run folder."""
    from maxmatch_cli.locks import live_holder, lock_inside

    ckpt = Path(result.checkpoint)
    run = ckpt.parent
    if not any((run / marker).is_file() for marker in RUN_MARKERS):
        return None
    if live_holder(lock_inside(run)) is not None:
        return None  # a run in progress is the one writer of its folder (the evaluation warned: cache.py)
    stem = f"{result.split}-{result.protocol}"
    if ckpt.name != "best.safetensors":
        stem = f"{ckpt.stem}-{stem}"
    if rescored_with:
        stem += f"-{rescored_with}"
    return run / RUN_EVAL_DIR / f"{stem}.json"
