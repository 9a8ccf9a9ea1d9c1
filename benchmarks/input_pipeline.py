"""How many images per second the training input pipeline delivers, by DataLoader worker count.

Reads a feature store with BUTD shapes (36 x 2048 float16 regions per image; the demo store is one) the way
training does: image-centric batches of B images with their 5 captions, region and word dropout, tokenised
captions, padded tensors (pinned when CUDA is available). Nothing is computed on the batches, so the figure is
the ceiling the input side sets; compare it with the images/s a training run reports (its progress bar, or
benchmarks/train_speed.py) to see whether a GPU would wait for data. Floor: 0 workers (reading in the main
process); the table gives each worker count's speed-up over it, median of several runs.

    .venv/bin/maxmatch extract-features synthetic demo --out demo/features.h5
    .venv/bin/python benchmarks/input_pipeline.py --data demo/features.h5 --workers 0 1 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxmatch_cli.data.datasets import ImageCaptionsDataset  # noqa: E402
from maxmatch_cli.data.images import StoredFeatures  # noqa: E402
from maxmatch_cli.data.samplers import EpochSampler  # noqa: E402
from maxmatch_cli.data.tokenizers import Vocab  # noqa: E402
from maxmatch_cli.features.store import open_store  # noqa: E402


def measure(path: Path, workers: int, batch: int, n_batches: int, seed: int) -> float:
    """Images per second over n_batches batches (DataLoader start-up included, as each epoch pays it)."""
    store = open_store(path)
    _, captions = store.split("train")
    vocab = Vocab.build(store.captions_text(captions[:20000]), min_count=4)
    ds = ImageCaptionsDataset(store, "train", vocab, captions_per_image=5, train=True, word_dropout=0.2,
                              image_source=StoredFeatures(store, region_dropout=0.2), seed=seed)
    sampler = EpochSampler(len(ds), batch, seed=seed)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=ds.collate, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True)
    n_batches = min(n_batches, sampler.steps_per_epoch)
    start = time.perf_counter()
    for i, b in enumerate(loader):
        if i + 1 >= n_batches:
            break
    return n_batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("demo/features.h5"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--batch", type=int, default=200, help="images per batch (paper: 200)")
    parser.add_argument("--batches", type=int, default=10, help="batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} does not exist: make it with "
                         f"`maxmatch extract-features synthetic demo --out {args.data}`")
    rates = {w: [measure(args.data, w, args.batch, args.batches, seed=r) for r in range(args.repeats)]
             for w in args.workers}
    floor = statistics.median(rates[args.workers[0]])
    print(f"input pipeline, {args.data.name}: {args.batch} images x 5 captions a batch, {args.batches} batches, "
          f"median of {args.repeats}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{dt.date.today().isoformat()}")
    print(f"| workers | images/s | captions/s | x floor ({args.workers[0]} workers) |")
    print("| ---: | ---: | ---: | ---: |")
    for w, r in rates.items():
        med = statistics.median(r)
        print(f"| {w} | {med:,.0f} | {5 * med:,.0f} | {med / floor:.2f} |")


if __name__ == "__main__":
    main()
