"""Grouping runs into rows (:func:`compare`): labels from the recipes' differences, mean and sample std over the
runs of a row (pandas), ΔRSUM against a baseline row, and notes on what the rows mix."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.reporting.compare.recipes import _shipped_recipe
from maxmatch_cli.reporting.compare.records import (_HINT_INPUTS, COCO_EXTRAS, EXTRAS, GROUP_BY, METRICS,
                                                    NOT_CONFIG, PATH_KEYS, REGULARISERS, Comparison, RunResult)


def _config(recipe: dict[str, Any] | None) -> tuple | None:
    return None if recipe is None else tuple(sorted((k, repr(v)) for k, v in recipe.items() if k not in NOT_CONFIG))


def _group_key(r: RunResult, group_by: str) -> tuple:
    where = (r.kind, r.split, r.protocol, r.eval_similarity if r.rescored else None)
    if group_by == "run" or (r.recipe is None and r.kind != "demo"):
        return (*where, str(r.file.resolve()), r.index)
    if group_by == "recipe" or r.kind == "demo":
        return (*where, r.name)
    return (*where, r.name, _config(r.recipe))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _labels(groups: list[list[RunResult]], group_by: str) -> list[str]:
    """Recipe name plus the overrides in which the rows differ (where they differ from the shipped recipe)."""
    firsts = [g[0] for g in groups]
    recipes = [r.recipe for r in firsts if r.recipe is not None and r.kind != "demo"]
    keys = [k for k in dict.fromkeys(k for rec in recipes for k in rec) if k not in NOT_CONFIG]  # recipe order
    varying = [k for k in keys if len({repr(rec.get(k, "<unset>")) for rec in recipes}) > 1]

    def overrides(r: RunResult, names: list[str]) -> list[str]:
        if r.recipe is None or r.kind == "demo" or group_by == "recipe":
            return []
        shipped = _shipped_recipe(r.name)
        return [f"{k}={_value(r.recipe.get(k, '<unset>'))}" for k in names
                if shipped is None or r.recipe.get(k) != shipped.get(k)]

    settings = [" ".join([r.name, *overrides(r, [k for k in varying if k not in PATH_KEYS])]) for r in firsts]
    paths = [k for k in varying if k in PATH_KEYS]
    labels = []
    for r, label in zip(firsts, settings):
        if paths and settings.count(label) > 1:  # only a file tells these rows apart
            label = " ".join([label, *overrides(r, paths)])
        if r.rescored or (r.of_several and r.recipe is None):  # without a recipe no row is the own inference
            label += f" (scored with {r.eval_similarity})"
        if group_by == "run" and r.seed is not None:
            label += f" seed {r.seed}"
        labels.append(label)
    for i, label in enumerate(labels):  # same recipe, other sources: say which
        if labels.count(label) > 1:
            labels[i] = f"{label} [{firsts[i].source}]"
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _pick_baseline(labels: list[str], baseline: str | None) -> int:
    if baseline is None:
        return 0
    if baseline in labels:
        return labels.index(baseline)
    near = [i for i, label in enumerate(labels) if baseline.lower() in label.lower()]
    if len(near) == 1:
        return near[0]
    listed = "; ".join(f"'{label}'" for label in labels)
    what = "matches several rows" if near else "matches no row"
    raise MaxMatchError(f"--baseline '{baseline}' {what}", hint=f"give one of the row labels: {listed}")


def compare(results: Sequence[RunResult], group_by: str = "config", baseline: str | None = None) -> Comparison:
    """Group runs into rows (:data:`GROUP_BY`) and compute mean, sample std (n − 1) and ΔRSUM with pandas.

    Args:
        results: from :func:`load_results`.
        group_by: 'config', 'recipe' or 'run'.
        baseline: label (or a part of one that names a single row) of the row ΔRSUM is taken against; default the
            first row.
    """
    if group_by not in GROUP_BY:
        raise MaxMatchError(f"unknown --group-by '{group_by}'", hint=f"use one of: {', '.join(GROUP_BY)}")
    if not results:
        raise MaxMatchError("nothing to compare", hint=_HINT_INPUTS)
    keys: dict[tuple, int] = {}
    for r in results:
        keys.setdefault(_group_key(r, group_by), len(keys))
    groups: list[list[RunResult]] = [[] for _ in keys]
    for r in results:
        groups[keys[_group_key(r, group_by)]].append(r)
    labels = _labels(groups, group_by)

    extras = [k for k in (*EXTRAS, *(k for keys in COCO_EXTRAS.values() for k in keys))
              if any(k in r.extras for r in results)]
    long = pd.DataFrame([{"group": keys[_group_key(r, group_by)], **r.metrics,
                          **{k: r.extras.get(k, math.nan) for k in extras}} for r in results])
    stats = long.groupby("group", sort=True)[[*METRICS, *extras]]
    means, stds, counts = stats.mean(), stats.std(ddof=1), stats.size()

    rows = []
    for g, members in enumerate(groups):
        first = members[0]
        recipe = first.recipe or {}
        similarity = recipe.get("loss.similarity") or first.eval_similarity
        if str(recipe.get("model.num_embeds")) == "1":  # one vector a side: every set similarity is the cosine's
            similarity = "cosine-vsepp" if recipe.get("model.image_pool") == "mean" else "cosine"
        row = {"label": labels[g], "n": int(counts[g]),
               "seeds": " ".join("?" if r.seed is None else str(r.seed) for r in members),
               "similarity": similarity or "",
               **{w: float(recipe[f"loss.{w}"]) if f"loss.{w}" in recipe else math.nan for _, w in REGULARISERS},
               "split": first.split, "protocol": first.protocol,
               "source": " / ".join(dict.fromkeys(r.source for r in members)),
               "inputs": "; ".join(dict.fromkeys(str(r.path) for r in members))}
        for m in [*METRICS, *extras]:
            row[f"{m}_mean"] = float(means.loc[g, m])
            row[f"{m}_std"] = float(stds.loc[g, m])
        rows.append(row)
    frame = pd.DataFrame(rows)
    base = _pick_baseline(labels, baseline)
    frame["delta_rsum"] = frame["rsum_mean"] - frame.loc[base, "rsum_mean"]
    return Comparison(frame=frame, baseline=labels[base], group_by=group_by, notes=_notes(groups, labels))


def _notes(groups: list[list[RunResult]], labels: list[str]) -> list[str]:
    notes = []
    sources = sorted({r.source for g in groups for r in g})
    if len(sources) > 1:
        notes.append(f"the rows come from different splits or protocols ({', '.join(sources)}): see the source column")
    if any(r.kind == "val" for g in groups for r in g):
        notes.append("'val' rows are the last validation of metrics.jsonl (at most train.val_max_images images of "
                     "data.val_split), not a test evaluation")
    for label, g in zip(labels, groups):
        seeds = [r.seed for r in g if r.seed is not None]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            notes.append(f"row '{label}' holds seed(s) {', '.join(map(str, twice))} more than once")
    return notes
