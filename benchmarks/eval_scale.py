"""Evaluation at COCO 5K scale: scoring 5,000 image sets against 25,000 caption sets, plus the metrics.

Random unit-norm sets (K = 4, D = 1024) stand in for encoded embeddings, so this times exactly what `maxmatch
evaluate` does after encoding: blockwise set similarities on the device (maxmatch_cli.evaluation.encoding.score), the
COCO 5K metrics and the five 1K folds. Floor: the mean-pooled similarity (one GEMM per block).

    .venv/bin/python benchmarks/eval_scale.py --device cuda
    .venv/bin/python benchmarks/eval_scale.py --device cpu --images 1000     # F30K scale on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxmatch_cli.evaluation.encoding import score  # noqa: E402
from maxmatch_cli.evaluation.protocols import metrics_for  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block", type=int, default=256, help="image rows per block (eval.block_size)")
    parser.add_argument("--kinds", default="floor,maxmatch,chamfer,mil")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.k, args.dim, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(5 * args.images, args.k, args.dim, generator=g), dim=-1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"evaluation at {args.images:,} images x {5 * args.images:,} captions, K={args.k}, D={args.dim}, "
          f"block {args.block}, {name}, torch {torch.__version__}")
    print("| similarity | scoring s | x floor | metrics s |")
    print("| --- | ---: | ---: | ---: |")
    floor_s = None
    for kind in args.kinds.split(","):
        if kind == "floor":
            def run():
                txt = captions.mean(1).to(device)
                out = torch.empty(args.images, captions.shape[0])
                for s in range(0, args.images, args.block):
                    out[s: s + args.block] = (images[s: s + args.block].mean(1).to(device) @ txt.T).float().cpu()
                return out
        else:
            def run(kind=kind):
                return score(images, captions, kind, device, args.block)
        seconds, sims = timed(run, device)
        metric_s, _ = timed(lambda: metrics_for(sims, "auto", 5), device)
        floor_s = floor_s or seconds
        print(f"| {kind} | {seconds:.2f} | {seconds / floor_s:.1f} | {metric_s:.2f} |")


if __name__ == "__main__":
    main()
