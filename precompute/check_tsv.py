#!/usr/bin/env python
"""Check bottom-up-attention TSV files before importing them: rows, duplicates, box counts, feature size.

Decodes every row with the importer's own parser, so a corrupt or truncated row is reported with its file and
line number, as `maxmatch extract-features tsv` would. With --captions, also counts the images of a
Karpathy json that no row provides.

Example::

    python precompute/check_tsv.py trainval_36/*.tsv* --captions dataset_coco.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.butd_tsv import decode_row, scan_tsv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--captions", type=Path, help="Karpathy json to check coverage against")
    args = parser.parse_args()
    seen: Counter = Counter()
    boxes: Counter = Counter()
    dims: Counter = Counter()
    try:
        for path in args.files:
            rows = 0
            for number, key, line in scan_tsv(path):
                row = decode_row(path, number, line)
                seen[key] += 1
                boxes[len(row.boxes)] += 1
                dims[row.features.shape[1]] += 1
                rows += 1
            print(f"{path}: {rows:,} rows")
    except MaxMatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repeated = sum(1 for c in seen.values() if c > 1)
    print(f"{len(seen):,} distinct images, {repeated:,} in more than one row")
    print(f"boxes per image: min {min(boxes)}, max {max(boxes)}, most common {boxes.most_common(3)}")
    print(f"feature sizes: {dict(dims)}")
    if args.captions:
        from maxmatch_cli.features.karpathy import load_karpathy

        wanted = {im.key for im in load_karpathy(args.captions)}
        missing = wanted - set(seen)
        print(f"{args.captions}: {len(wanted):,} images, {len(missing):,} without a row"
              + (f" (e.g. {sorted(map(str, missing))[:5]})" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
