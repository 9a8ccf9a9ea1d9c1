"""Evaluation scoring at scale: every image set against every caption set, each similarity beside its floor.

Random unit-norm sets (K = 4, D = 1024) stand in for encoded embeddings, so this times exactly what `maxmatch
evaluate` does after encoding: maxmatch_cli.evaluation.encoding.score (the caption gallery prepared once, image
blocks of eval.block_size scored by the no-grad slab kernels, results gathered on the CPU).

Floor: the element-level GEMM, (N*K x D) @ (D x 5N*K'), done blockwise exactly as the scoring does it (the same
gallery blocks and image blocks into one reused buffer). Every set similarity needs at least these cosines, so
this is its true floor. --repeat rounds each run the floor and then every row; the table gives each row's median
time and the median over rounds of its ratio to the same round's floor. --autograd-path adds the same scoring
through the autograd path (what evaluation ran before the slab kernels, and what training still runs), for a
before/after in one invocation.

    .venv/bin/python benchmarks/eval_scale.py --device cpu --images 1000,5000 --threads 2
    .venv/bin/python benchmarks/eval_scale.py --device cuda --images 5000 --metrics
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxmatch_cli.evaluation.encoding import score  # noqa: E402
from maxmatch_cli.evaluation.protocols import metrics_for  # noqa: E402
from maxmatch_cli.method.similarity import set_similarity, text_gallery  # noqa: E402
from maxmatch_cli.method.similarity.slabs import SLAB_COLUMNS, SLAB_ENTRIES, image_block  # noqa: E402

KINDS = ("maxmatch", "chamfer", "mil", "topk")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def element_gemm(images: torch.Tensor, captions: torch.Tensor, device: torch.device, block: int) -> None:
    """The floor: every element cosine, blockwise as the slab path computes them, results discarded."""
    gallery = text_gallery(captions.to(device))
    k_img, dim = images.shape[1:]
    bi = image_block(k_img, gallery)
    buffer = torch.empty(min(bi, block) * k_img * gallery.blocks[0].shape[0], device=device)
    for start in range(0, images.shape[0], block):
        rows_all = images[start: start + block].to(device)
        for sub in rows_all.split(bi):
            rows = sub.reshape(-1, dim)
            for cols in gallery.blocks:
                torch.mm(rows, cols.T, out=buffer[: rows.shape[0] * cols.shape[0]].view(rows.shape[0], -1))


def autograd_score(images: torch.Tensor, captions: torch.Tensor, kind: str, device: torch.device,
                   block: int) -> torch.Tensor:
    """Evaluation's scoring through the autograd path, as it ran before the slab kernels."""
    txt = captions.to(device)
    out = torch.empty(images.shape[0], captions.shape[0])
    with torch.enable_grad():  # inputs need no gradient: no graph is built, only the path changes
        for start in range(0, images.shape[0], block):
            img = images[start: start + block].to(device)
            out[start: start + img.shape[0]] = set_similarity(img, txt, kind=kind).float().cpu()
    return out


def block_mib(k: int, block: int, device: torch.device) -> float:
    """The slab path's working set: the cosine buffer of one block (kernel temporaries are a few slabs more)."""
    key = "cuda" if device.type == "cuda" else "cpu"
    bt = max(1, SLAB_COLUMNS[key] // k)
    bi = min(block, max(1, SLAB_ENTRIES[key] // (k * k * bt)))
    return bi * k * k * bt * 4 / 2**20


def run_size(n_images: int, args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n_images, args.k, args.dim, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(5 * n_images, args.k, args.dim, generator=g), dim=-1)
    rows: dict[str, object] = {"element GEMM (floor)": lambda: element_gemm(images, captions, device, args.block)}
    for kind in args.kinds.split(","):
        rows[kind] = lambda kind=kind: score(images, captions, kind, device, args.block)
        if args.autograd_path:
            rows[f"{kind}, autograd path"] = lambda kind=kind: autograd_score(images, captions, kind, device,
                                                                            args.block)
    times: dict[str, list[float]] = {name: [] for name in rows}
    metric_s: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved, so that a busy spell on a shared machine hits every row
        for name, fn in rows.items():
            seconds, sims = timed(fn, device)
            times[name].append(seconds)
            if args.metrics and sims is not None and name not in metric_s:
                metric_s[name] = timed(lambda: metrics_for(sims, "auto", 5), device)[0]
    floors = times["element GEMM (floor)"]
    print(f"\n{n_images:,} images x {5 * n_images:,} captions, K={args.k}, D={args.dim}, eval block "
          f"{args.block}, {_device_name(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeat}; output {n_images * 5 * n_images * 4 / 2**20:,.0f} MiB, slab block "
          f"{block_mib(args.k, args.block, device):.1f} MiB")
    print("| similarity | median s | x element GEMM | runs s |" + (" metrics s |" if args.metrics else ""))
    print("| --- | ---: | ---: | --- |" + (" ---: |" if args.metrics else ""))
    for name, runs in times.items():
        # The ratio is the median of per-run ratios: a row and the floor run back to back share a busy spell.
        ratio = statistics.median(t / f for t, f in zip(runs, floors))
        line = f"| {name} | {statistics.median(runs):.2f} | {ratio:.2f} | {', '.join(f'{t:.2f}' for t in runs)} |"
        if args.metrics:
            line += f" {metric_s[name]:.2f} |" if name in metric_s else " |"
        print(line)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", default="1000", help="image counts, comma-separated (5 captions each)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block", type=int, default=256, help="image rows per scoring call (eval.block_size)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the table shows their median")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--autograd-path", action="store_true", help="also time the autograd path (before)")
    parser.add_argument("--metrics", action="store_true", help="also time the COCO metrics on each result")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        sizes = [int(n) for n in args.images.split(",")]
    except ValueError:
        parser.error(f"--images {args.images!r}: give image counts separated by commas, e.g. 1000,5000")
    if min(sizes) < 1 or args.repeat < 1:
        parser.error("--images counts and --repeat must be at least 1")
    for n_images in sizes:
        run_size(n_images, args, device)


if __name__ == "__main__":
    main()
