"""Gallery indexes on disk: encode a gallery once, then answer text queries against it.

An index is a folder:

==============  ===========================================================================================
manifest.json   ``format``, ``format_version``, the checkpoint (path and fingerprint), ``kind`` (images or
                captions), ``K``, ``D``, the similarity and its options, ``n_items``, the feature file and
                split it was built from, the engine, the maxmatch version and the date
sets.npy        ``(N, K, D)`` float16 sets with L2-normalised elements (similarities compare cosines, so
                normalising first loses nothing and keeps float16 in range); memory-mapped on load
ids.json        the N item ids: image ids of the feature file, or caption indices
texts.json      captions only: the N caption strings
elements.faiss  optional (``--engine faiss``): a faiss IVF index over all N x K set elements; memory-mapped on
                load
==============  ===========================================================================================

A build streams: the gallery is encoded ``batch_size`` items at a time into a preallocated
:func:`numpy.lib.format.open_memmap`, so memory stays bounded whatever the gallery size. It writes into a hidden
folder next to the target (``.NAME.partial``), writes the manifest last and renames the folder into place, so a
failed or killed build never leaves a folder at the target path that looks complete (an interrupted
``--overwrite`` keeps the old index). The partial folder records after each batch how many rows are encoded
(``progress.json``, with the build's identity: checkpoint, feature file, split, kind, shard): the same command
run again resumes after them; a different build starts the folder afresh.

The checkpoint fingerprint is the SHA-256 of the checkpoint's safetensors header (tensor layout plus metadata:
recipe, vocabulary, provenance with its creation time), cheap to read and unchanged by copying or touching the
file; a query that would encode its text with another checkpoint is refused.

A gallery too large for one machine is built in shards: ``build_index(..., shard=(i, n))`` writes the contiguous
rows :func:`shard_rows` of shard ``i`` as a complete index folder ``out/shard-i-of-n`` (each shard its own job);
:func:`load_index` on ``out`` opens every shard as one :class:`ShardedIndex`, which refuses shards of different
builds or a missing shard, and answers a search by asking every shard and merging their top-k by exact score.

Search engines:

- ``exact`` (always available): exhaustive exact scoring. Every query is scored against every gallery set with
  :func:`maxmatch_cli.retrieval.api.rank_sets`, block by block over the memory-mapped sets, so results are exactly the
  top-k under the index's similarity (of the float16-stored sets); cost grows linearly with the gallery.
- ``faiss`` (optional, ``pip install faiss-cpu``, index built with ``--engine faiss``): candidate generation by
  approximate nearest-neighbour search over the set *elements* (an inverted-file index, fp16 vectors, inner
  product of L2-normalised elements = cosine), then exact re-ranking. Each query element fetches its
  ``candidates`` nearest gallery elements from ``nprobe`` inverted lists; the gallery sets owning them are scored
  exactly and the best ``k`` returned. Scores are exact; only recall is approximate (an item none of whose
  elements is near any query element can be missed). ``benchmarks/index.py`` measures recall@10 against the
  exact engine.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

__all__ = ["ENGINES", "FORMAT", "FORMAT_VERSION", "Hit", "Index", "build_element_index", "build_index",
           "checkpoint_fingerprint", "faiss_candidates", "load_index", "query_index", "read_element_index",
           "search_sets"]

FORMAT = "maxmatch-index"
FORMAT_VERSION = 1
"""Version of the folder layout; an index of another version is refused (rebuild it)."""
KINDS = ("images", "captions")
ENGINE = "exhaustive-exact"
"""The manifest's ``engine``: exact scoring is always available; ``element_index`` records an optional faiss part."""
ENGINES = ("auto", "exact", "faiss")
"""Search engines of :meth:`Index.search` (``auto``: faiss when the index has an element index and faiss is
installed, else exact)."""
ELEMENTS_FILE = "elements.faiss"
DEFAULT_CANDIDATES = 128
"""The fewest nearest gallery elements the faiss engine fetches per query element by default; the default grows
with the gallery, :func:`default_candidates`."""
CANDIDATES_PER_ITEMS = 1000
"""Gallery items per default candidate beyond :data:`DEFAULT_CANDIDATES` (:func:`default_candidates`)."""
DEFAULT_NPROBE = 32
"""Inverted lists searched per query element by the faiss engine."""
_BUILD_HINT = "build one with `maxmatch index CKPT --data F.h5 --split test --out INDEX`"


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a safetensors file's header: its 8-byte length and the JSON it announces.

    Raises:
        MaxMatchError: the file is missing or too short to be a safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = fh.read(size) if 0 <= size <= 100 * 2**20 else b""
    except OSError as exc:
        raise MaxMatchError(f"cannot read checkpoint {path}: {exc.strerror or exc}",
                            hint="check the path (or pass --checkpoint)") from None
    if size < 0 or len(header) != size or not header:
        raise MaxMatchError(f"{path} is not a safetensors checkpoint (no valid header)",
                            hint="pass a checkpoint written by `maxmatch train`")
    return hashlib.sha256(head + header).hexdigest()


@dataclass
class Index:
    """A loaded index (see the module docstring for the files).

    Attributes:
        path: the index folder.
        manifest: the parsed manifest.json.
        sets: ``(N, K, D)`` float16 array, memory-mapped read-only.
        ids: the N item ids.
        texts: the N caption strings of a captions index, else None.
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    sets: np.ndarray = field(repr=False)
    ids: list[Any] = field(repr=False)
    texts: list[str] | None = field(default=None, repr=False)
    _element_index: Any = field(default=None, init=False, repr=False, compare=False)
    _gpu_element_index: Any = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Index({str(self.path)!r}, {m['kind']}={m['n_items']}, K={m['K']}, D={m['D']}, "
                f"similarity={m['similarity']!r}, faiss={self.has_element_index})")

    @property
    def kind(self) -> str:
        """``images`` or ``captions``."""
        return self.manifest["kind"]

    @property
    def similarity(self) -> str:
        """The similarity the index is searched with (the checkpoint's at build time)."""
        return self.manifest["similarity"]

    @property
    def similarity_options(self) -> dict[str, Any]:
        """Options of :attr:`similarity` (e.g. chamfer's ``alpha``)."""
        return dict(self.manifest.get("similarity_options", {}))

    @property
    def checkpoint(self) -> Path:
        """Path of the checkpoint the index was built with."""
        return Path(self.manifest["checkpoint"]["path"])

    def __len__(self) -> int:
        return int(self.sets.shape[0])

    @property
    def has_element_index(self) -> bool:
        """Whether the index holds a faiss element index (built with ``--engine faiss``)."""
        return bool(self.manifest.get("element_index"))

    def search(self, queries: torch.Tensor, k: int = 10, engine: str = "auto", candidates: int | None = None,
               nprobe: int | None = None, device: str | torch.device = "cpu",
               block_size: int | None = None) -> tuple[Any, str]:
        """The ``k`` best items for each query set (already encoded), and the engine that answered.

        Args:
            queries: ``(Q, K, D)`` query sets (caption sets for an image index).
            k: results per query.
            engine: ``exact``, ``faiss`` or ``auto`` (see :data:`ENGINES`).
            candidates: faiss: nearest gallery elements per query element (default :func:`default_candidates`).
            nprobe: faiss: inverted lists searched (default :data:`DEFAULT_NPROBE`, at most the index's nlist).
            device: where the exact scoring runs.
            block_size: gallery sets per scoring block.

        Returns:
            ``(ranking, engine)``: a :class:`~maxmatch_cli.retrieval.api.Ranking` (rows -1 and scores -inf where the faiss
            candidates of a query ran out before ``k``) and ``"exact"`` or ``"faiss"``.

        Raises:
            MaxMatchError: an unknown engine, or faiss asked for but missing (the package or the element index).
        """
        if engine not in ENGINES:
            raise MaxMatchError(f"unknown search engine '{engine}'", hint=f"use one of: {', '.join(ENGINES)}")
        if engine == "auto":
            engine = "faiss" if self.has_element_index and _faiss_available() else "exact"
        element_index = None
        if engine == "faiss":
            if not self.has_element_index:
                raise MaxMatchError(f"index {self.path} has no faiss element index",
                                    hint="rebuild it with `maxmatch index ... --engine faiss`, or use --engine exact")
            element_index = self.element_index(device)
        side = "text" if self.kind == "images" else "image"
        ranking = search_sets(self.sets, queries, k, self.similarity, self.similarity_options, engine=engine,
                              element_index=element_index, candidates=candidates, nprobe=nprobe,
                              query_side=side, device=device, block_size=block_size)
        return ranking, engine

    def element_index(self, device: str | torch.device = "cpu"):
        """The faiss element index (memory-mapped on first use, :func:`read_element_index`); for a CUDA
        ``device`` with a faiss build that sees GPUs (faiss-gpu), a copy on the GPUs."""
        if self._element_index is None:
            self._element_index = read_element_index(self.path / self.manifest["element_index"]["file"])
        if torch.device(device).type == "cuda":
            faiss = _faiss()
            if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                if self._gpu_element_index is None:
                    self._gpu_element_index = faiss.index_cpu_to_all_gpus(self._element_index)
                return self._gpu_element_index
        return self._element_index

    @property
    def image_extraction(self) -> dict[str, Any] | None:
        """How the gallery's image features were extracted (``extract-features --images``), else None."""
        return self.manifest.get("image_extraction")

    def item(self, row: int) -> tuple[Any, np.ndarray, str | None]:
        """``(id, set, caption text or None)`` of one row (a global row for a sharded index)."""
        return self.ids[row], np.asarray(self.sets[row], dtype=np.float32), \
            (self.texts[row] if self.texts is not None else None)

    def check_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Raise unless ``checkpoint`` is the file this index was built with (same header fingerprint)."""
        if not Path(checkpoint).is_file():
            raise MaxMatchError(f"checkpoint {checkpoint} of index {self.path} does not exist",
                                hint="pass the checkpoint it was built with (--checkpoint PATH), or rebuild the index")
        if checkpoint_fingerprint(checkpoint) != self.manifest["checkpoint"]["fingerprint"]:
            raise MaxMatchError(f"index {self.path} was built by another checkpoint than {checkpoint} "
                                f"(built with {self.checkpoint}; the fingerprints differ)",
                                hint="query with the checkpoint it was built with, or rebuild the index with this one")


def _read_json(path: Path, what: str, index: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaxMatchError(f"index {index} has no {path.name}",
                            hint=f"it is damaged; rebuild it ({_BUILD_HINT})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaxMatchError(f"cannot read the {what} {path} ({exc})",
                            hint=f"the index is damaged; rebuild it ({_BUILD_HINT})") from None


def load_index(path: str | os.PathLike) -> Index | ShardedIndex:
    """Open an index folder written by :func:`build_index` (the sets memory-mapped, read-only), or a folder of
    shards built with ``shard=(i, n)`` (a :class:`ShardedIndex`).

    Raises:
        MaxMatchError: the folder is missing, incomplete, of another format version, or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise MaxMatchError(f"index {path} does not exist", hint=_BUILD_HINT)
    if not path.is_dir():
        raise MaxMatchError(f"{path} is a file, not an index folder", hint=_BUILD_HINT)
    if not (path / "manifest.json").is_file() and _shard_folders(path):
        return ShardedIndex.open(path)
    if not (path / "manifest.json").is_file():
        raise MaxMatchError(f"{path} is not a complete maxmatch index (no manifest.json)",
                            hint=f"its build may have been interrupted; {_BUILD_HINT}")
    manifest = _read_json(path / "manifest.json", "index manifest", path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MaxMatchError(f"{path}/manifest.json is not a maxmatch index manifest", hint=_BUILD_HINT)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MaxMatchError(f"index {path} has format version {version}; this maxmatch reads version {FORMAT_VERSION}",
                            hint=f"rebuild it with this maxmatch ({_BUILD_HINT})")
    try:
        n, k, d = int(manifest["n_items"]), int(manifest["K"]), int(manifest["D"])
        manifest["checkpoint"]["path"], manifest["checkpoint"]["fingerprint"]
        if manifest["kind"] not in KINDS:
            raise ValueError(f"kind {manifest['kind']!r}")
        from maxmatch_cli.method.similarity import list_similarities

        if manifest["similarity"] not in {name for name, _ in list_similarities()}:
            raise ValueError(f"similarity {manifest['similarity']!r}")
        if not isinstance(manifest.get("similarity_options", {}), dict):
            raise ValueError(f"similarity_options {manifest['similarity_options']!r}")
        element = manifest.get("element_index")
        if element is not None and not (isinstance(element, dict) and isinstance(element.get("file"), str)
                                        and isinstance(element.get("nlist"), int)
                                        and isinstance(element.get("n_elements"), int)):
            raise ValueError(f"element_index {element!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MaxMatchError(f"the manifest of index {path} lacks or garbles a field ({exc})",
                            hint=f"rebuild the index ({_BUILD_HINT})") from None
    try:
        sets = np.load(path / "sets.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or cut file
        raise MaxMatchError(f"cannot read the sets of index {path} ({exc or type(exc).__name__})",
                            hint=f"the index is damaged; rebuild it ({_BUILD_HINT})") from None
    if sets.shape != (n, k, d) or sets.dtype != np.float16:
        raise MaxMatchError(f"index {path}: sets.npy holds {sets.dtype} {sets.shape}, the manifest announces float16 "
                            f"{(n, k, d)}", hint=f"the index is damaged; rebuild it ({_BUILD_HINT})")
    ids = _read_json(path / "ids.json", "index ids", path)
    texts = _read_json(path / "texts.json", "index captions", path) if manifest["kind"] == "captions" else None
    for name, values in (("ids.json", ids), ("texts.json", texts)):
        if values is not None and (not isinstance(values, list) or len(values) != n):
            raise MaxMatchError(f"index {path}: {name} does not hold {n} entries",
                                hint=f"the index is damaged; rebuild it ({_BUILD_HINT})")
    return Index(path, manifest, sets, ids, texts)


# ----------------------------------------------------------------------------------------------- shards

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


def _shard_folders(path: Path) -> list[Path]:
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
        folders = _shard_folders(path)
        shards = []
        for folder in folders:
            if not (folder / "manifest.json").is_file():
                if any(folder.iterdir()):  # builds publish a folder whole, manifest included: this one is damaged
                    raise MaxMatchError(f"shard {folder} has files but no manifest.json: it is damaged",
                                        hint=f"remove it and rebuild that shard (`maxmatch index CKPT ... --shard "
                                             f"I/N --out {path}`)")
                continue  # an empty folder: reported below as missing
            shard = load_index(folder)
            if not isinstance(shard, Index) or "shard" not in shard.manifest:
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


# ----------------------------------------------------------------------------------------------- building


def _chmod_published(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the index the permissions an ordinary folder and files would get."""
    from maxmatch_cli.fileio import current_umask

    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False) + "\n", encoding="utf-8")


def _py(value: Any) -> Any:
    """Item ids as plain JSON values (numpy ints and bytes included)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


def build_index(checkpoint: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | None = None,
                split: str | None = None, kind: str = "images", device: str = "auto", batch_size: int | None = None,
                overwrite: bool = False, show_progress: bool = True, engine: str = "exact",
                nlist: int | None = None, shard: tuple[int, int] | str | None = None) -> Index:
    """Encode a split's images (or captions) once and write them as an index folder.

    Args:
        checkpoint: checkpoint file or run folder.
        out: the index folder to create.
        data: feature file (default: the checkpoint recipe's ``data.path``).
        split: split to index (default: the recipe's ``eval.split``).
        kind: ``images`` (a gallery for text queries) or ``captions``.
        device: where to encode.
        batch_size: items encoded (and written) at a time (default: the recipe's ``eval.batch_size``).
        overwrite: replace an index already at ``out`` (the old one stays until the new one is complete).
        show_progress: a progress bar.
        engine: ``exact`` (the sets only) or ``faiss`` (also a faiss element index for approximate candidate
            generation, :func:`build_element_index`).
        nlist: faiss: inverted lists (default :func:`default_nlist`).
        shard: ``(i, n)`` or ``"i/n"``: build only shard ``i`` (0-based) of ``n``, the contiguous rows
            :func:`shard_rows` of the split, into ``out/shard-i-of-n`` (``out`` is the sharded index folder;
            :func:`load_index` on it opens every shard as one :class:`ShardedIndex`).

    Returns:
        The written :class:`Index` (the shard's, with ``shard``).

    Raises:
        MaxMatchError: bad inputs, an existing ``out`` without ``overwrite``, or a folder that cannot be written.
    """
    from maxmatch_cli import __version__
    from maxmatch_cli.retrieval.api import load
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.progress import make_progress

    if kind not in KINDS:
        raise MaxMatchError(f"unknown index kind '{kind}'", hint="use --kind images or --kind captions")
    if engine not in ("exact", "faiss"):
        raise MaxMatchError(f"unknown index engine '{engine}'", hint="use --engine exact or --engine faiss")
    if engine == "faiss":
        _faiss()  # a missing package is reported before anything is encoded
    _check_nlist(nlist)
    if nlist is not None and engine != "faiss":
        raise MaxMatchError("--nlist sets the faiss element index", hint="add --engine faiss, or leave out --nlist")
    if batch_size is not None and batch_size < 1:
        raise MaxMatchError(f"batch size must be positive, got {batch_size}", hint="e.g. --batch-size 256")
    out = Path(out)
    if shard is not None:
        shard = parse_shard(shard) if isinstance(shard, str) else parse_shard(f"{shard[0]}/{shard[1]}")
        if out.exists() and (not out.is_dir() or (out / "manifest.json").is_file()):
            raise MaxMatchError(f"{out} is {'an unsharded index' if out.is_dir() else 'a file'}, not a folder of shards",
                                hint="choose another --out for the sharded index")
        out = out / shard_name(*shard)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty folder is simply filled
        if shard is None and out.is_dir() and _shard_folders(out):
            raise MaxMatchError(f"{out} is a sharded index; not replacing it with an unsharded one",
                                hint="add --shard I/N to (re)build one of its shards, or choose another --out")
        if not (out.is_dir() and (out / "manifest.json").is_file()):
            raise MaxMatchError(f"{out} exists and is not a maxmatch index; not replacing it",
                                hint="choose another --out, or remove it yourself")
        if not overwrite:
            raise MaxMatchError(f"index {out} already exists",
                                hint="pass --overwrite to replace it, or choose another --out")
    model = load(checkpoint, device)
    recipe = model.recipe
    store = open_store(data or recipe.data.path)
    split = split or recipe.eval.split
    images, captions = store.split(split)
    rows = images if kind == "images" else captions
    if len(rows) == 0:
        raise MaxMatchError(f"split '{split}' of {store.path} has no {kind}", hint="index another split (--split)")
    n_total = len(rows)
    shard_record = None
    if shard is not None:
        start, stop = shard_rows(n_total, *shard)
        if start == stop:
            raise MaxMatchError(f"shard {shard[0]}/{shard[1]} of {n_total} {kind} would be empty",
                                hint=f"use at most {n_total} shards")
        rows = rows[start:stop]
        shard_record = {"index": shard[0], "count": shard[1], "rows": [int(start), int(stop)], "n_total": n_total}
    if kind == "images":
        from maxmatch_cli.evaluation.evaluate import check_features

        check_features(_Ckpt(model.checkpoint, recipe), store)
        ids = [_py(v) for v in np.asarray(store.image_ids)[rows]]
        texts = None
    else:
        ids = [int(v) for v in rows]
        texts = store.captions_text(rows)
    batch_size = batch_size or recipe.eval.batch_size
    n, k, d = len(rows), model.num_embeds, model.embed_dim
    _check_nlist(nlist, n * k)  # before any encoding

    from maxmatch_cli.features.images import extraction_of

    extraction = extraction_of(store)  # how image files can be encoded for queries (None: not from image files)
    ckpt_fp, data_fp = checkpoint_fingerprint(model.checkpoint), store.fingerprint()
    build_id = hashlib.sha256(json.dumps([FORMAT_VERSION, ckpt_fp, data_fp, split, kind, shard_record, n, k, d],
                                         sort_keys=True).encode()).hexdigest()
    tmp, done = _open_partial(out, build_id)
    try:
        sets = np.lib.format.open_memmap(tmp / "sets.npy", mode="r+" if done else "w+", dtype=np.float16,
                                         shape=(n, k, d))
        with make_progress(transient=True) as progress:
            task = progress.add_task(f"encoding {kind}", total=n, completed=done, unit=kind[:3],
                                     status=f"resumed at {done:,}" if done else "", visible=show_progress)
            for start in range(done, n, batch_size):
                chunk = rows[start: start + batch_size]
                if kind == "images":
                    encoded = model.encode_images(store, chunk, batch_size=batch_size)
                else:
                    encoded = model.encode_texts(texts[start: start + batch_size], batch_size=batch_size)
                sets[start: start + len(chunk)] = F.normalize(encoded, dim=-1).numpy().astype(np.float16)
                sets.flush()  # the rows first, then the record that they are there
                _save_progress(tmp, build_id, start + len(chunk))
                progress.advance(task, len(chunk))
        del sets
        element_index = None
        if engine == "faiss":
            element_index = build_element_index(np.load(tmp / "sets.npy", mmap_mode="r"), tmp / ELEMENTS_FILE, nlist)
        else:
            (tmp / ELEMENTS_FILE).unlink(missing_ok=True)  # from an earlier attempt with --engine faiss
        _write_json(tmp / "ids.json", ids)
        if texts is not None:
            _write_json(tmp / "texts.json", texts)
        stat = model.checkpoint.stat()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "n_items": n, "K": k, "D": d,
            "dtype": "float16", "normalized": True, "similarity": model.similarity,
            "similarity_options": model.similarity_options(model.similarity), "engine": ENGINE,
            "element_index": element_index,
            "checkpoint": {"path": str(model.checkpoint.resolve()), "fingerprint": ckpt_fp,
                           "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "data": str(Path(store.path).resolve()), "data_fingerprint": data_fp, "split": split,
            "image_extraction": extraction, **({"shard": shard_record} if shard_record else {}),
            "maxmatch_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / PROGRESS_FILE).unlink()
        _write_json(tmp / "manifest.json", manifest)  # last: a folder with a manifest is whole
        _chmod_published(tmp)
        _publish_folder(tmp, out)
    except OSError as exc:  # disk full, permissions: the rows so far stay, and a re-run resumes after them
        raise MaxMatchError(f"building index {out} failed: {exc.strerror or exc}",
                            hint=f"fix the cause and re-run the same command: it resumes after the {_rows_in(tmp):,} "
                                 f"{kind} already encoded (kept in {tmp})") from None
    # Any other interruption (Ctrl-C, a crash) also leaves the partial folder for the same command to resume.
    return load_index(out)


PROGRESS_FILE = "progress.json"
"""In a partial build folder: the build's identity and how many rows of sets.npy are encoded."""


def _partial_folder(out: Path) -> Path:
    """Where a build of ``out`` works until it is complete (hidden, next to it; a re-run resumes there)."""
    return out.parent / f".{out.name}.partial"


def _rows_in(partial: Path) -> int:
    try:
        return int(json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _open_partial(out: Path, build_id: str) -> tuple[Path, int]:
    """The partial folder of ``out`` and the rows already encoded in it: kept when an earlier attempt of the same
    build (same checkpoint, feature file, split, kind, shard) was interrupted, else started afresh."""
    partial = _partial_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial.is_dir():
            try:
                state = json.loads((partial / PROGRESS_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("build") == build_id and (partial / "sets.npy").is_file():
                return partial, int(state.get("done", 0))
            shutil.rmtree(partial)  # another build's leftovers, or one that never recorded progress
        elif partial.exists():
            partial.unlink()
        partial.mkdir()
        _save_progress(partial, build_id, 0)
    except OSError as exc:
        raise MaxMatchError(f"cannot write to {out.parent}: {exc.strerror or exc}",
                            hint="choose an output folder you can write to (--out)") from None
    return partial, 0


def _save_progress(partial: Path, build_id: str, done: int) -> None:
    tmp = partial / f"{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps({"build": build_id, "done": done}) + "\n", encoding="utf-8")
    os.replace(tmp, partial / PROGRESS_FILE)


@dataclass
class _Ckpt:
    """What :func:`maxmatch_cli.evaluation.evaluate.check_features` reads of a checkpoint."""

    path: Path
    recipe: Any


def _publish_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto ``out``; an index already there is moved aside first, removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "index")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "index", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- querying


@dataclass
class Hit:
    """One result of a query.

    Attributes:
        rank: 1-based rank.
        row: row of the item in the index.
        id: the item's id (image id, or caption index).
        score: its set similarity to the query.
        matching: the MaxMatch assignment between the query set and the item's set, one entry per matched pair:
            ``(query element, gallery element, cosine)`` with 0-based element numbers, by query element.
        text: the caption, for a hit of a captions index.
    """

    rank: int
    row: int
    id: Any
    score: float
    matching: list[tuple[int, int, float]] = field(default_factory=list)
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"rank": self.rank, "row": self.row, "id": self.id, "score": self.score}
        if self.text is not None:
            out["text"] = self.text
        out["matching"] = [{"query_element": q, "gallery_element": g, "cosine": c} for q, g, c in self.matching]
        return out


def _matching(gallery_set: torch.Tensor, query_set: torch.Tensor,
              query_side: str = "text") -> list[tuple[int, int, float]]:
    """The MaxMatch pairs of one gallery set and one query set, with their cosines, as (query, gallery) elements."""
    from maxmatch_cli.method.similarity import cosine_matrices, maxmatch_assignment

    img, txt = (gallery_set, query_set) if query_side == "text" else (query_set, gallery_set)
    img, txt = img.unsqueeze(0), txt.unsqueeze(0)
    perm = maxmatch_assignment(img, txt)[0, 0]  # image element v -> text element perm[v] (-1: unmatched)
    cos = cosine_matrices(img, txt)[0, 0]
    pairs = [(int(t), v, float(cos[v, t])) if query_side == "text" else (v, int(t), float(cos[v, t]))
             for v, t in enumerate(perm.tolist()) if t >= 0]
    return sorted(pairs)


QUERY_KINDS = {"text": "images", "image": "captions"}
"""What each kind of query searches: captions against an image index, images against a captions index."""


def query_index(index: Index | ShardedIndex | str | os.PathLike, texts: Sequence[str] | str | None = None,
                k: int = 10, checkpoint: str | os.PathLike | None = None, device: str = "auto", model: Any = None,
                block_size: int | None = None, engine: str = "auto", candidates: int | None = None,
                nprobe: int | None = None, *, images: Sequence[str | os.PathLike] | None = None,
                image_ids: Sequence[Any] | None = None,
                data: str | os.PathLike | None = None) -> tuple[list[list[Hit]], str]:
    """Search an index, scored exactly under its similarity: captions (``texts``) against an image index, or
    images (image files ``images``, or ``image_ids`` of a feature file) against a captions index.

    Args:
        index: an :class:`Index`, a :class:`ShardedIndex`, or its folder.
        texts: caption queries.
        k: results per query.
        checkpoint: the checkpoint to encode the queries with (default: the one the index records); it must be
            the file the index was built with.
        device: where to encode and score.
        model: an already loaded :class:`~maxmatch_cli.retrieval.api.Model` of that checkpoint (skips loading).
        block_size: gallery sets scored per block.
        engine, candidates, nprobe: as for :meth:`Index.search`.
        images: image files; their features are extracted as the index's feature file's were (it must have been
            written by ``extract-features --images``, or the checkpoint must read pixels itself).
        image_ids: ids of images of a feature file (``data``, default the one the index was built from), encoded
            from their stored features.
        data: the feature file of ``image_ids``.

    Returns:
        ``(hits, engine)``: for each query its hits, best first, and the engine that answered.

    Raises:
        MaxMatchError: no query or an empty one, a query of the wrong kind for the index, a checkpoint other than
            the index's, an image that cannot be read, an unknown image id, a bad index.
    """
    from maxmatch_cli.retrieval.api import load

    _check_depth(candidates, nprobe)  # also when the exact engine ignores them
    index = index if isinstance(index, (Index, ShardedIndex)) else load_index(index)
    given = [name for name, v in (("texts", texts), ("images", images), ("image_ids", image_ids)) if v is not None]
    if len(given) != 1:
        raise MaxMatchError("a query is text, image files or image ids (exactly one kind)" if given else "no query",
                            hint='pass --text "..." (an image index), or --image PATH / --image-id ID (a captions '
                                 'index)')
    side = "text" if texts is not None else "image"
    values = [v for v in (texts, images, image_ids) if v is not None][0]
    values = [values] if isinstance(values, (str, Path, int)) else list(values)
    if not values or any(isinstance(v, str) and not v.strip() for v in values):
        raise MaxMatchError("empty query", hint='pass the text to search for, e.g. --text "a dog on a sofa"'
                            if side == "text" else "pass an image, e.g. --image photo.jpg")
    if index.kind != QUERY_KINDS[side]:
        raise MaxMatchError(f"index {index.path} holds {index.kind}; {side} queries search "
                            f"{'an image' if side == 'text' else 'a captions'} index",
                            hint=f"build one with `maxmatch index CKPT --kind {QUERY_KINDS[side]} --out INDEX`"
                            + (", or query this one with --text" if side == "image" else
                               ", or query this one with --image / --image-id"))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. -k 10")
    if engine not in ENGINES:  # before the model is loaded
        raise MaxMatchError(f"unknown search engine '{engine}'", hint=f"use one of: {', '.join(ENGINES)}")
    ckpt_path = Path(checkpoint) if checkpoint is not None else (model.checkpoint if model is not None
                                                                 else index.checkpoint)
    index.check_checkpoint(ckpt_path)
    model = model if model is not None else load(ckpt_path, device)
    if texts is not None:
        queries = model.encode_texts(values)
    elif images is not None:
        queries = model.encode_images([Path(v) for v in values], extractor=_extraction_for(index, model))
    else:
        queries = _encode_image_ids(model, values, data or index.manifest["data"])
    ranking, engine = index.search(queries, k, engine=engine, candidates=candidates, nprobe=nprobe,
                                   device=model.device, block_size=block_size)
    results = []
    for q, (rows, scores) in enumerate(zip(ranking.indices.tolist(), ranking.scores.tolist())):
        hits = []
        for r, (row, score) in enumerate(((row, score) for row, score in zip(rows, scores) if row >= 0), 1):
            item_id, item_set, text = index.item(row)
            hits.append(Hit(r, row, item_id, score, _matching(torch.from_numpy(item_set), queries[q], side), text))
        results.append(hits)
    return results, engine


def _extraction_for(index, model) -> dict[str, Any] | None:
    """The feature extraction image-file queries must repeat (None for a checkpoint that reads pixels)."""
    if model.recipe.model.image_encoder == "cnn":
        return None
    extraction = index.image_extraction
    if extraction is None:
        raise MaxMatchError(f"the features of index {index.path} ({index.manifest['data']}) were not extracted from "
                            "image files by maxmatch (synthetic, precomputed or BUTD features), so a new image "
                            "cannot be encoded like them",
                            hint="query with an image of that feature file by id (--image-id ID), or index a "
                                 "feature file written by `extract-features --images`")
    return extraction


def _encode_image_ids(model, ids: list[Any], data: str | os.PathLike) -> torch.Tensor:
    from maxmatch_cli.features.store import open_store

    store = open_store(data)
    lookup = {str(_py(v)): i for i, v in enumerate(np.asarray(store.image_ids))}
    missing = [str(v) for v in ids if str(v) not in lookup]
    if missing:
        from maxmatch_cli.errors import first_few

        raise MaxMatchError(f"{store.path} has no image with id {first_few(missing)}",
                            hint="pass ids listed by `maxmatch features info`, or another feature file (--data)")
    return model.encode_images(store, [lookup[str(v)] for v in ids])


# ----------------------------------------------------------------------------------------------- search


def search_sets(sets: np.ndarray | torch.Tensor, queries: torch.Tensor, k: int, kind: str,
                options: dict[str, Any] | None = None, *, engine: str = "exact", element_index: Any = None,
                candidates: int | None = None, nprobe: int | None = None, query_side: str = "text",
                device: str | torch.device = "cpu", block_size: int | None = None):
    """Top-k gallery sets per query set: exhaustive exact scoring, or faiss candidates re-ranked exactly.

    Args:
        sets: ``(N, K, D)`` gallery sets (a float16 memory-map is fine); for ``faiss`` with L2-normalised
            elements, as :func:`build_element_index` indexed them.
        queries: ``(Q, K', D)`` query sets (any scale).
        k: results per query.
        kind, options: the similarity and its options.
        engine: ``exact`` or ``faiss``.
        element_index: the faiss index over the N x K gallery elements (``faiss`` only).
        candidates, nprobe: faiss search depth (:func:`default_candidates`, :data:`DEFAULT_NPROBE`).
        query_side: as for :func:`maxmatch_cli.retrieval.api.rank_sets`.
        device, block_size: where and in what blocks the exact scoring runs.

    Returns:
        :class:`~maxmatch_cli.retrieval.api.Ranking` ``(Q, k)``; with ``faiss``, rows -1 and scores -inf pad a query
        whose candidates number fewer than ``k``.
    """
    from maxmatch_cli.retrieval.api import rank_sets

    options = options or {}
    queries = torch.as_tensor(queries).float()
    queries = queries.unsqueeze(0) if queries.dim() == 2 else queries
    if engine == "exact":
        return rank_sets(queries, sets, kind, k, query_side=query_side, block_size=block_size, device=device,
                         **options)
    if engine != "faiss" or element_index is None:
        raise MaxMatchError(f"search engine '{engine}' needs an element index" if engine == "faiss"
                            else f"unknown search engine '{engine}'", hint="use engine='exact' or 'faiss'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. k=10")
    k = min(k, int(sets.shape[0]))  # as the exact engine: never more results than items
    pools = faiss_candidates(element_index, queries, int(sets.shape[1]), candidates, nprobe)
    return _rerank(sets, queries, pools, k, kind, options, query_side, device)


def _rerank(sets, queries: torch.Tensor, pools: list[np.ndarray], k: int, kind: str, options: dict[str, Any],
            query_side: str, device: str | torch.device, max_pairs: int = 8192):
    """Exact top-k of each query among its candidate rows (ascending), ties to the lower row.

    Queries are scored in groups: the candidates of a group are padded to one length P and gathered into a
    ``(Q, P, K, D)`` block, each query's cosines come from one GEMM ``(P*K, D) x (D, K')`` and the similarity's
    score function runs once over the ``(Q, P, K, K')`` matrices. One call per query, or one tiny matmul per
    pair (:func:`~maxmatch_cli.method.similarity.paired_similarity`), is several times slower at these sizes.
    """
    from maxmatch_cli.retrieval.api import Ranking, _as_float_tensor
    from maxmatch_cli.method.similarity import _resolve  # the kind's score function, options checked as set_similarity does

    spec, opts, _ = _resolve(kind, options)
    device = torch.device(device)
    rows = torch.full((len(pools), k), -1, dtype=torch.long)
    scores = torch.full((len(pools), k), float("-inf"))
    queries = F.normalize(queries.float(), dim=-1)
    start = 0
    while start < len(pools):
        stop, width = start + 1, len(pools[start])
        while stop < len(pools) and max(width, len(pools[stop])) * (stop + 1 - start) <= max_pairs:
            width, stop = max(width, len(pools[stop])), stop + 1
        if width:
            padded = np.zeros((stop - start, width), dtype=np.int64)  # row 0 pads; padded scores are dropped
            for i, pool in enumerate(pools[start:stop]):
                padded[i, : len(pool)] = pool
            gallery = _as_float_tensor(sets[padded.reshape(-1)]).to(device)
            n_q, (_, k_g, d) = stop - start, gallery.shape
            gallery = F.normalize(gallery, dim=-1).reshape(n_q, width * k_g, d)
            query = queries[start:stop].to(device)
            cos = torch.bmm(gallery, query.transpose(1, 2)).reshape(n_q, width, k_g, query.shape[1])
            block = spec.score(cos if query_side == "text" else cos.transpose(-1, -2), **opts).float().cpu()
            for i, pool in enumerate(pools[start:stop]):
                if len(pool):
                    got = block[i, : len(pool)]
                    order = torch.sort(got, descending=True, stable=True).indices[:k]
                    rows[start + i, : len(order)] = torch.from_numpy(pool)[order]
                    scores[start + i, : len(order)] = got[order]
        start = stop
    return Ranking(rows, scores)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MaxMatchError("the faiss engine needs the faiss-cpu package, which is not installed",
                            hint="pip install faiss-cpu, or use --engine exact") from None
    return faiss


def _check_nlist(nlist: int | None, n_vectors: int | None = None) -> None:
    """Refuse an ``nlist`` that is given and not an integer in 1..``n_vectors`` (the set elements, when known)."""
    hint = "leave --nlist unset for about the square root of the element count"
    if nlist is None:
        return
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise MaxMatchError(f"nlist must be a positive integer, got {nlist!r}", hint=hint)
    if n_vectors is not None and nlist > n_vectors:
        raise MaxMatchError(f"nlist={nlist} must lie in 1..{n_vectors} (the number of set elements)", hint=hint)


def default_nlist(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors`` elements: about their square root, with at least 39 training points per
    list (faiss's minimum for a stable k-means)."""
    return max(1, min(round(math.sqrt(n_vectors)), n_vectors // 39))


def build_element_index(sets: np.ndarray, path: str | os.PathLike, nlist: int | None = None, seed: int = 0,
                        chunk: int = 1 << 16) -> dict[str, Any]:
    """Write a faiss IVF index over every element of ``sets`` (element ``k`` of item ``i`` has id ``i*K + k``).

    Vectors are stored as fp16 (``IndexIVFScalarQuantizer`` with ``QT_fp16``) under the inner product, so with
    L2-normalised elements a search returns the highest cosines. k-means is trained on at most 64 x nlist
    sampled elements and the elements are added in chunks, so the float32 copies stay bounded.

    Args:
        sets: ``(N, K, D)`` sets with L2-normalised elements (a memory-map is read chunk by chunk).
        path: the file to write.
        nlist: inverted lists (default :func:`default_nlist`).
        seed: sampling and k-means seed.
        chunk: elements converted and added at a time.

    Returns:
        The manifest's ``element_index`` record.
    """
    faiss = _faiss()
    n, k, d = sets.shape
    n_vectors = n * k
    _check_nlist(nlist, n_vectors)
    nlist = default_nlist(n_vectors) if nlist is None else nlist
    flat = sets.reshape(n_vectors, d)
    rng = np.random.default_rng(seed)
    n_train = min(n_vectors, 64 * nlist)
    sample = np.sort(rng.choice(n_vectors, size=n_train, replace=False))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(flat[sample], dtype=np.float32))
    for start in range(0, n_vectors, chunk):
        index.add(np.ascontiguousarray(flat[start: start + chunk], dtype=np.float32))
    faiss.write_index(index, str(path))
    return {"kind": "faiss-ivf", "file": Path(path).name, "nlist": nlist, "vectors": "fp16",
            "metric": "inner_product", "n_elements": n_vectors, "train_size": n_train, "seed": seed,
            "faiss_version": faiss.__version__}


def read_element_index(path: str | os.PathLike):
    """Open a faiss element index memory-mapped (``IO_FLAG_MMAP``): the inverted lists stay in the file and the
    operating system pages in only the lists a search probes, so opening costs no memory per element.

    Raises:
        MaxMatchError: faiss is missing, or the file is not a readable faiss index.
    """
    faiss = _faiss()
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError as exc:
        raise MaxMatchError(f"cannot read the faiss element index {path} ({str(exc).splitlines()[0]})",
                            hint=f"the index is damaged; rebuild it (build it with `maxmatch index CKPT --data F.h5 --split test --out INDEX --engine faiss`)") from None


def default_candidates(n_items: int) -> int:
    """Nearest elements fetched per query element when none are asked for, for a gallery (or shard) of ``n_items``.

    The power of two at or above one per :data:`CANDIDATES_PER_ITEMS` items, at least :data:`DEFAULT_CANDIDATES`:
    128 up to 128K items, 1,024 at 1M. The two points it passes through are measured (benchmarks/RESULTS.md,
    "Index search", nprobe 32): recall@10 against exact search 0.97 with 128 at 100K items and 1.00 with 1,024 at
    1M, where 128 gave 0.49. A gallery's near-ties grow with its size (more items share each concept), so a fixed
    depth loses recall as the gallery grows; the cost grows with it (64 queries/s at 1M on 2 cores, still 15x the
    exhaustive engine).
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be a non-negative integer, got {n_items!r}")
    wanted = -(-n_items // CANDIDATES_PER_ITEMS)  # ceil
    return max(DEFAULT_CANDIDATES, 1 << max(0, wanted - 1).bit_length())


FAISS_GPU_MAX_K = 2048
"""faiss-gpu's k-selection limit: a GPU element index fetches at most this many elements per query element."""


def _check_depth(candidates: int | None, nprobe: int | None) -> None:
    """Refuse a ``candidates`` or ``nprobe`` that is given and not a positive integer."""
    for name, value in (("candidates", candidates), ("nprobe", nprobe)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MaxMatchError(f"{name} must be a positive integer, got {value!r}", hint=f"e.g. --{name} 64")


def search_depth(element_index: Any, gallery_k: int, candidates: int | None = None,
                 nprobe: int | None = None) -> tuple[int, int]:
    """``(elements fetched, lists probed)`` per query element, as :func:`faiss_candidates` searches
    ``element_index``: the defaults (:func:`default_candidates` of its items, :data:`DEFAULT_NPROBE`) or the values
    given, capped by its element and list counts and, on a faiss-gpu index, :data:`FAISS_GPU_MAX_K`.

    Raises:
        MaxMatchError: ``candidates`` or ``nprobe`` is not a positive integer.
    """
    n_elements = int(element_index.ntotal)
    if candidates is None:
        candidates = default_candidates(n_elements // max(int(gallery_k), 1))
    nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
    _check_depth(candidates, nprobe)
    nlist = getattr(element_index, "nlist", None) or element_index.getNumLists()  # CPU / faiss-gpu index
    fetch = min(candidates, n_elements)
    if type(element_index).__name__.startswith("Gpu"):
        fetch = min(fetch, FAISS_GPU_MAX_K)
    return fetch, min(nprobe, int(nlist))


def faiss_candidates(element_index: Any, queries: torch.Tensor, gallery_k: int, candidates: int | None = None,
                     nprobe: int | None = None) -> list[np.ndarray]:
    """Gallery rows owning the nearest elements of each query element, per query (sorted, unique).

    Args:
        element_index: from :func:`build_element_index`.
        queries: ``(Q, K', D)`` query sets (normalised here).
        gallery_k: K of the gallery sets (element id // K is the row).
        candidates: nearest elements fetched per query element (default: :func:`default_candidates` of the
            index's items).
        nprobe: inverted lists searched (default :data:`DEFAULT_NPROBE`, capped at nlist).

    The depth applied is :func:`search_depth`'s.
    """
    fetch, element_index.nprobe = search_depth(element_index, gallery_k, candidates, nprobe)
    q, kq, d = queries.shape
    if d != element_index.d:
        raise MaxMatchError(f"query elements have D={d}, the element index D={element_index.d}",
                            hint="query with the checkpoint the index was built with")
    flat = F.normalize(queries.float(), dim=-1).reshape(q * kq, d).numpy()
    _, ids = element_index.search(np.ascontiguousarray(flat), fetch)
    ids = ids.reshape(q, -1)
    return [np.unique(row[row >= 0] // gallery_k) for row in ids]
