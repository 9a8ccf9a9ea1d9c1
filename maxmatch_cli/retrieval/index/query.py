"""Opening an index folder (one index or a folder of shards) and answering queries: text against an image
index, images (files or ids of a feature file) against a captions index."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.engines import check_engine
from maxmatch_cli.retrieval.index.folder import Index
from maxmatch_cli.retrieval.index.format import BUILD_HINT, MANIFEST_FILE, json_value
from maxmatch_cli.retrieval.index.interface import check_depth
from maxmatch_cli.retrieval.index.metadata import caption_owners
from maxmatch_cli.retrieval.index.shards import ShardedIndex, shard_folders


def load_index(path: str | os.PathLike, milvus_token: str | None = None) -> Index | ShardedIndex:
    """Open an index folder written by :func:`~maxmatch_cli.retrieval.index.build.build_index` (the sets
    memory-mapped, read-only), or a folder of shards built with ``shard=(i, n)`` (a
    :class:`~maxmatch_cli.retrieval.index.shards.ShardedIndex`). An index built with ``--engine milvus`` connects
    to its collection (``milvus_token``: the server's token, default ``$MAXMATCH_MILVUS_TOKEN``) and checks it is
    complete.

    Raises:
        MaxMatchError: the folder is missing, incomplete, of another format version, or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise MaxMatchError(f"index {path} does not exist", hint=BUILD_HINT)
    if not path.is_dir():
        raise MaxMatchError(f"{path} is a file, not an index folder", hint=BUILD_HINT)
    if not (path / MANIFEST_FILE).is_file() and shard_folders(path):
        return ShardedIndex.open(path)
    return Index.open(path, milvus_token)


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
        path: the image file, for a hit of an images index whose feature file lists its files (else None: the
            id is all the index knows).
        image_id: the id of the caption's image, for a hit of a captions index that knows it.
        own: for a query by image id against a captions index: whether the caption is one of that image's own
            (its ground truth); None where the index cannot tell.
    """

    rank: int
    row: int
    id: Any
    score: float
    matching: list[tuple[int, int, float]] = field(default_factory=list)
    text: str | None = None
    path: str | None = None
    image_id: Any = None
    own: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The hit as ``maxmatch query --json`` prints it."""
        out = {"rank": self.rank, "row": self.row, "id": self.id, "score": self.score}
        for name in ("text", "path", "image_id", "own"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
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
        index: an :class:`~maxmatch_cli.retrieval.index.folder.Index`, a
            :class:`~maxmatch_cli.retrieval.index.shards.ShardedIndex`, or its folder.
        texts: caption queries.
        k: results per query.
        checkpoint: the checkpoint to encode the queries with (default: the one the index records); it must be
            the file the index was built with.
        device: where to encode and score.
        model: an already loaded :class:`~maxmatch_cli.retrieval.api.Model` of that checkpoint (skips loading).
        block_size: gallery sets scored per block.
        engine, candidates, nprobe: as for :meth:`~maxmatch_cli.retrieval.index.folder.Index.search`.
        images: image files; their features are extracted as the index's feature file's were (it must have been
            written by ``extract-features images``, or the checkpoint must read pixels itself).
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

    check_depth(candidates, nprobe)  # also when the exact engine ignores them
    index = index if isinstance(index, (Index, ShardedIndex)) else load_index(index)
    side, values = _query_values(index, texts, images, image_ids)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MaxMatchError(f"k must be a positive integer, got {k!r}", hint="e.g. -k 10")
    check_engine(engine)  # before the model is loaded
    if model is None and isinstance(device, str):
        from maxmatch_cli.devices import resolve_device

        device = resolve_device(device)  # a bad name is refused before the model loads
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
            hit = Hit(r, row, item_id, score, _matching(torch.from_numpy(item_set), queries[q], side), text)
            hits.append(_described(hit, index, values[q] if image_ids is not None else None))
        results.append(hits)
    return results, engine


@dataclass
class QueryAnswer:
    """What ``maxmatch query`` shows: the queries, their hits, and how the index was searched.

    Attributes:
        index: the opened index (one folder or a folder of shards).
        side: the kind of query: ``text``, ``image`` (image files) or ``image_id``.
        queries: the queries as given (image files as strings).
        hits: for each query its hits, best first.
        k: results asked per query.
        engine: the engine that answered.
        depth: what the engine's candidate search applied (``candidates``, ``nprobe``, ``ef``, ``milvus_index``);
            empty for the exact engine.
        checkpoint: the checkpoint the queries were encoded with.
    """

    index: Index | ShardedIndex
    side: str
    queries: list[Any]
    hits: list[list[Hit]]
    k: int
    engine: str
    depth: dict[str, Any]
    checkpoint: Path


def answer_queries(path: str | os.PathLike, texts: Sequence[str] | None = None,
                   images: Sequence[str | os.PathLike] | None = None, image_ids: Sequence[Any] | None = None, *,
                   k: int = 10, checkpoint: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                   device: str = "auto", engine: str = "auto", candidates: int | None = None,
                   nprobe: int | None = None, milvus_token: str | None = None) -> QueryAnswer:
    """Open the index folder ``path`` (:func:`load_index`), run :func:`query_index` on it, and report how it was
    searched: the body of ``maxmatch query``.

    Raises:
        MaxMatchError: as :func:`load_index` and :func:`query_index`.
    """
    index = load_index(path, milvus_token=milvus_token)
    hits, used = query_index(index, texts, k=k, checkpoint=checkpoint, device=device, engine=engine,
                             candidates=candidates, nprobe=nprobe, images=images, image_ids=image_ids, data=data)
    side, given = (("text", texts) if texts is not None else ("image", images) if images is not None else
                   ("image_id", image_ids))
    queries = [given] if isinstance(given, (str, Path, int)) else list(given)
    queries = [str(q) for q in queries] if side == "image" else queries
    return QueryAnswer(index, side, queries, hits, k, used, search_depth_used(index, used, candidates, nprobe, device),
                       Path(checkpoint or index.checkpoint))


def search_depth_used(index: Index | ShardedIndex, engine: str, candidates: int | None, nprobe: int | None,
                      device: str) -> dict[str, Any]:
    """What ``engine``'s candidate search applied on ``index`` for these options: faiss's ``candidates`` and
    ``nprobe`` (one value, or the distinct values of the shards, sorted), Milvus's ``candidates``, its search
    params and ``milvus_index``; ``{}`` for the exact engine."""
    if engine == "milvus":
        from maxmatch_cli.retrieval.index.milvus.search import milvus_depth

        fetched, params = milvus_depth(index.milvus, candidates, nprobe)
        return {"candidates": fetched, **params, "milvus_index": index.milvus.index_type}
    if engine == "faiss":
        from maxmatch_cli.devices import resolve_device
        from maxmatch_cli.retrieval.index.faiss_engine import search_depth

        dev = resolve_device(device)
        per_part = [search_depth(part.element_index(dev), part.manifest["K"], candidates, nprobe)
                    for part in getattr(index, "shards", [index])]
        return {name: values[0] if len(values) == 1 else values
                for name, values in (("candidates", sorted({c for c, _ in per_part})),
                                     ("nprobe", sorted({p for _, p in per_part})))}
    return {}


def _described(hit: Hit, index: Any, query_image_id: Any = None) -> Hit:
    """``hit`` with what a person is shown besides its id: its image file, or its caption's image and, for a query
    by ``query_image_id``, whether the caption is that image's own."""
    describe = getattr(index, "describe", None)  # an index object without metadata shows ids (and texts) only
    hit.path = describe(hit.row).get("path") if describe is not None else None
    if index.kind == "captions":
        owners = caption_owners(index)
        if owners is not None:
            hit.image_id = owners[hit.row]
            if query_image_id is not None:
                hit.own = str(hit.image_id) == str(query_image_id)
    return hit


def _query_values(index: Index | ShardedIndex, texts: Any, images: Any, image_ids: Any) -> tuple[str, list[Any]]:
    """``(side, queries)``: ``text`` or ``image`` and the list of queries, checked to be of exactly one kind,
    non-empty, and of the kind the index answers."""
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
    return side, values


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
                                 "feature file written by `extract-features images`")
    return extraction


def _encode_image_ids(model, ids: list[Any], data: str | os.PathLike) -> torch.Tensor:
    from maxmatch_cli.features.store import open_store

    store = open_store(data)
    lookup = {str(json_value(v)): i for i, v in enumerate(np.asarray(store.image_ids))}
    missing = [str(v) for v in ids if str(v) not in lookup]
    if missing:
        from maxmatch_cli.errors import first_few

        raise MaxMatchError(f"{store.path} has no image with id {first_few(missing)} (its ids: "
                            f"{first_few(list(lookup))})",
                            hint="pass one of its ids (an images index's query results show them), or another "
                                 "feature file (--data)")
    return model.encode_images(store, [lookup[str(v)] for v in ids])
