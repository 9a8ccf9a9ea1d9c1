"""Sharded indexes: a gallery too large for one machine, built in shards and searched as one.

``build_index(..., shard=(i, n))`` writes the contiguous rows :func:`shard_rows` of shard ``i`` as a complete index
folder ``out/shard-i-of-n`` (each shard its own job); :func:`~maxmatch_cli.retrieval.index.query.load_index` on
``out`` opens every shard as one :class:`ShardedIndex`, which refuses shards of different builds or a missing shard,
and answers a search by asking every shard and merging their top-k by exact score (:func:`fan_out`).
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.folder import Index
from maxmatch_cli.retrieval.index.format import index_file

_SHARD_PATTERN = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_name(index: int, count: int) -> str:
    """The folder of shard ``index`` (0-based) of ``count`` inside a sharded index: ``shard-3-of-8``."""
    return f"shard-{index}-of-{count}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/8"`` -> ``(3, 8)``: shard 3 (0-based) of 8.

    Raises:
        MaxMatchError: not ``I/N`` with 0 <= I < N.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match[1]) < int(match[2]):
        raise MaxMatchError(f"--shard must be I/N with 0 <= I < N (shard I of N, counted from 0), got '{text}'",
                            hint="e.g. --shard 0/4 ... --shard 3/4 for four shards")
    return int(match[1]), int(match[2])


def shard_rows(n_items: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of shard ``index`` of ``count`` over ``n_items`` items (sizes differ by
    at most one)."""
    return index * n_items // count, (index + 1) * n_items // count


def shard_folders(path: Path) -> list[Path]:
    """The shard folders (``shard-I-of-N``) directly inside ``path``, sorted by name (none if unreadable)."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and _SHARD_PATTERN.match(p.name))
    except OSError:
        return []


class ShardedIndex:
    """A gallery split into shards, each an :class:`Index` folder ``shard-I-of-N`` inside one folder.

    Shards are built independently (``maxmatch index ... --shard I/N``, one machine or job each, into a shared
    folder) over contiguous row ranges of one gallery. A search fans out: every shard answers the encoded queries
    with its own engine, and the per-shard top-k lists merge into the global top-k (exact scores compare across
    shards; equal scores keep the lower global row first, as one index would). Rows are global: shard I's local
    row r is row ``offset_I + r``.

    Attributes:
        path: the folder holding the shards.
        shards: the shard indexes, in shard order.
    """

    def __init__(self, path: Path, shards: list[Index]):
        self.path = path
        self.shards = shards
        self.offsets = [int(sh.manifest["shard"]["rows"][0]) for sh in shards]
        first = shards[0].manifest
        self.manifest = {**{k: v for k, v in first.items() if k not in ("shard", "element_index")},
                         "n_items": sum(len(sh) for sh in shards), "n_shards": len(shards)}

    @classmethod
    def open(cls, path: Path) -> "ShardedIndex":
        """Open and cross-check every shard folder under ``path``.

        Raises:
            MaxMatchError: shards of different builds (checkpoint, data, split, kind, count), a missing or
                duplicated shard, or a damaged shard.
        """
        folders = shard_folders(path)
        shards = []
        for folder in folders:
            index_file(path, folder.name, "shard folder")  # a link to a folder elsewhere is refused
            if not (folder / "manifest.json").is_file():
                if any(folder.iterdir()):  # builds publish a folder whole, manifest included: this one is damaged
                    raise MaxMatchError(f"shard {folder} has files but no manifest.json: it is damaged",
                                        hint=f"remove it and rebuild that shard (`maxmatch index CKPT ... --shard "
                                             f"I/N --out {path}`)")
                continue  # an empty folder: reported below as missing
            shard = Index.open(folder)
            if "shard" not in shard.manifest:
                raise MaxMatchError(f"{folder} is not a shard (its manifest has no shard record)",
                                    hint="build shards with `maxmatch index ... --shard I/N --out FOLDER`")
            record = shard.manifest["shard"]
            if folder.name != shard_name(record["index"], record["count"]):
                raise MaxMatchError(f"folder {folder.name} of {path} holds shard {record['index']}/{record['count']} "
                                    f"(its manifest), which belongs in {shard_name(record['index'], record['count'])}",
                                    hint="rename or remove the folder; a shard copied under another name is counted "
                                         "twice")
            shards.append(shard)
        if not shards:
            raise MaxMatchError(f"{path} holds shard folders but none is complete",
                                hint="wait for the shard builds to finish, or re-run them")
        counts = {sh.manifest["shard"]["count"] for sh in shards}
        keys = ("kind", "K", "D", "similarity", "split", "data_fingerprint")
        reference = shards[0].manifest
        for sh in shards[1:]:
            differs = [key for key in keys if sh.manifest.get(key) != reference.get(key)]
            if sh.manifest["checkpoint"]["fingerprint"] != reference["checkpoint"]["fingerprint"]:
                differs.insert(0, "checkpoint")
            if sh.manifest["shard"]["n_total"] != reference["shard"]["n_total"]:
                differs.append("gallery size")
            if differs or len(counts) > 1:
                what = ", ".join(differs) or "shard count"
                raise MaxMatchError(f"the shards in {path} come from different builds ({sh.path.name} differs from "
                                    f"{shards[0].path.name} in: {what})",
                                    hint="rebuild every shard with the same checkpoint, feature file, split and --shard "
                                         "count")
        count = counts.pop()
        have = sorted(sh.manifest["shard"]["index"] for sh in shards)
        missing = sorted(set(range(count)) - set(have))
        if missing:
            listed = ", ".join(str(i) for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise MaxMatchError(f"sharded index {path} lacks {len(missing)} of its {count} shards ({listed})",
                                hint=f"build them with `maxmatch index CKPT ... --shard {missing[0]}/{count} --out "
                                     f"{path}` (one per missing shard)")
        if len(have) != count:
            raise MaxMatchError(f"sharded index {path} holds a shard twice", hint="remove the extra shard folder")
        shards.sort(key=lambda sh: sh.manifest["shard"]["index"])
        return cls(path, shards)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ShardedIndex({str(self.path)!r}, {len(self.shards)} shards, {m['kind']}={m['n_items']}, K={m['K']}, "
                f"D={m['D']}, similarity={m['similarity']!r})")

    def __len__(self) -> int:
        return int(self.manifest["n_items"])

    kind = Index.kind
    similarity = Index.similarity
    similarity_options = Index.similarity_options
    checkpoint = Index.checkpoint
    image_extraction = Index.image_extraction
    check_checkpoint = Index.check_checkpoint

    @property
    def has_element_index(self) -> bool:
        """Whether every shard holds a faiss element index."""
        return all(sh.has_element_index for sh in self.shards)

    def _locate(self, row: int) -> tuple[Index, int]:
        if not 0 <= row < len(self):
            raise IndexError(row)
        i = bisect.bisect_right(self.offsets, row) - 1
        return self.shards[i], row - self.offsets[i]

    def item(self, row: int) -> tuple[Any, np.ndarray, str | None]:
        """``(id, set, caption text or None)`` of global row ``row``."""
        shard, local = self._locate(row)
        return shard.item(local)

    def describe(self, row: int) -> dict[str, Any]:
        """What a person is shown of global row ``row`` besides its id (:meth:`Index.describe`)."""
        shard, local = self._locate(row)
        return shard.describe(local)

    def search(self, queries: torch.Tensor, k: int = 10, engine: str = "auto", candidates: int | None = None,
               nprobe: int | None = None, device: str | torch.device = "cpu",
               block_size: int | None = None) -> tuple[Any, str]:
        """:meth:`Index.search` over every shard (in parallel threads), merged into the global top-k."""
        searches = [functools.partial(shard.search, queries, k, engine=engine, candidates=candidates, nprobe=nprobe,
                                      device=device, block_size=block_size) for shard in self.shards]
        return fan_out(searches, self.offsets, k)


def fan_out(searches: Sequence[Callable[[], tuple[Any, str]]], offsets: Sequence[int], k: int) -> tuple[Any, str]:
    """Run one search per shard (threads: half the CPUs, at most one per shard) and merge into the global top-k.

    Args:
        searches: per shard, in row order, a call returning ``(Ranking, engine)`` over that shard's local rows.
        offsets: the global row of each shard's first item.
        k: results kept.

    Returns:
        ``(Ranking, engines)``: global rows, ties to the lower row as within a shard; the engines used, joined by
        ``+``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from maxmatch_cli.retrieval.api import Ranking

    workers = min(len(searches), max(1, (os.cpu_count() or 1) // 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(lambda search: search(), searches))
    rows = torch.cat([torch.where(r.indices >= 0, r.indices + off, r.indices)
                      for (r, _), off in zip(answers, offsets)], dim=1)
    scores = torch.cat([r.scores for r, _ in answers], dim=1)
    # Shards come in row order and each list is sorted with ties to the lower row: a stable sort keeps that.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    engines = sorted({used for _, used in answers})
    return Ranking(rows.gather(1, order), scores.gather(1, order)), "+".join(engines)
