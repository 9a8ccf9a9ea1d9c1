"""Feature-cache benchmarks: precomp import throughput and peak memory, per-item read latency, extraction speed.

Usage::

    python benchmarks/features.py --workdir /tmp/mmbench                 # full run (~6 GB of scratch files)
    python benchmarks/features.py --workdir /tmp/mmbench --quick         # small sizes, a minute

Prints a markdown table for the ``## Features`` section of ``benchmarks/RESULTS.md``.

* Import: a synthetic COCO-shaped precomp folder (N images x 36 x 2048 float32, 5 captions each, COCO ids) is
  imported in a fresh process that reports its peak resident memory; two sizes show whether memory grows with N.
  A second folder repeats every row five times (the F30K-dev quirk).
* Read latency: one training item (36 x 2048 -> float32) at random indices, from the HDF5 cache and from the
  raw ``.npy`` through ``np.load(mmap_mode="r")``, both with the file's pages evicted first (cold, via
  ``posix_fadvise(DONTNEED)``) and with them cached (warm).
* Extraction: images/s of ResNet-152 grid features (224 px) and Faster R-CNN R50-FPN region features (600 px,
  36 boxes) on 640x480 JPEGs, random weights (speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_precomp(folder: Path, n: int, repeat: bool = False, seed: int = 0) -> None:
    """A COCO-shaped precomp folder written in blocks (never the whole array in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = n * 5 if repeat else n
    arr = np.lib.format.open_memmap(folder / "train_ims.npy", mode="w+", dtype=np.float32, shape=(rows, 36, 2048))
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 256):
        hi = min(n, lo + 256)
        block = np.maximum(rng.standard_normal((hi - lo, 36, 2048), dtype=np.float32), 0)
        if repeat:
            arr[lo * 5 : hi * 5] = np.repeat(block, 5, axis=0)
        else:
            arr[lo:hi] = block
    arr.flush()
    del arr
    with open(folder / "train_caps.txt", "w") as f:
        for i in range(n):
            f.writelines(f"a picture number {i} with caption {k}\n" for k in range(5))
    (folder / "train_ids.txt").write_text("".join(f"{100000 + i}\n" for i in range(n)))


_IMPORT = textwrap.dedent(
    """
    import json, sys, time

    def hwm_kb():  # peak resident set of this process image (reset by exec, unlike ru_maxrss)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    import maxmatch_cli.features.precomp as p
    import torch  # the writer converts with torch: count its import in the baseline
    base = hwm_kb()
    t = time.perf_counter()
    p.import_precomp(sys.argv[1], sys.argv[2], dataset="coco", progress=False, overwrite=True)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "peak_kb": hwm_kb(), "baseline_kb": base}))
    """
)


def bench_import(folder: Path, out: Path, n: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _IMPORT, str(folder), str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MAXMATCH_NO_PROGRESS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    npy = (folder / "train_ims.npy").stat().st_size
    return {"n": n, "images_per_s": n / r["seconds"], "seconds": r["seconds"], "peak_mb": r["peak_kb"] / 1024,
            "baseline_mb": r["baseline_kb"] / 1024, "npy_gb": npy / 1e9, "h5_gb": out.stat().st_size / 1e9}


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd) if os.access(path, os.W_OK) else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_reads(h5: Path, npy: Path, n: int, samples: int = 2000) -> dict:
    from maxmatch_cli.features.store import open_store

    rng = np.random.default_rng(1)
    idx = rng.integers(0, n, size=samples)
    store = open_store(h5)
    mm = np.load(npy, mmap_mode="r")
    out = {}
    for state in ("cold", "warm"):
        if state == "cold":
            _evict(h5)
            _evict(npy)
        t = time.perf_counter()
        for i in idx:
            store.image_features(int(i))
        out[f"h5_{state}_us"] = (time.perf_counter() - t) / samples * 1e6
        t = time.perf_counter()
        for i in idx:
            np.array(mm[int(i)], dtype=np.float32)
        out[f"npy_{state}_us"] = (time.perf_counter() - t) / samples * 1e6
    return out


def bench_extraction(workdir: Path, n_grid: int, n_region: int) -> dict:
    import json as _json

    from PIL import Image

    from maxmatch_cli.features.images import ExtractConfig, extract_from_images

    root = workdir / "jpegs"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = max(n_grid, n_region)
    entries = []
    for k in range(n):
        name = f"{k:06d}.jpg"
        if not (root / name).exists():
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / name, quality=90)
        entries.append({"filename": name, "split": "test", "imgid": k,
                        "sentences": [{"raw": f"caption {j}"} for j in range(5)]})
    results = {}
    for kind, count, config, batch in (
        ("grid", n_grid, ExtractConfig(kind="grid", backbone="resnet152", image_size=224), 16),
        ("region", n_region, ExtractConfig(kind="region", backbone="fasterrcnn_resnet50_fpn", image_size=600), 4),
    ):
        captions = workdir / f"{kind}.json"
        captions.write_text(_json.dumps({"images": entries[:count]}))
        out = workdir / f"{kind}.h5"
        t = time.perf_counter()
        extract_from_images(root, captions, out, config=config, weights="random", device="cpu", batch_size=batch,
                            num_workers=1, overwrite=True, progress=False)
        results[f"{kind}_images_per_s"] = count / (time.perf_counter() - t)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/maxmatch-bench"))
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--skip-extraction", action="store_true")
    args = parser.parse_args()
    sizes = (500, 2000) if args.quick else (2000, 10000)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    import torch

    rows = []
    print(f"# machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for n in sizes:
        folder = wd / f"precomp_{n}"
        if not (folder / "train_ims.npy").exists():
            make_precomp(folder, n)
        rows.append(("plain", bench_import(folder, wd / f"precomp_{n}.h5", n)))
    rep = wd / f"precomp_rep_{sizes[0]}"
    if not (rep / "train_ims.npy").exists():
        make_precomp(rep, sizes[0], repeat=True)
    rows.append(("rows x5", bench_import(rep, wd / "precomp_rep.h5", sizes[0])))

    print("| precomp import | images | .npy | cache | images/s | peak RSS | of which imports |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['n']:,} | {r['npy_gb']:.2f} GB | {r['h5_gb']:.2f} GB | {r['images_per_s']:,.0f} | "
              f"{r['peak_mb']:,.0f} MB | {r['baseline_mb']:,.0f} MB |")

    n = sizes[-1]
    reads = bench_reads(wd / f"precomp_{n}.h5", wd / f"precomp_{n}" / "train_ims.npy", n)
    print()
    print("| read one item (36 x 2048 -> float32), random index | cold page cache | warm page cache |")
    print("|---|---:|---:|")
    print(f"| HDF5 cache (float16, one chunk per image) | {reads['h5_cold_us']:,.0f} us | {reads['h5_warm_us']:,.0f} us |")
    print(f"| raw .npy, np.load(mmap_mode='r') (float32) | {reads['npy_cold_us']:,.0f} us | "
          f"{reads['npy_warm_us']:,.0f} us |")

    if not args.skip_extraction:
        ex = bench_extraction(wd, n_grid=16 if args.quick else 64, n_region=4 if args.quick else 16)
        print()
        print("| extraction on CPU (640x480 JPEGs) | images/s |")
        print("|---|---:|")
        print(f"| grid: ResNet-152, 224 px, 7x7 cells, batch 16 | {ex['grid_images_per_s']:.2f} |")
        print(f"| region: Faster R-CNN R50-FPN, 600 px, 36 boxes, batch 4 | {ex['region_images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
