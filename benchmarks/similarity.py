"""Benchmark every set similarity against a mean-pooled floor.

For each batch size B and set size K (D = 1024) it times, on random sets:

* ``fwd``: ``set_similarity(img, txt, kind)`` over the B x B batch under ``torch.no_grad()`` (evaluation);
* ``fwd+bwd``: the same with gradients, plus ``.sum().backward()`` (one training step's similarity part).

The floor is the cheapest step with the same inputs and outputs: L2-normalise, one (B*K) x D by D x (B*K) GEMM,
mean over each K x K block, and its backward. Every repeat times the floor and all kinds back to back, and the
ratio reported is the median over repeats of (kind time / floor time in the same repeat), which cancels most of
the drift when other jobs share the machine. Times are medians over the repeats after warm-up.

Usage::

    python benchmarks/similarity.py                 # B in {128, 200}, K in {4, 6, 8, 16}
    python benchmarks/similarity.py --quick         # B = 128, K in {4, 8}
    python benchmarks/similarity.py --kinds maxmatch,chamfer --json results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxmatch_cli.method.assignment import (  # noqa: E402
    ENUMERATION_MAX_MAPS,
    SOLVERS,
    SPLIT_MAX_K,
    max_trace_assignment,
    num_maps,
    resolve_solver,
)
from maxmatch_cli.errors import MaxMatchError  # noqa: E402
from maxmatch_cli.method.similarity import SIMILARITIES, set_similarity  # noqa: E402


def floor_step(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Mean-pooled similarity: normalise, one GEMM, mean over each K x K block -> (B, B)."""
    (b, k, d), bt = img.shape, txt.shape[0]
    flat = F.normalize(img, dim=-1).reshape(b * k, d) @ F.normalize(txt, dim=-1).reshape(bt * k, d).T
    return flat.view(b, k, bt, k).mean((1, 3))


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _timed(fn: Callable[[], None]) -> float:
    """Wall time of fn; on a GPU the queue is drained before and after, so the kernels are inside the window."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def measure(batch: int, k: int, dim: int, kinds: list[str], repeats: int, warmup: int, seed: int = 0) -> list[dict]:
    """Time floor and kinds at one (B, K); returns one record per kind (the floor included)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, k, dim, generator=g).to(DEVICE).requires_grad_()
    txt = torch.randn(batch, k, dim, generator=g).to(DEVICE).requires_grad_()

    def forward(kind: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                floor_step(img, txt) if kind == "floor" else set_similarity(img, txt, kind)
        return run

    def step(kind: str) -> Callable[[], None]:
        def run() -> None:
            img.grad = txt.grad = None
            out = floor_step(img, txt) if kind == "floor" else set_similarity(img, txt, kind)
            out.sum().backward()
        return run

    names = ["floor", *kinds]
    records = []
    for mode, make in (("fwd", forward), ("fwd+bwd", step)):
        fns = {name: make(name) for name in names}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_timed(fn))
        for name in names:
            ratios = [t / f for t, f in zip(times[name], times["floor"])]
            records.append({
                "B": batch, "K": k, "D": dim, "kind": name, "mode": mode,
                "median_ms": 1e3 * statistics.median(times[name]),
                "ratio": statistics.median(ratios),
                "times_ms": [round(1e3 * t, 3) for t in times[name]],
            })
    return records


def measure_solvers(batch: int, ks: list[int], repeats: int) -> list[dict]:
    """Time every applicable assignment solver alone on the B x B cosine matrices of random sets."""
    records = []
    for k in ks:
        g = torch.Generator().manual_seed(k)
        c = torch.randn(batch * k, batch * k, generator=g).view(batch, k, batch, k).permute(0, 2, 1, 3).to(DEVICE)
        for name in SOLVERS:
            if (name == "enumerate" and k > 6) or (name == "split" and k > 8):
                continue  # K! rows (or the split's) would take seconds
            try:
                max_trace_assignment(c, solver=name)
            except MaxMatchError:  # lapx not installed
                continue
            times = [_timed(lambda: max_trace_assignment(c, solver=name)) for _ in range(repeats)]
            records.append({"B": batch, "K": k, "solver": name, "median_ms": 1e3 * statistics.median(times),
                            "min_ms": 1e3 * min(times)})
    return records


def environment() -> dict:
    return {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "enumeration_max_maps": ENUMERATION_MAX_MAPS,
        "split_max_k": SPLIT_MAX_K,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
    }


def render(records: list[dict], env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"set similarity vs mean-pooled floor - {env['device']}, torch {env['torch']}, "
                        f"{env['cpu_count']} CPUs, {env['torch_threads']} threads, {env['date']}")
    for col in ("B", "K", "kind", "solver", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x"):
        table.add_column(col, justify="left" if col in ("kind", "solver") else "right")
    for b, k, kind, solver, fwd, step in _rows(records):
        table.add_row(str(b), str(k), kind, solver, f"{fwd['median_ms']:.2f}", f"{fwd['ratio']:.2f}",
                      f"{step['median_ms']:.2f}", f"{step['ratio']:.2f}")
    Console().print(table)


def _rows(records: list[dict]):
    """(B, K, kind, solver, fwd record, fwd+bwd record) per measured kind, in measurement order."""
    by_key = {(r["B"], r["K"], r["kind"], r["mode"]): r for r in records}
    for (b, k, kind, mode), fwd in by_key.items():
        if mode == "fwd":
            solver = resolve_solver(k, k, device=DEVICE).name if kind == "maxmatch" else ""
            yield b, k, kind, solver, fwd, by_key[(b, k, kind, "fwd+bwd")]


def markdown(records: list[dict]) -> str:
    lines = ["| B | K | kind | solver | fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    for b, k, kind, solver, fwd, step in _rows(records):
        lines.append(f"| {b} | {k} | {kind} | {solver} | {fwd['median_ms']:.2f} | {fwd['ratio']:.2f} | "
                     f"{step['median_ms']:.2f} | {step['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes B (default 128 200)")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="set sizes K (default 4 6 8 16)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding size D")
    parser.add_argument("--kinds", default=",".join(SIMILARITIES), help="comma-separated similarity names")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs")
    parser.add_argument("--quick", action="store_true", help="B=128, K in {4, 8}, 5 repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings synchronise the GPU)")
    parser.add_argument("--solvers", action="store_true",
                        help="time the assignment solvers alone (K = 4..8 and 10, 16) instead of the similarities")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")

    batches = args.batch or ([128] if args.quick else [128, 200])
    ks = args.k or ([4, 8] if args.quick else [4, 6, 8, 16])
    repeats = min(args.repeats, 5) if args.quick else args.repeats
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in SIMILARITIES]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {list(SIMILARITIES)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    if args.solvers:
        rows = []
        for b in batches:
            rows += measure_solvers(b, args.k or [4, 5, 6, 7, 8, 10, 16], repeats)
        for r in rows:
            print(f"B={r['B']:4d} K={r['K']:2d} {r['solver']:10s} median {r['median_ms']:8.2f} ms  "
                  f"min {r['min_ms']:8.2f} ms")
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "solvers": rows}, indent=1))
        return 0
    records = []
    for b in batches:
        for k in ks:
            records += measure(b, k, args.dim, kinds, repeats, args.warmup)
            print(f"done B={b} K={k} (maps {num_maps(k, k)})", file=sys.stderr, flush=True)
    env["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    render(records, env)
    if args.markdown:
        print(markdown(records))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
