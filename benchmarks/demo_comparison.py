"""Regenerate the README's demo figures from fresh runs: MaxMatch vs smooth-Chamfer vs MIL vs VSE++, several seeds.

Each configuration is the `demo` recipe with only the named overrides; each is trained once per seed from scratch,
evaluated on the 1,000-image test split with its training similarity and analysed with `analyze-collapse`
(circular variance; not for VSE++, whose one vector per item has none). Runs trained with MaxMatch are also
scored with the paper's §3.4 inference (`--similarity topk`), so the table shows exact and top-k RSUM side by
side. The script writes

* ``benchmarks/demo_results.json``: every run's metrics with its own date, commit, machine, torch version and
  threads, plus the command of each configuration;
* the README block between ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->``: mean ± std over seeds.

``--merge`` keeps the JSON's runs of the configurations not trained now (each with its own provenance) and
replaces those that are. ``--render-only`` re-renders the README block from the JSON
(tests/test_readme_figures.py checks that the README holds exactly that rendering, so a figure in the README is
always one these runs gave).

Usage (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/demo_comparison.py --seeds 0 1 2 --jobs 2      # ~1 h on 2 cores
    .venv/bin/python benchmarks/demo_comparison.py --seeds 0 1 2 --configs vsepp maxmatch --merge --jobs 2
    .venv/bin/python benchmarks/demo_comparison.py --render-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from maxmatch_cli.fileio import write_text  # noqa: E402  (atomic: temp file + rename)

RESULTS = ROOT / "benchmarks" / "demo_results.json"
README = ROOT / "README.md"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"

# VSE++ (Faghri et al. 2018): one vector per item (K = 1) from the encoders' pooled features, the image one a
# linear map of the mean-pooled regions, cosine similarity (MIL over a 1 x 1 matrix is the cosine), margin 0.2 and
# hardest negatives, no set losses. It keeps the demo's two warm-up epochs over all negatives like every other row
# (the demo recipe's note: hardest negatives from the first step leave the small models at chance on this data).
VSEPP = ["model.set_head=pooled", "model.num_embeds=1", "model.image_pool=mean", "model.image_mlp=false",
         "loss.similarity=mil", "loss.margin=0.2", "loss.hardest_negatives=true", "loss.gd_weight=0",
         "loss.isd_weight=0", "loss.mmd_weight=0", "loss.div_weight=0", "loss.contrastive_weight=0"]

# The same single vector from the set models' own image encoder (fc + MLP residual per region, max-pooled: the global
# feature their sets are offset from), so that the gap to the set rows is the set, not VSE++'s linear encoder.
ONE_VECTOR = [o for o in VSEPP if not o.startswith(("model.image_pool=", "model.image_mlp="))]

# (key, label, overrides). GD/ISD off in the baselines, as Table 3's baseline rows.
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("maxmatch", "MaxMatch + GD + ISD (`demo`)", []),
    ("maxmatch-nogdisd", "MaxMatch, no GD/ISD", ["loss.gd_weight=0", "loss.isd_weight=0"]),
    ("chamfer", "smooth-Chamfer (α = 16)", ["loss.similarity=chamfer", "loss.gd_weight=0", "loss.isd_weight=0"]),
    ("mil", "MIL", ["loss.similarity=mil", "loss.gd_weight=0", "loss.isd_weight=0"]),
    ("vsepp", "VSE++ (one vector, K = 1: linear map of the mean-pooled regions)", VSEPP),
    ("one-vector", "one vector, the set models' encoder (K = 1: max-pooled fc + MLP)", ONE_VECTOR),
]
METRICS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
PROVENANCE = ("date", "commit", "machine", "torch", "threads")
"""What each run records about where it ran (older files keep these once, at the top level)."""


def training_similarity(overrides: list[str]) -> str:
    """The loss.similarity a configuration trains with (the demo recipe's is maxmatch)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("loss.similarity=")]
    return given[-1] if given else "maxmatch"


def _cli(*args: str, threads: int) -> None:
    env = dict(os.environ, MAXMATCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "maxmatch_cli", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _evaluate(out: Path, similarity: str, threads: int) -> dict:
    target = out / f"test-{similarity}.json"
    _cli("evaluate", str(out / "best.safetensors"), "--split", "test", "--similarity", similarity,
         "--json", str(target), threads=threads)
    metrics = json.loads(target.read_text())["metrics"]
    return {m: metrics[m] for m in METRICS}


def run_one(work: Path, features: Path, key: str, overrides: list[str], seed: int, threads: int) -> dict:
    out = work / f"{key}-seed{seed}"
    sets = [a for o in [*overrides, f"train.seed={seed}", f"data.path={features}"] for a in ("--set", o)]
    start = time.time()
    _cli("train", "--recipe", "demo", *sets, "--out", str(out), "--overwrite", threads=threads)
    train_s = time.time() - start
    similarity = training_similarity(overrides)
    run = {"config": key, "seed": seed, "train_seconds": round(train_s, 1), "steps": None,
           "metrics": _evaluate(out, similarity, threads), "log_var_image": None, "log_var_text": None}
    if similarity == "maxmatch":  # §3.4: the paper's inference, top-k of the K x K cosines without matching
        run["metrics_topk"] = _evaluate(out, "topk", threads)
    if "model.num_embeds=1" not in overrides:  # one vector per item has no circular variance
        _cli("analyze-collapse", str(out / "best.safetensors"), "--split", "test", "--out", str(out / "collapse"),
             threads=threads)
        variance = json.loads((out / "collapse" / "collapse.json").read_text())["variance"]
        run["log_var_image"], run["log_var_text"] = variance["image"]["log_mean"], variance["text"]["log_mean"]
    run["steps"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["step"]
    return run


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def with_provenance(results: dict) -> list[dict]:
    """Every run with its own date, commit, machine, torch and threads (a file's top-level values fill gaps)."""
    return [{**{k: results[k] for k in PROVENANCE if k in results}, **run} for run in results["runs"]]


def _provenance_line(runs: list[dict]) -> str:
    """Where and when the runs were measured: one clause per distinct (date, commit, ...) naming its rows."""
    labels = {key: label for key, label, _ in CONFIGS}
    groups: dict[tuple, list[str]] = {}
    for run in runs:
        origin = tuple(run.get(k) for k in PROVENANCE)
        names = groups.setdefault(origin, [])
        if labels.get(run["config"], run["config"]) not in names:
            names.append(labels.get(run["config"], run["config"]))
    clauses = []
    for (date, commit, machine, torch_version, threads), names in groups.items():
        where = (f"{date} on {machine} (torch {torch_version}, commit {commit}, {threads} thread(s) per run)")
        clauses.append(where if len(groups) == 1 else f"{where} for {', '.join(names)}")
    return "Measured " + "; ".join(clauses)


def render(results: dict) -> str:
    """The README block: provenance line and one row per configuration (mean ± sample std over seeds)."""
    runs = with_provenance(results)
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"{_provenance_line(runs)} by `benchmarks/demo_comparison.py`: {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) per row, mean ± standard deviation; test split, 1,000 images × 5,000 "
        f"captions, scored with the training similarity (MaxMatch: the exact assignment); RSUM top-k = the same "
        f"MaxMatch runs scored with §3.4's inference (top-k of the K × K cosines, k = K = 4, no matching); "
        f"log Var. = log of the mean circular variance (Table 4; lower = more collapsed; none for one vector).",
        "",
        "| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | RSUM top-k | log Var. image | log Var. text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label, _ in CONFIGS:
        mine = [r for r in runs if r["config"] == key]
        if not mine:
            continue
        cells = [_fmt([r["metrics"][m] for r in mine]) for m in METRICS]
        cells.append(_fmt([r["metrics_topk"]["rsum"] for r in mine if r.get("metrics_topk")]))
        cells += [_fmt([r[k] for r in mine if r.get(k) is not None], 2) for k in ("log_var_image", "log_var_text")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Training took " + ", ".join(
        f"{statistics.fmean(r['train_seconds'] for r in runs if r['config'] == key) / 60:.1f} min"
        f" ({label.split(' (')[0]})" for key, label, _ in CONFIGS if any(r["config"] == key for r in runs))
        + f" per run on average ({runs[0]['steps']} steps)."]
    return "\n".join(lines)


def write_readme(block: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(README, f"{head}{START}\n{block}\n{END}{tail}")


def merge_runs(old: dict | None, new_runs: list[dict]) -> list[dict]:
    """The new runs plus the old file's runs of configurations not trained now (each with its provenance)."""
    if old is None:
        return new_runs
    fresh = {r["config"] for r in new_runs}
    kept = [r for r in with_provenance(old) if r["config"] not in fresh]
    order = [key for key, _, _ in CONFIGS]
    return sorted(kept + new_runs, key=lambda r: (r["seed"], order.index(r["config"]) if r["config"] in order else 99))


def _train_all(args, provenance: dict, threads: int) -> list[dict]:
    """Every (configuration, seed) run, in parallel; each finished run is also appended to WORK/partial.jsonl."""
    jobs = [(key, ov, seed) for seed in args.seeds for key, _, ov in CONFIGS if key in args.configs]
    args.work.mkdir(parents=True, exist_ok=True)
    partial = args.work / "partial.jsonl"
    runs = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args.work, args.features, key, ov, seed, threads) for key, ov, seed in jobs]
        for future in as_completed(futures):
            run = {**future.result(), **provenance}
            runs.append(run)
            with partial.open("a") as fh:
                fh.write(json.dumps(run) + "\n")
            topk = f"  top-k rsum {run['metrics_topk']['rsum']:.1f}" if run.get("metrics_topk") else ""
            print(f"{run['config']:>17} seed {run['seed']}: rsum {run['metrics']['rsum']:.1f}{topk}  "
                  f"i2t R@1 {run['metrics']['i2t_r1']:.1f}  ({run['train_seconds'] / 60:.1f} min)", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)")
    parser.add_argument("--work", type=Path, default=ROOT / "demo" / "comparison", help="run folders go here")
    parser.add_argument("--features", type=Path, default=ROOT / "demo" / "features.h5")
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing JSON's runs of the configurations not trained now")
    parser.add_argument("--render-only", action="store_true", help="only re-render the README from the JSON")
    args = parser.parse_args()
    if args.render_only:
        write_readme(render(json.loads(RESULTS.read_text())))
        return
    import torch

    old = json.loads(RESULTS.read_text()) if args.merge and RESULTS.exists() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs)
    provenance = {  # the tree the runs use, taken before they start (commits may land while they run)
        "date": dt.date.today().isoformat(), "commit": _commit(),
        "machine": f"{platform.machine()}, {cores} cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__, "threads": threads}
    if not args.features.exists():
        _cli("extract-features", "synthetic", "demo", "--out", str(args.features), threads=cores)
    runs = merge_runs(old, _train_all(args, provenance, threads))
    results = {"split": "test",
               "commands": {key: "maxmatch train --recipe demo " + " ".join(f"--set {o}" for o in ov)
                            for key, _, ov in CONFIGS},
               "runs": runs}
    write_text(RESULTS, json.dumps(results, indent=2) + "\n")
    write_readme(render(results))
    print(f"wrote {RESULTS} and the README's demo table")


if __name__ == "__main__":
    main()
