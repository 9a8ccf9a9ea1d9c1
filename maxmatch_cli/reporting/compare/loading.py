"""Reading results (:func:`load_results`): evaluation JSON files, run folders (their evaluation JSON, else the last
validation of metrics.jsonl) and ``benchmarks/demo_results.json``, one :class:`RunResult` per run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.reporting.compare.recipes import _checkpoint_recipe, _demo_recipe, _resolved, _run_recipe
from maxmatch_cli.reporting.compare.records import (_HINT_INPUTS, COCO_EXTRAS, EVAL_DIR, EXTRAS, METRICS,
                                                    RunResult)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MaxMatchError(f"{path} is not a text file", hint=_HINT_INPUTS) from None
    except json.JSONDecodeError as exc:
        raise MaxMatchError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", hint=_HINT_INPUTS) from None


def _metrics(raw: Any, where: str, prefix: str = "") -> dict[str, float]:
    """The :data:`METRICS` of a record, as floats; an error naming ``where`` when any is missing."""
    if not isinstance(raw, dict):
        raise MaxMatchError(f"{where} has no metrics", hint=_HINT_INPUTS)
    missing = [m for m in METRICS if prefix + m not in raw]
    if missing:
        raise MaxMatchError(f"{where} has no {', '.join(prefix + m for m in missing)} in its metrics",
                            hint=_HINT_INPUTS)
    for m in METRICS:
        _number(raw[prefix + m], prefix + m, where)
    return {m: float(raw[prefix + m]) for m in METRICS}


def _number(value: Any, key: str, where: str) -> float:
    """``value`` as a finite float; an error naming ``key`` and ``where`` for a string, bool, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MaxMatchError(f"{where}: {key} is {value!r}, not a finite number",
                            hint="re-run the evaluation that wrote it (maxmatch evaluate CKPT --json F)")
    return float(value)


def _is_evaluation(raw: Any) -> bool:
    return isinstance(raw, dict) and isinstance(raw.get("metrics"), dict) and "rsum" in raw["metrics"]


def _from_evaluation(path: Path, raw: dict[str, Any], given: Path,
                     run: tuple[str, dict | None] | None) -> list[RunResult]:
    """One evaluation JSON, one result per similarity it scored with (``evaluate --similarity a,b`` writes the
    first's in "metrics", each one's in "by_similarity"); its recipe from ``run`` (the folder it lies in) or the
    checkpoint it names."""
    if run is None:
        ckpt = raw.get("checkpoint")
        candidates = [Path(ckpt), path.parent / Path(ckpt).name] if isinstance(ckpt, str) and ckpt else []
        header = next((r for c in candidates if c.is_file() for r in [_checkpoint_recipe(c)] if r), None)
        if header is not None:
            run = header.get("name") or "custom", _resolved({k: v for k, v in header.items()
                                                             if k not in ("name", "description")})
        elif (path.parent / "recipe.toml").is_file():
            run = _run_recipe(path.parent)
    name, recipe = run if run else (str(given), None)
    similarity = raw.get("similarity") if isinstance(raw.get("similarity"), str) else None
    scored = {similarity: raw}
    if isinstance(raw.get("by_similarity"), dict) and len(raw["by_similarity"]) > 1:
        scored = {str(k): v if isinstance(v, dict) else {} for k, v in raw["by_similarity"].items()}
    out = []
    for i, (sim, scores) in enumerate(scored.items()):
        where = str(path) if len(scored) == 1 else f"{path} (by_similarity.{sim})"
        metrics = _metrics(scores.get("metrics"), where)
        coco = {k: _number(scores["metrics"][k], k, where) for keys in COCO_EXTRAS.values() for k in keys
                if k in scores["metrics"]}
        out.append(RunResult(path=given, file=path, metrics=metrics, kind="evaluate",
                             split=str(raw.get("split", "")), protocol=str(raw.get("protocol", "")), name=name,
                             recipe=recipe, seed=recipe.get("train.seed") if recipe else None, eval_similarity=sim,
                             extras=coco, index=i, of_several=len(scored) > 1))
    return out


def _last_validation(path: Path) -> dict[str, Any] | None:
    """The last metrics.jsonl record holding validation metrics (a torn line is skipped with a warning)."""
    from maxmatch_cli.fileio import read_history
    from maxmatch_cli.progress import console

    validated = [r for r in read_history(path, lambda m: console.print(f"[yellow]warning:[/] {m}", soft_wrap=True))
                 if "val/rsum" in r]
    return validated[-1] if validated else None


def _stale(path: Path, raw: dict[str, Any], folder: Path) -> bool:
    """An evaluation kept in ``RUN/eval`` that is older than the run's checkpoint it scored (the run was continued
    or replaced since): not this run's result."""
    ckpt = folder / Path(str(raw.get("checkpoint", ""))).name
    if path.parent != folder / EVAL_DIR or not ckpt.is_file():
        return False
    return path.stat().st_mtime_ns < ckpt.stat().st_mtime_ns


def _from_run_folder(folder: Path, split: str | None) -> list[RunResult]:
    """A run folder's evaluation JSON (of ``split``, else of the recipe's eval.split), else its last validation."""
    markers = ("recipe.toml", "metrics.jsonl", "best.safetensors", "last.safetensors")
    if not any((folder / m).is_file() for m in markers):
        raise MaxMatchError(f"{folder} is not a run folder (no recipe.toml, metrics.jsonl or checkpoint in it)",
                            hint=f"{_HINT_INPUTS}; for a folder of run folders pass {folder}/*")
    name, recipe = _run_recipe(folder)
    evaluations = []
    for path in [*sorted(folder.glob("*.json")), *sorted((folder / EVAL_DIR).glob("*.json"))]:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if _is_evaluation(raw) and not _stale(path, raw, folder):
            evaluations.append((path, raw))
    wanted = split or (recipe or {}).get("eval.split")
    chosen = [(p, r) for p, r in evaluations if r.get("split") == wanted] if wanted else evaluations
    if not chosen and not split:
        chosen = evaluations
    if len(chosen) > 1:  # `evaluate` keeps RUN/eval/<split>-<protocol>.json of the best checkpoint: that one
        own = [(p, r) for p, r in chosen if p.parent.name == EVAL_DIR and p.parent.parent == folder
               and p.stem == f"{r.get('split')}-{r.get('protocol')}"]
        chosen = own if len(own) == 1 else chosen
    if len(chosen) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p, _ in chosen)
        raise MaxMatchError(f"run folder {folder} holds several evaluation files ({names})",
                            hint="pass the one to compare instead of the folder, or choose a split with --split")
    if chosen:
        return _from_evaluation(chosen[0][0], chosen[0][1], folder, (name, recipe))
    val_split = (recipe or {}).get("data.val_split", "")
    history = folder / "metrics.jsonl"
    record = _last_validation(history) if history.is_file() else None
    if record is None or (split and split != val_split):
        what = f"of split '{split}'" if split else "(no evaluation JSON, no validation in metrics.jsonl)"
        raise MaxMatchError(f"run folder {folder} has no results {what}",
                            hint=f"evaluate it: maxmatch evaluate {folder / 'best.safetensors'} "
                                 f"--split {split or 'test'} (kept in {folder / EVAL_DIR})")
    return [RunResult(path=folder, file=history, metrics=_metrics(record, f"{history} (last validation)", "val/"),
                      kind="val", split=val_split, protocol="", name=name, recipe=recipe,
                      seed=recipe.get("train.seed") if recipe else None)]


def _from_demo_results(path: Path, raw: dict[str, Any], split: str | None) -> list[RunResult]:
    """Every run of a benchmarks/demo_results.json (test split of the demo data, full protocol)."""
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise MaxMatchError(f"{path} holds no runs", hint=_HINT_INPUTS)
    run_split = str(raw.get("split", "test"))
    if split and split != run_split:
        raise MaxMatchError(f"{path} holds results of split '{run_split}', not '{split}'",
                            hint=f"leave it out or use --split {run_split}")
    commands = raw.get("commands") if isinstance(raw.get("commands"), dict) else {}
    out = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("config"), str):
            raise MaxMatchError(f"{path}: run {i + 1} has no config name", hint=_HINT_INPUTS)
        config = run["config"]
        recipe = _demo_recipe(commands.get(config))
        seed = run.get("seed") if isinstance(run.get("seed"), int) else None
        if recipe is not None and seed is not None:
            recipe = {**recipe, "train.seed": seed}
        extras = {k: float(run[k]) for k in EXTRAS if isinstance(run.get(k), (int, float))}
        out.append(RunResult(path=path, file=path, metrics=_metrics(run.get("metrics"), f"{path}: run {i + 1}"),
                             kind="demo", split=run_split, protocol="full", name=config, recipe=recipe, seed=seed,
                             extras=extras, index=i))
    return out


def load_results(inputs: Sequence[str | Path], split: str | None = None) -> list[RunResult]:
    """Read every input (evaluation JSON, run folder, demo_results.json), in order; the same file read twice once.

    Raises:
        MaxMatchError: an input is missing, holds no metrics, or is a folder without results.
    """
    if not inputs:
        raise MaxMatchError("nothing to compare", hint=_HINT_INPUTS)
    results: list[RunResult] = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = _from_run_folder(given, split)
        elif not given.exists():
            raise MaxMatchError(f"{given} does not exist", hint=_HINT_INPUTS)
        else:
            if given.suffix != ".json":
                hint = f"evaluate it first: maxmatch evaluate {given} --json {given.with_suffix('.json')}"
                raise MaxMatchError(f"{given} is not an evaluation JSON or a run folder",
                                    hint=hint if given.suffix == ".safetensors" else _HINT_INPUTS)
            raw = _read_json(given)
            if isinstance(raw, dict) and "runs" in raw and "metrics" not in raw:
                found = _from_demo_results(given, raw, split)
            elif _is_evaluation(raw):
                found = _from_evaluation(given, raw, given, None)
                if split and found[0].split != split:
                    raise MaxMatchError(f"{given} holds results of split '{found[0].split}', not '{split}'",
                                        hint=f"leave it out or use --split {found[0].split}")
            else:
                raise MaxMatchError(f"{given} holds no metrics (not written by `maxmatch evaluate --json`)",
                                    hint=_HINT_INPUTS)
        results += found
    seen, unique = set(), []
    for r in results:
        key = (r.file.resolve(), r.index)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique
