"""The README's demo figures are exactly what benchmarks/demo_comparison.py recorded from fresh runs.

The script writes every run's metrics to benchmarks/demo_results.json and renders the README block from it; this
test re-renders the block from the JSON and compares, so a hand-edited or stale figure fails here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("demo_comparison", ROOT / "benchmarks" / "demo_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_demo_table_is_the_recorded_runs():
    script = _script()
    results = json.loads(script.RESULTS.read_text())
    readme = script.README.read_text()
    block = readme.split(script.START, 1)[1].split(script.END, 1)[0]
    assert block.strip() == script.render(results).strip()
    # Every configuration has the same seeds, so each row's spread is over the same runs.
    seeds = {c: sorted(r["seed"] for r in results["runs"] if r["config"] == c) for c, _, _ in script.CONFIGS}
    assert len({tuple(s) for s in seeds.values()}) == 1 and len(next(iter(seeds.values()))) >= 3


def test_render_reports_mean_and_sample_std():
    script = _script()
    runs = [{"config": "maxmatch", "seed": s, "train_seconds": 60.0, "steps": 10,
             "metrics": {m: v for m in script.METRICS}, "log_var_image": -1.0, "log_var_text": -2.0}
            for s, v in [(0, 10.0), (1, 20.0), (2, 30.0)]]
    text = script.render({"date": "d", "machine": "m", "torch": "t", "commit": "c", "threads": 1, "runs": runs})
    row = [line for line in text.splitlines() if line.startswith("| MaxMatch + GD")][0]
    assert "| 20.0 ± 10.0 |" in row and "-1.00 ± 0.00" in row  # std of 10, 20, 30 is 10 (n - 1)


def test_merge_keeps_other_configs_with_their_own_provenance():
    script = _script()

    def run(config, rsum, **extra):
        return {"config": config, "seed": 0, "train_seconds": 60.0, "steps": 10,
                "metrics": {m: rsum for m in script.METRICS}, "log_var_image": -1.0, "log_var_text": -2.0, **extra}

    old = {"date": "2026-01-01", "commit": "old1", "machine": "m", "torch": "t", "threads": 1,
           "runs": [run("maxmatch", 1.0), run("mil", 2.0)]}
    fresh = dict(date="2026-02-02", commit="new2", machine="m", torch="t", threads=1)
    merged = script.merge_runs(old, [run("maxmatch", 3.0, metrics_topk={"rsum": 4.0}, **fresh)])
    assert [(r["config"], r["commit"], r["metrics"]["rsum"]) for r in merged] == [("maxmatch", "new2", 3.0),
                                                                                   ("mil", "old1", 2.0)]
    first = script.render({"runs": merged}).splitlines()[0]
    assert "2026-02-02" in first and "commit new2" in first and "for MaxMatch + GD + ISD (`demo`)" in first
    assert "2026-01-01" in first and "commit old1" in first and "for MIL" in first
    row = [line for line in script.render({"runs": merged}).splitlines() if line.startswith("| MaxMatch + GD")][0]
    assert "| 3.0 | 4.0 |" in row  # exact RSUM, then the top-k RSUM of the same runs
    mil = [line for line in script.render({"runs": merged}).splitlines() if line.startswith("| MIL")][0]
    assert "| 2.0 | — |" in mil  # no top-k inference for a model not trained with MaxMatch
