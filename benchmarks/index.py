"""Indexed search (faiss candidates + exact re-ranking) vs exhaustive exact MaxMatch on synthetic sets.

Measures, for a gallery of ``--items`` sets (default 100,000, K = 4, D = 256: the demo model's shape):
recall@10 of the faiss engine against the exact top-10, queries/s of both engines, bytes per item of the index
files, and build time. Both engines are the code `maxmatch query` runs (maxmatch_cli.retrieval.index.search_sets over a
float16 memory-mapped sets.npy, and build_element_index for the faiss part); only the encoder is left out.

Synthetic data with the structure retrieval has (isotropic random sets would make every score a near-tie):
``--concepts`` unit "concept" vectors; each gallery element is a concept plus noise (cosine ≈ 0.8 to it), the K
elements of an item drawn from distinct concepts. A query describes a target item: each of its elements is, with
probability 0.75, a noisier copy of a different element of the target, otherwise a noisy random concept (a
caption mentions some of the image's objects, and words that match none). ``--isotropic`` uses plain random
unit vectors instead, the hard case for any element-level candidate generator.

    .venv/bin/python benchmarks/index.py                       # 100,000 items, 200 queries, table on stdout
    .venv/bin/python benchmarks/index.py --items 20000 --json /tmp/index.json
    .venv/bin/python benchmarks/index.py --shards 4 --settings auto:32   # also the gallery in 4 shards
    .venv/bin/python benchmarks/index.py --milvus auto:32,1024:32        # also milvus-lite (the milvus extra)

A setting ``auto:P`` searches at the default depth (maxmatch_cli.retrieval.index.default_candidates of the gallery, or of
each shard). ``--shards N`` also splits the gallery into N contiguous shards, each with its own faiss element
index (as ``maxmatch index --shard I/N`` builds them), and searches them as ``maxmatch query`` searches a sharded
index (maxmatch_cli.retrieval.index.fan_out: one search per shard, merged): recall against the same exact top-10 and
queries/s, "× exact" against the unsharded exhaustive engine.

``--milvus C:P,...`` also inserts the gallery into a milvus-lite collection (``FILE.db`` in the work folder, as
``maxmatch index --engine milvus`` fills it: one row per element, index type by size or ``--milvus-index-type``)
and searches it as ``maxmatch query`` does (candidates from Milvus, element vectors fetched back, exact
re-ranking): build seconds (insert + index), bytes on disk (the .db folder), recall@10 and queries/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxmatch_cli.retrieval.index import (ELEMENTS_FILE, build_element_index, default_candidates,  # noqa: E402
                                default_nlist, faiss_candidates, fan_out, read_element_index, search_sets,
                                shard_rows)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_gallery(path: Path, n: int, k: int, d: int, concepts: np.ndarray | None, rng: np.random.Generator,
                 chunk: int = 8192) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Write (n, K, D) float16 unit sets to ``path``; returns the memmap, each item's concept ids, write seconds."""
    sets = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, k, d))
    ids = None if concepts is None else np.empty((n, k), dtype=np.int64)
    write_s = 0.0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if concepts is None:
            block = _unit(rng.standard_normal((m, k, d)).astype(np.float32))
        else:
            picked = np.stack([rng.choice(len(concepts), size=k, replace=False) for _ in range(m)])
            ids[start: start + m] = picked
            noise = rng.standard_normal((m, k, d)).astype(np.float32) * (0.75 / np.sqrt(d))
            block = _unit(concepts[picked] + noise)
        t = time.perf_counter()
        sets[start: start + m] = block.astype(np.float16)
        write_s += time.perf_counter() - t
    sets.flush()
    return np.load(path, mmap_mode="r"), ids, write_s


def make_queries(sets: np.ndarray, concepts: np.ndarray | None, q: int, rng: np.random.Generator) -> torch.Tensor:
    n, k, d = sets.shape
    if concepts is None:
        return torch.from_numpy(_unit(rng.standard_normal((q, k, d)).astype(np.float32)))
    targets = rng.choice(n, size=q, replace=False)
    out = np.empty((q, k, d), dtype=np.float32)
    for i, t in enumerate(targets):
        order = rng.permutation(k)
        for j in range(k):
            base = sets[t, order[j]].astype(np.float32) if rng.random() < 0.75 else \
                concepts[rng.integers(len(concepts))]
            out[i, j] = base + rng.standard_normal(d).astype(np.float32) * (1.0 / np.sqrt(d))
    return torch.from_numpy(_unit(out))


def timed(fn, repeats: int = 1):
    """(median wall time of ``repeats`` runs, the last output)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def memory_mib() -> dict[str, float]:
    """This process's resident memory (MiB): anonymous (what it allocated) and file-backed (memory-mapped index
    pages the operating system holds for it and may drop again)."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def milvus_rows(args, sets: np.ndarray, queries: torch.Tensor, workdir: Path, recall_of) -> dict:
    """Build the gallery into a milvus-lite collection as ``maxmatch index --engine milvus`` does, and search it at
    each ``--milvus`` depth; returns the timings, the bytes on disk and the table rows."""
    from milvus_lite import __version__ as lite_version

    from maxmatch_cli.retrieval.index.milvus import building as mb, search as ms

    uri, n = workdir / "gallery.db", args.items
    identity = {"build": f"bench-{args.seed}-{n}", "fingerprint": "benchmark", "K": args.k, "D": args.dim}
    real_index = mb._make_index
    index_s = []

    def timed_index(*a, **kw):  # the index build and load, apart from the inserts
        start = time.perf_counter()
        out = real_index(*a, **kw)
        index_s.append(time.perf_counter() - start)
        return out

    mb._make_index = timed_index
    try:
        build_s, record = timed(lambda: mb.build_collection(
            sets, list(range(n)), None, workdir / "milvus.json", uri=str(uri), collection="bench", identity=identity,
            index_type=args.milvus_index_type, batch_size=mb.INSERT_BATCH, overwrite=True))
    finally:
        mb._make_index = real_index
    coll = ms.open_collection(record, n, args.k, args.dim, "benchmark", workdir)
    n_timed = min(args.milvus_queries or args.queries, args.queries)
    rows = []
    for setting in args.milvus.split(","):
        c, p = setting.split(":")
        candidates, nprobe = (None if c == "auto" else int(c)), int(p)
        fetched, _ = ms.milvus_depth(coll, candidates, nprobe)
        pools = ms.milvus_candidates(coll, queries, candidates, nprobe)
        found = search_sets(sets, queries, 10, "maxmatch", engine="milvus", element_index=coll,
                            candidates=candidates, nprobe=nprobe)
        seconds, _ = timed(lambda: search_sets(sets, queries[:n_timed], 10, "maxmatch", engine="milvus",
                                               element_index=coll, candidates=candidates, nprobe=nprobe),
                           args.repeats)
        rows.append({"engine": "milvus-lite", "shards": 1, "candidates": fetched, "auto": candidates is None,
                     "nprobe": nprobe if record["index_type"].startswith("IVF") else None,
                     "recall@10": recall_of(found), "queries_per_s": n_timed / seconds,
                     "mean_pool": float(np.mean([len(p) for p in pools]))})
    disk = sum(f.stat().st_size for f in uri.rglob("*") if f.is_file())
    if args.workdir is None:
        import shutil

        shutil.rmtree(uri, ignore_errors=True)
    return {"milvus_lite": lite_version, "insert_s": build_s - sum(index_s), "index_s": sum(index_s),
            "build_s": build_s, "index_type": record["index_type"], "index_params": record["index_params"],
            "bytes": disk, "queries_timed": n_timed, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=4, help="elements per set (K)")
    parser.add_argument("--dim", type=int, default=256, help="element size (D)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--concepts", type=int, default=4096)
    parser.add_argument("--isotropic", action="store_true", help="random unit sets instead of concept structure")
    parser.add_argument("--nlist", type=int, default=None, help="faiss inverted lists (default: sqrt of elements)")
    parser.add_argument("--settings", default="16:4,16:16,64:16,64:64,256:64",
                        help="faiss candidates:nprobe pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each search (the median is kept)")
    parser.add_argument("--exact-queries", type=int, default=None,
                        help="queries in the timed runs of the exact engine (default: all; its first run, over "
                             "all queries, is the ground truth)")
    parser.add_argument("--shards", type=int, default=1,
                        help="also search the gallery split into this many shards (each its own element index)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the index files (default: tmp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--milvus", default="",
                        help="also milvus-lite: candidates:nprobe pairs (auto: the default depth), comma-separated")
    parser.add_argument("--milvus-index-type", default=None, help="milvus index type (default: by size)")
    parser.add_argument("--milvus-queries", type=int, default=None,
                        help="queries in milvus's timed runs (default: all; recall is over all queries)")
    args = parser.parse_args()
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")

    import faiss

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maxmatch-index-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    concepts = None if args.isotropic else _unit(rng.standard_normal((args.concepts, args.dim)).astype(np.float32))
    load_before = os.getloadavg()[0]
    sets, _, write_s = make_gallery(workdir / "sets.npy", args.items, args.k, args.dim, concepts, rng)
    queries = make_queries(sets, concepts, args.queries, rng)
    sets_bytes = (workdir / "sets.npy").stat().st_size

    build_s, info = timed(lambda: build_element_index(sets, workdir / ELEMENTS_FILE, args.nlist, seed=args.seed))
    faiss_bytes = (workdir / ELEMENTS_FILE).stat().st_size
    del sets  # from here on, the index as `maxmatch query` opens it: both files memory-mapped
    sets = np.load(workdir / "sets.npy", mmap_mode="r")
    before = memory_mib()
    element_index = read_element_index(workdir / ELEMENTS_FILE)
    opened = memory_mib()

    search_sets(sets, queries[:2], 10, "maxmatch", engine="faiss", element_index=element_index)  # warm-up
    start = time.perf_counter()
    truth = search_sets(sets, queries, 10, "maxmatch", engine="exact").indices.numpy()
    exact_times = [time.perf_counter() - start]
    n_timed = min(args.exact_queries or args.queries, args.queries)
    for _ in range(args.repeats - 1):
        exact_times.append(timed(lambda: search_sets(sets, queries[:n_timed], 10, "maxmatch", engine="exact"))[0]
                           * args.queries / n_timed)
    exact_s = float(np.median(exact_times))
    rows = [{"engine": "exact", "candidates": None, "nprobe": None, "recall@10": 1.0,
             "queries_per_s": args.queries / exact_s, "mean_pool": args.items}]
    settings = [(None if c == "auto" else int(c), int(p))
                for c, p in (setting.split(":") for setting in args.settings.split(","))]

    def recall_of(found) -> float:
        got = found.indices.numpy()
        return float(np.mean([len(set(t) & set(g[g >= 0])) / len(t) for t, g in zip(truth, got)]))

    for candidates, nprobe in settings:
        pool_sizes = [len(p) for p in faiss_candidates(element_index, queries, args.k, candidates, nprobe)]
        seconds, found = timed(lambda: search_sets(sets, queries, 10, "maxmatch", engine="faiss",
                                                   element_index=element_index, candidates=candidates,
                                                   nprobe=nprobe), args.repeats)
        rows.append({"engine": "faiss", "shards": 1, "candidates": candidates or default_candidates(args.items),
                     "auto": candidates is None, "nprobe": nprobe, "recall@10": recall_of(found),
                     "queries_per_s": args.queries / seconds, "mean_pool": float(np.mean(pool_sizes))})

    if args.shards > 1:  # the same gallery in shards: row ranges of the one sets.npy, one element index each
        bounds = [shard_rows(args.items, i, args.shards) for i in range(args.shards)]
        shard_build = []
        parts = []
        for i, (lo, hi) in enumerate(bounds):
            seconds, _ = timed(lambda: build_element_index(sets[lo:hi], workdir / f"shard-{i}.faiss", None,
                                                           seed=args.seed))
            shard_build.append(seconds)
            parts.append((sets[lo:hi], read_element_index(workdir / f"shard-{i}.faiss")))
        offsets = [lo for lo, _ in bounds]
        exact_searches = [lambda part=part: (search_sets(part[0], queries, 10, "maxmatch", engine="exact"), "exact")
                          for part in parts]
        seconds, found = timed(lambda: fan_out(exact_searches, offsets, 10)[0], args.repeats)
        rows.append({"engine": "exact", "shards": args.shards, "candidates": None, "nprobe": None,
                     "recall@10": recall_of(found), "queries_per_s": args.queries / seconds,
                     "mean_pool": args.items})
        for candidates, nprobe in settings:
            searches = [lambda part=part, c=candidates, p=nprobe: (
                search_sets(part[0], queries, 10, "maxmatch", engine="faiss", element_index=part[1], candidates=c,
                            nprobe=p), "faiss") for part in parts]
            pool_sizes = np.sum([[len(p) for p in faiss_candidates(ix, queries, args.k, candidates, nprobe)]
                                 for _, ix in parts], axis=0)
            seconds, found = timed(lambda: fan_out(searches, offsets, 10)[0], args.repeats)
            per_shard = sorted({default_candidates(hi - lo) for lo, hi in bounds})  # shard sizes differ by <= 1
            rows.append({"engine": "faiss", "shards": args.shards,
                         "candidates": candidates or "/".join(f"{c:,}" for c in per_shard),
                         "auto": candidates is None, "nprobe": nprobe, "recall@10": recall_of(found),
                         "queries_per_s": args.queries / seconds, "mean_pool": float(np.mean(pool_sizes))})
        del parts
    milvus = milvus_rows(args, sets, queries, workdir, recall_of) if args.milvus else None
    rows += milvus["rows"] if milvus else []
    after = memory_mib()

    record = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "processor": platform.processor(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "items": args.items, "K": args.k, "D": args.dim, "queries": args.queries,
        "data": "isotropic" if args.isotropic else f"concepts ({args.concepts})",
        "nlist": info["nlist"], "train_size": info["train_size"],
        "build_s": {"sets": write_s, "faiss": build_s,
                    **({"faiss_shards": shard_build} if args.shards > 1 else {})},
        "bytes_per_item": {"sets": sets_bytes / args.items, "faiss": faiss_bytes / args.items,
                           **({"milvus": milvus["bytes"] / args.items} if milvus else {})},
        **({"milvus": {k: v for k, v in milvus.items() if k != "rows"}} if milvus else {}),
        "memory_mib": {"before_open": before, "after_open": opened, "after_queries": after},
        "exact_timing": {"runs": args.repeats, "queries_per_timed_run": [args.queries] + [n_timed] * (args.repeats - 1)},
        "rows": rows,
    }
    print(f"{args.items:,} items, K={args.k}, D={args.dim}, {record['data']}, {args.queries} queries; "
          f"nlist {info['nlist']} (default {default_nlist(args.items * args.k)}), trained on {info['train_size']:,}; "
          f"{record['machine']}, torch {torch.__version__} ({record['torch_threads']} threads), "
          f"faiss {faiss.__version__}; load average {record['load_average'][0]} -> {record['load_average'][1]}")
    print(f"build: sets.npy {write_s:.1f} s ({sets_bytes / args.items:,.0f} B/item); "
          f"faiss element index {build_s:.1f} s ({faiss_bytes / args.items:,.0f} B/item)")
    touched = after["RssFile"] - before["RssFile"]
    print(f"memory: opening the faiss index (memory-mapped) added {opened['RssAnon'] - before['RssAnon']:,.0f} MiB "
          f"anonymous; after all queries {after['RssAnon']:,.0f} MiB anonymous in all, and {touched:,.0f} MiB "
          f"({touched * 2**20 / args.items:,.0f} B/item) of index file pages resident (the exact engine reads "
          f"every set; the operating system may drop these pages again)")
    if milvus:
        print(f"milvus-lite {milvus['milvus_lite']}: inserted in {milvus['insert_s']:.1f} s, index "
              f"{milvus['index_type']} {milvus['index_params']} built and loaded in {milvus['index_s']:.1f} s; "
              f"{milvus['bytes'] / args.items:,.0f} B/item on disk")
    print(f"timing: median of {args.repeats} runs (exact: {args.queries} then {n_timed} queries per run)")
    if args.shards > 1:
        print(f"shards: {args.shards} element indexes built in {sum(shard_build):.1f} s in all "
              f"(one after another); searched through fan_out with {min(args.shards, max(1, (os.cpu_count() or 1) // 2))}"
              f" thread(s)")
    print()
    print("| shards | engine | candidates/element | nprobe | mean items re-ranked | recall@10 | queries/s | × exact |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fetched = (f"{r['candidates']:,}" if isinstance(r["candidates"], int) else str(r["candidates"] or "—")) + \
            (" (auto)" if r.get("auto") else "")
        print(f"| {r.get('shards', 1)} | {r['engine']} | {fetched} | {r['nprobe'] or '—'} | {r['mean_pool']:,.0f} | "
              f"{r['recall@10']:.3f} | {r['queries_per_s']:,.1f} | {r['queries_per_s'] / rows[0]['queries_per_s']:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.workdir is None:
        for name in ("sets.npy", ELEMENTS_FILE, *(f"shard-{i}.faiss" for i in range(args.shards))):
            (workdir / name).unlink(missing_ok=True)
        workdir.rmdir()


if __name__ == "__main__":
    main()
