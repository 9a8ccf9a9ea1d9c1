"""One index folder, opened: :class:`Index` (its sets memory-mapped) and its search."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.engines import engine_for, search_sets
from maxmatch_cli.retrieval.index.faiss_engine import _faiss, read_element_index
from maxmatch_cli.retrieval.index.format import SETS_FILE, checkpoint_fingerprint, index_file, is_milvus, read_folder
from maxmatch_cli.retrieval.index.metadata import OWNERS_FILE, PATHS_FILE, read_metadata

SETS_CHECK = "sets_check"
"""Manifest field: ``{"finite": true, "size", "mtime_ns"}`` of sets.npy when the build found every value finite."""
_SCAN_BYTES = 64 << 20


def sets_check_record(sets_file: Path) -> dict[str, Any]:
    """The manifest's record that ``sets_file`` (every batch checked while it was encoded) holds finite values only;
    valid while the file keeps this size and modification time."""
    st = os.stat(sets_file)
    return {"finite": True, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_finite_sets(index: "Index") -> None:
    """Refuse an index whose sets hold NaN or inf (it would answer with ``nan`` scores).

    Free when sets.npy is as the build left it (the manifest's :data:`SETS_CHECK` names its size and modification
    time); otherwise (an index built before the record, copied without keeping times, or a sets.npy changed since)
    the sets are scanned, ``_SCAN_BYTES`` at a time, at each opening.

    Raises:
        MaxMatchError: naming the index and its first bad rows (with their ids).
    """
    if index.milvus is not None:
        return  # checked batch by batch before the rows went into Milvus
    record = index.manifest.get(SETS_CHECK)
    st = os.stat(index.path / SETS_FILE)
    if isinstance(record, dict) and record.get("finite") is True and record.get("size") == st.st_size \
            and record.get("mtime_ns") == st.st_mtime_ns:
        return
    sets = index.sets
    step = max(1, _SCAN_BYTES // max(1, sets[:1].nbytes))
    bad: list[int] = []
    for start in range(0, len(sets), step):
        block = np.asarray(sets[start: start + step]).reshape(min(step, len(sets) - start), -1)
        bad.extend(int(start + r) for r in np.flatnonzero(~np.isfinite(block).all(axis=1)))
        if len(bad) >= 5:
            break
    if bad:
        from maxmatch_cli.errors import first_few

        rows = first_few([f"{r} (id {index.ids[r]})" for r in bad], 5)
        raise MaxMatchError(f"index {index.path}: {SETS_FILE} holds NaN or inf in rows {rows}; it would answer "
                            "with nan scores",
                            hint="rebuild the index with `maxmatch index` (it refuses a checkpoint or features "
                                 "that encode to NaN)")


@dataclass
class Index:
    """A loaded index (see :mod:`maxmatch_cli.retrieval.index.format` for the files).

    Attributes:
        path: the index folder.
        manifest: the parsed manifest.json.
        sets: ``(N, K, D)`` float16 array, memory-mapped read-only.
        ids: the N item ids.
        texts: the N caption strings of a captions index, else None.
        paths: the N image files of an images index whose feature file lists them, else None
            (:mod:`~maxmatch_cli.retrieval.index.metadata`).
        owners: the image id of each of the N captions of a captions index, else None (an index built before
            owners.json).
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    sets: np.ndarray = field(repr=False)
    ids: list[Any] = field(repr=False)
    texts: list[str] | None = field(default=None, repr=False)
    paths: list[str] | None = field(default=None, repr=False)
    owners: list[Any] | None = field(default=None, repr=False)
    _element_index: Any = field(default=None, init=False, repr=False, compare=False)
    _gpu_element_index: Any = field(default=None, init=False, repr=False, compare=False)
    milvus: Any = field(default=None, init=False, repr=False, compare=False)
    """The opened :class:`~maxmatch_cli.retrieval.index.milvus.search.MilvusCollection` of an index built with
    ``--engine milvus`` (its :attr:`sets` then fetch rows from it), else None."""

    @classmethod
    def open(cls, path: Path, milvus_token: str | None = None) -> "Index":
        """Open the index folder ``path`` (which must exist; :func:`~maxmatch_cli.retrieval.index.query.load_index`
        also opens folders of shards).

        Raises:
            MaxMatchError: the folder is incomplete, of another format version, or damaged.
        """
        index = cls(path, *read_folder(path))
        if is_milvus(index.manifest):  # the vectors are in Milvus: connect and check the collection now
            from maxmatch_cli.retrieval.index.milvus.search import MilvusSets, open_collection

            m = index.manifest
            index.milvus = open_collection(m["element_index"], int(m["n_items"]), int(m["K"]), int(m["D"]),
                                           m["checkpoint"]["fingerprint"], path, milvus_token)
            index.sets = MilvusSets(index.milvus)
        extra = read_metadata(path, index.manifest, len(index))
        index.paths, index.owners = extra.get(PATHS_FILE), extra.get(OWNERS_FILE)
        check_finite_sets(index)
        return index

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
        return bool(self.manifest.get("element_index")) and not is_milvus(self.manifest)

    def search(self, queries: torch.Tensor, k: int = 10, engine: str = "auto", candidates: int | None = None,
               nprobe: int | None = None, device: str | torch.device = "cpu",
               block_size: int | None = None) -> tuple[Any, str]:
        """The ``k`` best items for each query set (already encoded), and the engine that answered.

        Args:
            queries: ``(Q, K, D)`` query sets (caption sets for an image index).
            k: results per query.
            engine: ``exact``, ``faiss`` or ``auto`` (see :data:`~maxmatch_cli.retrieval.index.engines.ENGINES`).
            candidates: faiss: nearest gallery elements per query element (default
                :func:`~maxmatch_cli.retrieval.index.faiss_engine.default_candidates`).
            nprobe: faiss: inverted lists searched (default
                :data:`~maxmatch_cli.retrieval.index.faiss_engine.DEFAULT_NPROBE`, at most the index's nlist).
            device: where the exact scoring runs.
            block_size: gallery sets per scoring block.

        Returns:
            ``(ranking, engine)``: a :class:`~maxmatch_cli.retrieval.api.Ranking` (rows -1 and scores -inf where the
            faiss candidates of a query ran out before ``k``) and ``"exact"`` or ``"faiss"``.

        Raises:
            MaxMatchError: an unknown engine, or faiss asked for but missing (the package or the element index).
        """
        chosen = engine_for(engine, self)
        if self.milvus is not None and chosen.name != "milvus":
            raise MaxMatchError(f"index {self.path} keeps its vectors in Milvus ({self.milvus.uri}); the {chosen.name} "
                                "engine searches local sets", hint="use --engine milvus (or auto)")
        element_index = chosen.open(self, device)
        side = "text" if self.kind == "images" else "image"
        ranking = search_sets(self.sets, queries, k, self.similarity, self.similarity_options, engine=chosen.name,
                              element_index=element_index, candidates=candidates, nprobe=nprobe,
                              query_side=side, device=device, block_size=block_size)
        return ranking, chosen.name

    def element_index(self, device: str | torch.device = "cpu"):
        """The faiss element index (memory-mapped on first use,
        :func:`~maxmatch_cli.retrieval.index.faiss_engine.read_element_index`); for a CUDA ``device`` with a faiss
        build that sees GPUs (faiss-gpu), a copy on the GPUs."""
        if self._element_index is None:
            self._element_index = read_element_index(index_file(self.path, self.manifest["element_index"]["file"],
                                                                "element_index.file of the manifest"))
        if torch.device(device).type == "cuda":
            faiss = _faiss()
            if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                if self._gpu_element_index is None:
                    self._gpu_element_index = faiss.index_cpu_to_all_gpus(self._element_index)
                return self._gpu_element_index
        return self._element_index

    @property
    def image_extraction(self) -> dict[str, Any] | None:
        """How the gallery's image features were extracted (``extract-features images``), else None."""
        return self.manifest.get("image_extraction")

    def describe(self, row: int) -> dict[str, Any]:
        """What a person is shown of one row besides its id: ``text`` (a caption), ``path`` (an image file) and
        ``image_id`` (a caption's image), each only where the index knows it."""
        values = (("text", self.texts), ("path", self.paths), ("image_id", self.owners))
        return {name: column[row] for name, column in values if column is not None}

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
