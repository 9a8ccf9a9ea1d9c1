"""Training throughput of the demo recipe: images/s and captions (pairs)/s, for this tree or another checkout.

Runs ``maxmatch train --recipe demo`` for a fixed number of steps without validation, from the source tree given
by ``--src`` (default: this one), and reads the throughput from the run's own log lines (printed every
``train.log_every`` steps when stdout is not a terminal). Median of ``--repeats`` runs. With ``--src`` pointing at
a checkout of an older commit (``git worktree add /tmp/old COMMIT``) it measures before/after on the same machine
under the same conditions:

    .venv/bin/python benchmarks/train_speed.py --data demo/features.h5 --steps 60
    .venv/bin/python benchmarks/train_speed.py --data demo/features.h5 --steps 60 --src /tmp/old

An old caption-centric engine counts pairs (one image encoded per caption); image-centric batches encode each image
once for its 5 captions, so captions/s = 5 x images/s there.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"step (\d+)/\d+ .* ([\d,]+) (images|pairs)/s")


def run(src: Path, data: Path, steps: int, threads: int, extra: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(src), MAXMATCH_THREADS=str(threads), COLUMNS="200")
        sets = ["data.val_split=", f"data.path={data}", f"train.max_steps={steps}", f"train.log_every={steps // 2}",
                *extra]
        cmd = [sys.executable, "-m", "maxmatch_cli", "train", "--recipe", "demo",
               *[a for s in sets for a in ("--set", s)], "--out", str(Path(tmp) / "run")]
        out = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        rates = RATE.findall(out.stdout)
        if not rates:
            raise SystemExit(f"no throughput line in the output of {' '.join(cmd)}:\n{out.stdout[-2000:]}")
        _, rate, unit = rates[-1]
        return float(rate.replace(",", "")), unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="source tree to run (default: this one)")
    parser.add_argument("--data", type=Path, default=ROOT / "demo" / "features.h5")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else (os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more recipe overrides")
    args = parser.parse_args()
    results = [run(args.src.resolve(), args.data.resolve(), args.steps, args.threads, args.extra)
               for _ in range(args.repeats)]
    unit = results[0][1]
    rate = statistics.median(r for r, _ in results)
    images, captions = (rate, 5 * rate) if unit == "images" else (rate, rate)
    print(f"{args.src}: {unit}-batched demo recipe, {args.steps} steps, {args.threads} threads, median of "
          f"{args.repeats} ({', '.join(f'{r:,.0f}' for r, _ in results)} {unit}/s)")
    print(f"| images/s | captions/s |\n| ---: | ---: |\n| {images:,.0f} | {captions:,.0f} |")


if __name__ == "__main__":
    main()
