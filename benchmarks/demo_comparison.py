"""Regenerate the README's demo figures from fresh runs: MaxMatch vs smooth-Chamfer vs MIL, several seeds.

Each configuration is the `demo` recipe with only the named overrides; each is trained once per seed from scratch,
evaluated on the 1,000-image test split and analysed with `analyze-collapse` (circular variance). The script writes

* ``benchmarks/demo_results.json``: every run's metrics plus date, commit, machine, torch version and the commands;
* the README block between ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->``: mean ± std over seeds.

``--render-only`` re-renders the README block from the JSON (tests/test_readme_figures.py checks that the README
holds exactly that rendering, so a figure in the README is always one these runs gave).

Usage (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/demo_comparison.py --seeds 0 1 2 --jobs 2      # ~1 h on 2 cores
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "demo_results.json"
README = ROOT / "README.md"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"

# (key, label, overrides). GD/ISD off in the baselines, as Table 3's baseline rows.
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("maxmatch", "MaxMatch + GD + ISD (`demo`)", []),
    ("maxmatch-nogdisd", "MaxMatch, no GD/ISD", ["loss.gd_weight=0", "loss.isd_weight=0"]),
    ("chamfer", "smooth-Chamfer (α = 16)", ["loss.similarity=chamfer", "loss.gd_weight=0", "loss.isd_weight=0"]),
    ("mil", "MIL", ["loss.similarity=mil", "loss.gd_weight=0", "loss.isd_weight=0"]),
]
METRICS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def _cli(*args: str, threads: int) -> None:
    env = dict(os.environ, MAXMATCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "maxmatch_cli", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_one(work: Path, features: Path, key: str, overrides: list[str], seed: int, threads: int) -> dict:
    out = work / f"{key}-seed{seed}"
    sets = [a for o in [*overrides, f"train.seed={seed}", f"data.path={features}"] for a in ("--set", o)]
    start = time.time()
    _cli("train", "--recipe", "demo", *sets, "--out", str(out), "--overwrite", threads=threads)
    train_s = time.time() - start
    _cli("evaluate", str(out / "best.safetensors"), "--split", "test", "--json", str(out / "test.json"),
         threads=threads)
    _cli("analyze-collapse", str(out / "best.safetensors"), "--split", "test", "--out", str(out / "collapse"),
         threads=threads)
    metrics = json.loads((out / "test.json").read_text())["metrics"]
    variance = json.loads((out / "collapse" / "collapse.json").read_text())["variance"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["step"]
    return {"config": key, "seed": seed, "train_seconds": round(train_s, 1), "steps": steps,
            "metrics": {m: metrics[m] for m in METRICS},
            "log_var_image": variance["image"]["log_mean"], "log_var_text": variance["text"]["log_mean"]}


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def _fmt(values: list[float], digits: int = 1) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render(results: dict) -> str:
    """The README block: provenance line and one row per configuration (mean ± sample std over seeds)."""
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Measured {results['date']} on {results['machine']} (torch {results['torch']}, commit {results['commit']}, "
        f"{results['threads']} thread(s) per run) by `benchmarks/demo_comparison.py`: {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) per row, mean ± standard deviation; test split, 1,000 images × 5,000 "
        f"captions; log Var. = log of the mean circular variance (Table 4; lower = more collapsed).",
        "",
        "| similarity | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | log Var. image | log Var. text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label, _ in CONFIGS:
        mine = [r for r in runs if r["config"] == key]
        if not mine:
            continue
        cells = [_fmt([r["metrics"][m] for r in mine]) for m in METRICS]
        cells += [_fmt([r["log_var_image"] for r in mine], 2), _fmt([r["log_var_text"] for r in mine], 2)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    minutes = statistics.fmean(r["train_seconds"] for r in runs) / 60
    lines += ["", f"Training took {minutes:.1f} min per run on average ({runs[0]['steps']} steps)."]
    return "\n".join(lines)


def write_readme(block: str) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)")
    parser.add_argument("--work", type=Path, default=ROOT / "demo" / "comparison", help="run folders go here")
    parser.add_argument("--features", type=Path, default=ROOT / "demo" / "features.h5")
    parser.add_argument("--render-only", action="store_true", help="only re-render the README from the JSON")
    args = parser.parse_args()
    if args.render_only:
        write_readme(render(json.loads(RESULTS.read_text())))
        return
    import torch

    commit = _commit()  # the tree the runs use, taken before they start (commits may land while they run)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs)
    if not args.features.exists():
        _cli("extract-features", "synthetic", "demo", "--out", str(args.features), threads=cores)
    jobs = [(key, ov, seed) for seed in args.seeds for key, _, ov in CONFIGS if key in args.configs]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda j: run_one(args.work, args.features, j[0], j[1], j[2], threads), jobs))
        for r in runs:
            print(f"{r['config']:>17} seed {r['seed']}: rsum {r['metrics']['rsum']:.1f}  "
                  f"i2t R@1 {r['metrics']['i2t_r1']:.1f}  ({r['train_seconds'] / 60:.1f} min)")
    results = {
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "split": "test",
        "machine": f"{platform.machine()}, {cores} cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "threads": threads,
        "commands": {key: "maxmatch train --recipe demo " + " ".join(f"--set {o}" for o in ov)
                     for key, _, ov in CONFIGS},
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_readme(render(results))
    print(f"wrote {RESULTS} and the README's demo table")


if __name__ == "__main__":
    main()
