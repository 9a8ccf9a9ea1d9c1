"""One table across runs: mean ± std over seeds, ΔRSUM against a baseline, as text, Markdown, LaTeX or CSV.

Inputs (:func:`load_results`), each giving one result per run:

* an evaluation JSON written by ``maxmatch evaluate --json`` (or ``ensemble --json``): its ``metrics``;
* a run folder (``recipe.toml``, ``metrics.jsonl``, checkpoints): the evaluation JSON inside it or in its
  ``eval/`` folder (where ``maxmatch evaluate`` keeps them) if there is one (of ``--split``, or of the recipe's
  ``eval.split``), else the last validation record of ``metrics.jsonl``, labelled as such;
* ``benchmarks/demo_results.json`` (``{"runs": [{config, seed, metrics, ...}], "commands": {config: ...}}``).

Runs whose recipes differ only in ``train.seed`` (and in settings that do not change what is trained:
:data:`NOT_CONFIG`) form one row (:func:`compare`); its label is the recipe name plus the overrides in which the
rows differ (where they differ from the shipped recipe of that name). The statistics are pandas' mean and sample
standard deviation (n − 1); every output format is rendered from the same :class:`Comparison`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import pandas as pd

from maxmatch_cli.evaluation.eccv import CXC_KEYS, ECCV_KEYS
from maxmatch_cli.errors import MaxMatchError

__all__ = ["Comparison", "GROUP_BY", "LAYOUTS", "RunResult", "check_display", "compare", "compare_runs",
           "display_frame", "load_results", "rich_table", "to_csv", "to_latex", "to_markdown", "write_comparison"]

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
"""The recalls (%) and RSUM every row reports, in the paper's column order."""
EXTRAS = ("log_var_image", "log_var_text")
"""Further per-run figures shown when an input has them (demo_results.json: log circular variance, Table 4)."""
COCO_EXTRAS = {"eccv": ECCV_KEYS, "cxc": CXC_KEYS}
"""The ECCV Caption and CxC metrics of evaluation files (``evaluate`` / ``ensemble --protocol eccv|cxc``): the
columns of the layouts of the same names."""
GROUP_BY = ("config", "recipe", "run")
"""config: runs whose resolved recipes differ only in the seed share a row; recipe: runs of the same recipe name
share a row, whatever their overrides; run: one row per run."""
LAYOUTS = ("recall", "table3", "eccv", "cxc")
"""recall: label, n, the six recalls, RSUM, ΔRSUM, source; table3: the paper's Table 3 (similarity, which
regularisers are on, RSUM); eccv: ECCV Caption mAP@R, R-Precision and R@1 per direction, the COCO 5K RSUM; cxc:
CxC R@1/5/10 per direction, the COCO 5K RSUM."""
NOT_CONFIG = frozenset({"train.seed", "train.device", "train.log_every", "train.report_to", "data.num_workers",
                        "eval.batch_size", "eval.block_size"})
"""Recipe keys that do not define the configuration: the seed (averaged over) and settings of where and how fast a
run goes and where it logs. Runs differing only in these share a row under ``--group-by config``."""
PATH_KEYS = frozenset({"data.path", "data.image_root", "model.glove_path", "model.bert_path", "model.cnn_weights"})
"""Recipe keys naming files: they set a row apart, but name it only where the rows' labels would otherwise be the
same (the same data in two folders is no setting worth a label)."""
SIMILARITY_NAMES = {"maxmatch": "Maximal Pair Assignment", "chamfer": "Smooth-Chamfer", "mil": "MIL",
                    "topk": "top-k", "sinkhorn": "Sinkhorn", "cosine": "Cosine, one vector (K = 1)",
                    "cosine-vsepp": "Cosine, one vector (K = 1, VSE++: mean-pooled)"}
"""Table 3's names of the similarities."""
REGULARISERS = (("Div", "div_weight"), ("MMD", "mmd_weight"), ("GD", "gd_weight"), ("ISD", "isd_weight"))
"""Table 3's regulariser columns and the loss weight that switches each on."""
EVAL_DIR = "eval"
"""The folder of a run's evaluations (``maxmatch evaluate RUN/best.safetensors`` writes
``RUN/eval/<split>-<protocol>.json``), read with the run."""
_HINT_INPUTS = "pass evaluation JSON files (maxmatch evaluate CKPT --json F), run folders or demo_results.json"


@dataclass
class RunResult:
    """The metrics of one run and where they come from."""

    path: Path
    """The input that gave it (a JSON file or a run folder)."""
    file: Path
    """The file the numbers were read from."""
    metrics: dict[str, float]
    kind: str
    """'evaluate' (an evaluation JSON), 'val' (metrics.jsonl) or 'demo' (demo_results.json)."""
    split: str = ""
    protocol: str = ""
    name: str = ""
    """Recipe name (demo_results.json: the configuration's key)."""
    recipe: dict[str, Any] | None = None
    """The resolved recipe as dotted keys (``loss.similarity`` ...), or None when unknown."""
    seed: int | None = None
    eval_similarity: str | None = None
    """Similarity the evaluation scored with (evaluation JSONs)."""
    extras: dict[str, float] = field(default_factory=dict)
    index: int = 0
    """Position within ``file`` (demo_results.json holds several runs)."""

    @property
    def rescored(self) -> bool:
        """Evaluated with another similarity than the recipe's own inference (``eval.similarity``, else the training
        similarity), i.e. rescored by ``evaluate --similarity``."""
        if not (self.recipe and self.eval_similarity):
            return False
        own = self.recipe.get("eval.similarity") or self.recipe.get("loss.similarity")
        return self.eval_similarity != own

    @property
    def source(self) -> str:
        """Split and protocol of the numbers: ``test/full``, ``testall/coco5k``, or ``dev/last val`` (metrics.jsonl)."""
        return f"{self.split or '?'}/{'last val' if self.kind == 'val' else self.protocol or '?'}"


@dataclass
class Comparison:
    """One row per group of runs: ``frame`` holds the numbers (means, sample stds, ΔRSUM), one row each."""

    frame: pd.DataFrame
    baseline: str
    """Label of the row ΔRSUM is taken against."""
    group_by: str
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- reading


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


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """Nested recipe sections as dotted keys (name and description left out)."""
    return {f"{section}.{key}": value for section, values in recipe.items() if isinstance(values, dict)
            and section != "recipe" for key, value in values.items()}


def _resolved(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe dict with every default filled in; as it is when this version cannot read it."""
    from maxmatch_cli.config.recipes import recipe_from_dict

    try:
        return _flat(recipe_from_dict(raw).to_dict())
    except MaxMatchError:
        return _flat(raw)


def _checkpoint_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe stored in a checkpoint's header (name included), read without loading the tensors."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            return json.loads((fh.metadata() or {})["recipe"])
    except Exception:  # not a checkpoint, truncated, another format: the recipe is simply unknown
        return None


@lru_cache(maxsize=None)
def _shipped() -> dict[str, str]:
    from maxmatch_cli.config.recipes import list_recipes

    return list_recipes()


@lru_cache(maxsize=None)
def _shipped_recipe(name: str) -> dict[str, Any] | None:
    """A shipped recipe, resolved, as dotted keys (None when there is none of that name)."""
    from maxmatch_cli.config.recipes import load_recipe

    if name not in _shipped():
        return None
    try:
        return _flat(load_recipe(name).to_dict())
    except MaxMatchError:
        return None


def _run_recipe(folder: Path) -> tuple[str, dict[str, Any] | None]:
    """A run folder's recipe name and resolved recipe (recipe.toml, else the checkpoint's header)."""
    header = next((r for name in ("best.safetensors", "last.safetensors") if (folder / name).is_file()
                   for r in [_checkpoint_recipe(folder / name)] if r), None)
    recipe = None
    if (folder / "recipe.toml").is_file():
        try:
            with (folder / "recipe.toml").open("rb") as fh:
                recipe = _resolved(tomllib.load(fh))
        except tomllib.TOMLDecodeError:
            recipe = None
    if recipe is None and header:
        recipe = _resolved({k: v for k, v in header.items() if k not in ("name", "description")})
    name = header.get("name") if header else None
    if not name and (folder / "recipe.toml").is_file():  # recipe.toml holds the description, not the name
        try:
            with (folder / "recipe.toml").open("rb") as fh:
                description = (tomllib.load(fh).get("recipe") or {}).get("description")
        except tomllib.TOMLDecodeError:
            description = None
        name = next((n for n, d in _shipped().items() if description and d == description), None)
    return name or folder.name, recipe


def _is_evaluation(raw: Any) -> bool:
    return isinstance(raw, dict) and isinstance(raw.get("metrics"), dict) and "rsum" in raw["metrics"]


def _from_evaluation(path: Path, raw: dict[str, Any], given: Path, run: tuple[str, dict | None] | None) -> RunResult:
    """One evaluation JSON; its recipe from ``run`` (the folder it lies in) or the checkpoint it names."""
    metrics = _metrics(raw["metrics"], str(path))
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
    coco = {k: _number(raw["metrics"][k], k, str(path)) for keys in COCO_EXTRAS.values() for k in keys
            if k in raw["metrics"]}
    return RunResult(path=given, file=path, metrics=metrics, kind="evaluate", split=str(raw.get("split", "")),
                     protocol=str(raw.get("protocol", "")), name=name, recipe=recipe,
                     seed=recipe.get("train.seed") if recipe else None, eval_similarity=similarity, extras=coco)


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


def _from_run_folder(folder: Path, split: str | None) -> RunResult:
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
    return RunResult(path=folder, file=history, metrics=_metrics(record, f"{history} (last validation)", "val/"),
                     kind="val", split=val_split, protocol="", name=name, recipe=recipe,
                     seed=recipe.get("train.seed") if recipe else None)


def _demo_recipe(command: Any) -> dict[str, Any] | None:
    """The resolved recipe of a demo_results.json command line (``maxmatch train --recipe R --set k=v ...``)."""
    from maxmatch_cli.config.recipes import load_recipe, parse_overrides

    if not isinstance(command, str):
        return None
    words = command.split()
    if "--recipe" not in words or words.index("--recipe") + 1 >= len(words):
        return None
    sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
    try:
        return _flat(load_recipe(words[words.index("--recipe") + 1], parse_overrides(sets)).to_dict())
    except MaxMatchError:
        return None


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
            found = [_from_run_folder(given, split)]
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
                found = [_from_evaluation(given, raw, given, None)]
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


# ------------------------------------------------------------------------------------------------- grouping


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
        if r.rescored:
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


def compare_runs(inputs: Sequence[str | Path], *, split: str | None = None, group_by: str = "config",
                 baseline: str | None = None) -> Comparison:
    """:func:`load_results` then :func:`compare`."""
    return compare(load_results(inputs, split=split), group_by=group_by, baseline=baseline)


# ------------------------------------------------------------------------------------------------- rendering


_RECALL_HEADS = {"i2t_r1": "i2t R@1", "i2t_r5": "i2t R@5", "i2t_r10": "i2t R@10", "t2i_r1": "t2i R@1",
                 "t2i_r5": "t2i R@5", "t2i_r10": "t2i R@10", "rsum": "RSUM",
                 "log_var_image": "log Var. image", "log_var_text": "log Var. text"}
_COCO_HEADS = {"map_at_r": "mAP@R", "rprecision": "R-P", "r1": "R@1", "r5": "R@5", "r10": "R@10"}
_COCO_NAMES = {"eccv": "ECCV Caption", "cxc": "CxC"}
_COCO_PREFIX = {"eccv": "ECCV", "cxc": "CxC"}
COCO_RSUM_HEAD = "5K RSUM"
"""The RSUM column of the eccv and cxc layouts: the COCO 5K recalls' sum, not a sum of the columns beside it."""


def _cell(mean: float, std: float, n: int, decimals: int, pm: str) -> str:
    if math.isnan(mean):
        return ""
    if n < 2 or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f}{pm}{std:.{decimals}f}"


def check_display(layout: str = "recall", decimals: int = 1, group_by: str = "config") -> None:
    """Refuse a ``--layout``, ``--decimals`` or ``--group-by`` the table cannot take, before any input is read."""
    if layout not in LAYOUTS:
        raise MaxMatchError(f"unknown --layout '{layout}'", hint=f"use one of: {', '.join(LAYOUTS)}")
    if not 0 <= decimals <= 6:
        raise MaxMatchError(f"--decimals {decimals} is out of range", hint="use 0 to 6 (the paper shows 1)")
    if group_by not in GROUP_BY:
        raise MaxMatchError(f"unknown --group-by '{group_by}'", hint=f"use one of: {', '.join(GROUP_BY)}")


def display_frame(comp: Comparison, layout: str = "recall", decimals: int = 1,
                  latex: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The table as text cells (``layout`` of :data:`LAYOUTS`) and the names of its text (left-aligned) columns.

    ``latex``: cells and headers in LaTeX (``$\\pm$``, ``\\checkmark``); the text columns are left unescaped.
    """
    check_display(layout, decimals)
    f = comp.frame
    pm, dash, check = (r" $\pm$ ", "---", r"\checkmark") if latex else (" ± ", "—", "✓")
    delta_head = r"$\Delta$RSUM" if latex else "ΔRSUM"

    def stat(m: str) -> list[str]:
        return [_cell(a, s, n, decimals, pm) for a, s, n in zip(f[f"{m}_mean"], f[f"{m}_std"], f["n"])]

    deltas = [dash if label == comp.baseline else f"{d:+.{decimals}f}" for label, d in zip(f["label"], f["delta_rsum"])]
    out: dict[str, list[str]] = {}
    if layout == "table3":
        out["Similarity"] = [SIMILARITY_NAMES.get(s, s) or "?" for s in f["similarity"]]
        for head, weight in REGULARISERS:
            out[head] = ["?" if math.isnan(w) else check if w > 0 else "" for w in f[weight]]
        out["RSUM"] = stat("rsum")
        out[delta_head] = deltas
        out["n"] = [str(n) for n in f["n"]]
        return pd.DataFrame(out), ["Similarity"]
    if layout in COCO_EXTRAS:
        keys = COCO_EXTRAS[layout]
        lacking = [label for i, label in enumerate(f["label"])
                   if any(f"{k}_mean" not in f or math.isnan(f.loc[i, f"{k}_mean"]) for k in keys)]
        if lacking:
            raise MaxMatchError(f"--layout {layout}: {len(lacking)} row(s) have no {_COCO_NAMES[layout]} metrics "
                                f"(or NaN ones) "
                                f"({', '.join(repr(x) for x in lacking[:3])}{' ...' if len(lacking) > 3 else ''})",
                                hint=f"compare evaluation files of `maxmatch evaluate CKPT --split testall --protocol "
                                     f"{layout} --json F` (or ensemble), one per run")
        out[""] = list(f["label"])
        out["n"] = [str(n) for n in f["n"]]
        for k in keys:  # eccv_i2t_map_at_r -> "ECCV i2t mAP@R": never mistaken for the COCO 5K recalls
            direction, name = k.split("_", 2)[1:]
            out[f"{_COCO_PREFIX[layout]} {direction} {_COCO_HEADS[name]}"] = stat(k)
        out[COCO_RSUM_HEAD] = stat("rsum")
        out[delta_head] = deltas
        out["source"] = list(f["source"])
        return pd.DataFrame(out), ["", "source"]
    out[""] = list(f["label"])
    out["n"] = [str(n) for n in f["n"]]
    for m in METRICS:
        out[_RECALL_HEADS[m]] = stat(m)
    out[delta_head] = deltas
    for m in EXTRAS:
        if f"{m}_mean" in f:
            out[_RECALL_HEADS[m]] = stat(m)
    out["source"] = list(f["source"])
    return pd.DataFrame(out), ["", "source"]


def _caption(comp: Comparison, layout: str = "recall") -> str:
    note = (f"{_COCO_NAMES[layout]} metrics (%) of the eccv-caption package; {COCO_RSUM_HEAD}: sum of the COCO 5K "
            f"recalls; " if layout in COCO_EXTRAS else "")
    return (f"{note}mean ± sample std over the n runs of a row (n − 1); ΔRSUM against '{comp.baseline}'; "
            f"rows grouped by {comp.group_by}")


def to_markdown(comp: Comparison, layout: str = "recall", decimals: int = 1) -> str:
    """A GitHub Markdown table (text columns left-aligned, numbers right-aligned) and its caption line."""
    table, text_cols = display_frame(comp, layout, decimals)

    def cells(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(table.columns), "| " + " | ".join("---" if c in text_cols else "---:" for c in table.columns) + " |"]
    lines += [cells(row) for row in table.itertuples(index=False)]
    return "\n".join(lines) + f"\n\n{_caption(comp, layout)}\n"


def to_latex(comp: Comparison, layout: str = "recall", decimals: int = 1) -> str:
    """A booktabs ``tabular`` (pandas Styler.to_latex) with the text cells escaped for LaTeX."""
    table, text_cols = display_frame(comp, layout, decimals, latex=True)
    try:
        styler = table.style.hide(axis="index").format(escape="latex", subset=text_cols)
        body = styler.to_latex(hrules=True, column_format="".join("l" if c in text_cols else "r"
                                                                  for c in table.columns))
    except ImportError as exc:  # Styler needs jinja2 (torch brings it)
        raise MaxMatchError(f"LaTeX output needs jinja2 ({exc})", hint="pip install jinja2") from None
    needs = r"\usepackage{booktabs}" + (r" and \usepackage{amssymb} (\checkmark)" if layout == "table3" else "")
    return f"% maxmatch compare: {_caption(comp, layout)}\n% needs {needs}\n{body}"


def to_csv(comp: Comparison) -> str:
    """Every number of :attr:`Comparison.frame` (means, sample stds, ΔRSUM, loss weights), unrounded."""
    return comp.frame.to_csv(index=False)


def rich_table(comp: Comparison, layout: str = "recall", decimals: int = 1, width: int | None = None):
    """The table for the terminal; the best RSUM is bold when there are several rows. With collapse columns
    (``log Var.``) the recalls and the collapse figures are two tables sharing the row labels; a table wider than
    ``width`` (the console's) puts each ``± std`` under its mean, so that nothing is cropped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table, text_cols = display_frame(comp, layout, decimals)
    caption = _caption(comp, layout)  # the source column stays: which split (and protocol) each number is on
    short = {"i2t R@5": "R@5", "i2t R@10": "R@10", "t2i R@5": "R@5", "t2i R@10": "R@10"}  # as recall_table
    if layout in COCO_EXTRAS:  # the title names the family: "CxC i2t R@5" -> "R@5", "ECCV t2i R-P" -> "R-P"
        for col in table.columns:
            if col.startswith(_COCO_PREFIX[layout] + " "):
                head = col.split(" ", 1)[1]
                short[col] = short.get(head, head if head.endswith(("mAP@R", "R@1")) else head.split(" ", 1)[1])
    best = comp.frame["rsum_mean"].idxmax()
    extras = [c for c in table.columns if c.startswith("log Var.")]
    title = f"Comparison · {_COCO_NAMES[layout]}" if layout in COCO_EXTRAS else "Comparison"
    parts = [(title, [c for c in table.columns if c not in extras], None)]
    if extras:
        parts = [("Comparison · Recall@K (%)", parts[0][1], None),
                 ("Comparison · collapse", [c for c in ("", "n") if c in table] + extras, caption)]
    else:
        parts = [(parts[0][0], parts[0][1], caption)]

    def build(title: str, columns: list[str], note: str | None) -> Table:
        one_line = 1 + sum(3 + max([len(short.get(c, c))] + [len(str(v)) for v in table[c]]) for c in columns)
        stacked = width is not None and one_line > width
        out = Table(title=title, title_justify="left", caption=note, caption_justify="left")
        for col in columns:  # labels wrap between overrides, never cut inside one
            longest = max((len(word) for cell in table[col] for word in str(cell).split()), default=0)
            out.add_column(short.get(col, col), justify="left" if col in text_cols else "right", overflow="fold",
                           min_width=min(longest, 40) if col in text_cols else None,
                           style="bold" if col == "" else "cyan" if col in ("RSUM", COCO_RSUM_HEAD) else None)
        for i, row in enumerate(table[columns].itertuples(index=False)):
            out.add_row(*(Text(str(v).replace(" ± ", "\n± ") if stacked and col not in text_cols else str(v),
                               style="bold" if len(table) > 1 and i == best and col in ("RSUM", COCO_RSUM_HEAD)
                               else "")
                          for col, v in zip(columns, row)))
        return out

    tables = [build(*part) for part in parts]
    return tables[0] if len(tables) == 1 else Group(*tables)


def write_comparison(comp: Comparison, *, markdown: Path | None = None, latex: Path | None = None,
                     csv: Path | None = None, figure: Path | None = None, layout: str = "recall",
                     decimals: int = 1) -> list[Path]:
    """Write the requested files atomically (:func:`maxmatch_cli.fileio.write_text`); returns their paths.

    ``figure``: a file stem for the Recall@K bars (:func:`maxmatch_cli.reporting.plots.plot_recall_bars`), written as
    ``figure``.png and ``figure``.pdf; checked for matplotlib before any file is written.
    """
    from maxmatch_cli.fileio import write_text

    if figure is not None and not Path(figure).name:
        raise MaxMatchError(f"--figure {str(figure)!r} names no file", hint="give a file stem, e.g. --figure recall-bars")
    if figure is not None:
        from maxmatch_cli.reporting.plots import require_pyplot

        require_pyplot()
    files = []
    if markdown:
        files.append(write_text(markdown, to_markdown(comp, layout, decimals)))
    if latex:
        files.append(write_text(latex, to_latex(comp, layout, decimals)))
    if csv:
        files.append(write_text(csv, to_csv(comp)))
    if figure is not None:
        from maxmatch_cli.reporting.plots import plot_recall_bars

        files += plot_recall_bars(comp.frame, figure)
    return files
