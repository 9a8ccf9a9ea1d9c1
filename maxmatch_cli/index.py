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
==============  ===========================================================================================

A build streams: the gallery is encoded ``batch_size`` items at a time into a preallocated
:func:`numpy.lib.format.open_memmap`, so memory stays bounded whatever the gallery size. It writes into a hidden
temporary folder next to the target, writes the manifest last and renames the folder into place, so a failed or
killed build never leaves a folder at the target path that looks complete (an interrupted ``--overwrite`` keeps
the old index).

The checkpoint fingerprint is the SHA-256 of the checkpoint's safetensors header (tensor layout plus metadata:
recipe, vocabulary, provenance with its creation time), cheap to read and unchanged by copying or touching the
file; a query that would encode its text with another checkpoint is refused.

Search engine: exhaustive exact scoring. Every query is scored against every gallery set with
:meth:`maxmatch_cli.api.Model.rank`, block by block over the memory-mapped sets, so results are exactly the
top-k under the index's similarity (of the float16-stored sets); cost grows linearly with the gallery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError

__all__ = ["FORMAT", "FORMAT_VERSION", "Hit", "Index", "build_index", "checkpoint_fingerprint", "load_index",
           "query_index"]

FORMAT = "maxmatch-index"
FORMAT_VERSION = 1
"""Version of the folder layout; an index of another version is refused (rebuild it)."""
KINDS = ("images", "captions")
ENGINE = "exhaustive-exact"
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
    manifest: dict[str, Any]
    sets: np.ndarray
    ids: list[Any]
    texts: list[str] | None = None

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


def load_index(path: str | os.PathLike) -> Index:
    """Open an index folder written by :func:`build_index` (the sets memory-mapped, read-only).

    Raises:
        MaxMatchError: the folder is missing, incomplete, of another format version, or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise MaxMatchError(f"index {path} does not exist", hint=_BUILD_HINT)
    if not path.is_dir():
        raise MaxMatchError(f"{path} is a file, not an index folder", hint=_BUILD_HINT)
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
        manifest["checkpoint"]["path"], manifest["checkpoint"]["fingerprint"], manifest["similarity"]
        if manifest["kind"] not in KINDS:
            raise ValueError(f"kind {manifest['kind']!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MaxMatchError(f"the manifest of index {path} lacks or garbles a field ({exc})",
                            hint=f"rebuild the index ({_BUILD_HINT})") from None
    try:
        sets = np.load(path / "sets.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise MaxMatchError(f"cannot read the sets of index {path} ({exc})",
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
                overwrite: bool = False, show_progress: bool = True) -> Index:
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

    Returns:
        The written :class:`Index`.

    Raises:
        MaxMatchError: bad inputs, an existing ``out`` without ``overwrite``, or a folder that cannot be written.
    """
    from maxmatch_cli import __version__
    from maxmatch_cli.api import load
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.progress import make_progress

    if kind not in KINDS:
        raise MaxMatchError(f"unknown index kind '{kind}'", hint="use --kind images or --kind captions")
    if batch_size is not None and batch_size < 1:
        raise MaxMatchError(f"batch size must be positive, got {batch_size}", hint="e.g. --batch-size 256")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty folder is simply filled
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
    if kind == "images":
        from maxmatch_cli.evaluate import check_features

        check_features(_Ckpt(model.checkpoint, recipe), store)
        ids = [_py(v) for v in np.asarray(store.image_ids)[rows]]
        texts = None
    else:
        ids = [int(v) for v in rows]
        texts = store.captions_text(rows)
    batch_size = batch_size or recipe.eval.batch_size
    n, k, d = len(rows), model.num_embeds, model.embed_dim

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    except OSError as exc:
        raise MaxMatchError(f"cannot write to {out.parent}: {exc.strerror or exc}",
                            hint="choose an output folder you can write to (--out)") from None
    try:
        sets = np.lib.format.open_memmap(tmp / "sets.npy", mode="w+", dtype=np.float16, shape=(n, k, d))
        with make_progress(transient=True) as progress:
            task = progress.add_task(f"encoding {kind}", total=n, unit=kind[:3], status="", visible=show_progress)
            for start in range(0, n, batch_size):
                chunk = rows[start: start + batch_size]
                if kind == "images":
                    encoded = model.encode_images(store, chunk, batch_size=batch_size)
                else:
                    encoded = model.encode_texts(texts[start: start + batch_size], batch_size=batch_size)
                sets[start: start + len(chunk)] = F.normalize(encoded, dim=-1).numpy().astype(np.float16)
                progress.advance(task, len(chunk))
        sets.flush()
        del sets
        _write_json(tmp / "ids.json", ids)
        if texts is not None:
            _write_json(tmp / "texts.json", texts)
        stat = model.checkpoint.stat()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "n_items": n, "K": k, "D": d,
            "dtype": "float16", "normalized": True, "similarity": model.similarity,
            "similarity_options": model.similarity_options(model.similarity), "engine": ENGINE,
            "checkpoint": {"path": str(model.checkpoint.resolve()),
                           "fingerprint": checkpoint_fingerprint(model.checkpoint),
                           "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "data": str(Path(store.path).resolve()), "data_fingerprint": store.fingerprint(), "split": split,
            "maxmatch_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(tmp / "manifest.json", manifest)  # last: a folder with a manifest is whole
        _chmod_published(tmp)
        _publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_index(out)


@dataclass
class _Ckpt:
    """What :func:`maxmatch_cli.evaluate.check_features` reads of a checkpoint."""

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
    """

    rank: int
    row: int
    id: Any
    score: float
    matching: list[tuple[int, int, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "row": self.row, "id": self.id, "score": self.score,
                "matching": [{"query_element": q, "gallery_element": g, "cosine": c} for q, g, c in self.matching]}


def _matching(gallery_set: torch.Tensor, query_set: torch.Tensor) -> list[tuple[int, int, float]]:
    """The MaxMatch pairs of one gallery (image) set and one query (text) set, with their cosines."""
    from maxmatch_cli.similarity import cosine_matrices, maxmatch_assignment

    img, txt = gallery_set.unsqueeze(0), query_set.unsqueeze(0)
    perm = maxmatch_assignment(img, txt)[0, 0]  # image element v -> text element perm[v] (-1: unmatched)
    cos = cosine_matrices(img, txt)[0, 0]
    pairs = [(int(t), v, float(cos[v, t])) for v, t in enumerate(perm.tolist()) if t >= 0]
    return sorted(pairs)


def query_index(index: Index | str | os.PathLike, texts: Sequence[str], k: int = 10,
                checkpoint: str | os.PathLike | None = None, device: str = "auto", model: Any = None,
                block_size: int | None = None) -> list[list[Hit]]:
    """Search an image index with captions: exhaustive exact scoring under the index's similarity.

    Args:
        index: an :class:`Index` or its folder.
        texts: one or more queries.
        k: results per query.
        checkpoint: the checkpoint to encode the queries with (default: the one the index records); it must be
            the file the index was built with.
        device: where to encode and score.
        model: an already loaded :class:`~maxmatch_cli.api.Model` of that checkpoint (skips loading).
        block_size: gallery sets scored per block.

    Returns:
        For each query, its hits best first.

    Raises:
        MaxMatchError: an empty query, a captions index, a checkpoint other than the index's, a bad index.
    """
    from maxmatch_cli.api import load

    index = index if isinstance(index, Index) else load_index(index)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not t.strip() for t in texts):
        raise MaxMatchError("empty query", hint='pass the text to search for, e.g. --text "a dog on a sofa"')
    if index.kind != "images":
        raise MaxMatchError(f"index {index.path} holds captions; text queries search an image index",
                            hint="build one with `maxmatch index CKPT --kind images --out INDEX`")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. -k 10")
    ckpt_path = Path(checkpoint) if checkpoint is not None else (model.checkpoint if model is not None
                                                                 else index.checkpoint)
    index.check_checkpoint(ckpt_path)
    model = model if model is not None else load(ckpt_path, device)
    queries = model.encode_texts(texts)
    ranking = model.rank(queries, index.sets, kind=index.similarity, k=k, query_side="text",
                         block_size=block_size, **index.similarity_options)
    results = []
    for q, (rows, scores) in enumerate(zip(ranking.indices.tolist(), ranking.scores.tolist())):
        hits = []
        for r, (row, score) in enumerate(zip(rows, scores), 1):
            gallery_set = torch.from_numpy(np.asarray(index.sets[row], dtype=np.float32))
            hits.append(Hit(r, row, index.ids[row], score, _matching(gallery_set, queries[q])))
        results.append(hits)
    return results
