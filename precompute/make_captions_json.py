#!/usr/bin/env python
"""Write a Karpathy-style caption json for your own images, so `maxmatch extract-features` can read them.

Input: a tab-separated file with one caption per line, ``<image file name>\\t<caption>`` (relative to the image
folder), five (or more) lines per image. Splits are either given in a third column (train / val / test) or drawn
at random with --dev and --test image counts (seeded).

Example::

    python precompute/make_captions_json.py captions.tsv --out dataset_mine.json --dev 500 --test 1000
    maxmatch extract-features images my_images --captions dataset_mine.json --kind grid --out mine.h5
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", type=Path, help="TSV: file name <tab> caption [<tab> split]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dev", type=int, default=0, help="images drawn for the val split (without a split column)")
    parser.add_argument("--test", type=int, default=0, help="images drawn for the test split")
    parser.add_argument("--min-captions", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images: OrderedDict[str, dict] = OrderedDict()
    for number, line in enumerate(args.captions.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) not in (2, 3) or not parts[1].strip():
            print(f"{args.captions}, line {number}: expected 'file<TAB>caption[<TAB>split]'", file=sys.stderr)
            return 2
        entry = images.setdefault(parts[0], {"filename": parts[0], "sentences": [], "split": None})
        entry["sentences"].append({"raw": parts[1].strip(), "tokens": parts[1].strip().lower().split()})
        if len(parts) == 3:
            entry["split"] = parts[2].strip()
    short = [name for name, e in images.items() if len(e["sentences"]) < args.min_captions]
    if short:
        print(f"{len(short)} images have fewer than {args.min_captions} captions, e.g. {short[:3]}", file=sys.stderr)
        return 2
    names = [n for n, e in images.items() if e["split"] is None]
    random.Random(args.seed).shuffle(names)
    for k, name in enumerate(names):
        images[name]["split"] = "test" if k < args.test else "val" if k < args.test + args.dev else "train"
    out = [dict(e, imgid=k) for k, e in enumerate(images.values())]
    args.out.write_text(json.dumps({"images": out, "dataset": args.out.stem}))
    counts = {s: sum(e["split"] == s for e in out) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: {len(out)} images ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
