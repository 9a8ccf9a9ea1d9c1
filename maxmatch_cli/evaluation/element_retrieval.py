"""What each element of a query's set retrieves (paper §4.5, Figures 5–7).

Reading (the paper says "for each embedding in the set, we show the top retrieved image" and "selecting the
closest test sample for each query embedding", without naming the score): element ``k`` of a query set ``q``
ranks the gallery of the other modality by its **best cosine to any element of the candidate's set**,

    s_k(g) = max_l cos(q_k, g_l),

and retrieves the top-ranked item (ties: the lowest gallery index). It is what MaxMatch and MIL both score for
the one-element set ``{q_k}`` against a candidate (the best assignment of one element is its best match), so it
does not depend on the model's similarity; smooth-Chamfer or top-k with k > 1 on ``{q_k}`` would mix the
candidate's other elements into the score of element k, which is not "what element k retrieves".

Collapse at a glance: the number of **distinct items** among a query's K top-1 items. A collapsed set (all
elements alike) retrieves one item K times: 1; a set whose elements point at different items: up to K. It is
averaged over the examples shown and over every query of the split (both in ``collapse.json``).

Examples: image-to-text queries are images of the split; text-to-image queries are the first caption of the
same images, so one pick shows both directions of one image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.fileio import escapes_folder
from maxmatch_cli.progress import make_progress

__all__ = ["READING", "ElementRetrieval", "distinct_counts", "element_retrieval",
           "element_top1", "image_files", "open_compare", "pick_examples", "split_items"]

READING = ("element k of a query set retrieves the item of the other modality whose set holds its most similar "
           "element: score s_k(g) = max over the elements g_l of candidate g of cos(q_k, g_l); ties go to the "
           "lowest index")

# Cosines held at once while ranking (rows x gallery elements): 16M floats = 64 MB.
_MAX_CELLS = 1 << 24


@torch.no_grad()
def element_top1(queries: torch.Tensor, gallery: torch.Tensor, device: torch.device | str = "cpu",
                 max_cells: int = _MAX_CELLS, show_progress: bool = False,
                 what: str = "top-1 per element") -> tuple[torch.Tensor, torch.Tensor]:
    """Each query element's top-1 gallery item under ``s_k(g) = max_l cos(q_k, g_l)`` (see :data:`READING`).

    Args:
        queries: (Q, K, D) query sets, any scale (elements are L2-normalised here).
        gallery: (G, K', D) gallery sets.
        device: where to compute.
        max_cells: at most this many cosines at once (bounds memory; the result does not depend on it).
        show_progress: a progress bar (in a log: a line) named ``what``.

    Returns:
        ``(index, score)``: (Q, K) int64 gallery indices (ties: the lowest) and (Q, K) float32 scores, on the CPU.
    """
    if queries.dim() != 3 or gallery.dim() != 3 or queries.shape[-1] != gallery.shape[-1]:
        raise MaxMatchError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} must be (Q, K, D) "
                            "and (G, K', D) sets of one dimension D")
    device = torch.device(device)
    q, k, dim = queries.shape
    g, k_gal = gallery.shape[:2]
    flat = F.normalize(queries.float(), dim=-1).reshape(q * k, dim)
    gal = F.normalize(gallery.float(), dim=-1).reshape(g * k_gal, dim).to(device)
    index = torch.empty(q * k, dtype=torch.long)
    score = torch.empty(q * k, dtype=torch.float32)
    rows = max(1, max_cells // max(1, g * k_gal))
    with make_progress(transient=True) as progress:
        task = progress.add_task(what, total=q * k, unit="elements", status="", visible=show_progress)
        for start in range(0, q * k, rows):
            block = flat[start: start + rows].to(device)
            per_item = (block @ gal.T).view(block.shape[0], g, k_gal).amax(dim=-1)  # (rows, G): s_k(g)
            best, where = per_item.max(dim=1)  # the first maximum: the lowest index among ties
            index[start: start + block.shape[0]] = where.cpu()
            score[start: start + block.shape[0]] = best.float().cpu()
            progress.advance(task, block.shape[0])
    return index.view(q, k), score.view(q, k)


def distinct_counts(top: torch.Tensor) -> torch.Tensor:
    """(Q, K) item indices -> (Q,) number of distinct items in each row (1 = collapsed, K = all different)."""
    if top.shape[1] == 0:
        return torch.zeros(top.shape[0], dtype=torch.long)
    s = top.sort(dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)


def pick_examples(spec: int | str, image_ids: Sequence[Any]) -> list[int]:
    """Split positions of the images whose queries are shown.

    Args:
        spec: a count N (N images spread evenly over the split, first and last included; 0: none), or image ids
            separated by commas (``"391895,522418"``), matched against the split's image ids as text.
        image_ids: the split's image ids, in split order.

    Returns:
        Split positions, in the order asked for.

    Raises:
        MaxMatchError: a negative count or an id that is not in the split.
    """
    n = len(image_ids)
    text = str(spec).strip()
    if isinstance(spec, int) or text.lstrip("-").isdigit() and "," not in text:
        count = int(text)
        if count < 0:
            raise MaxMatchError(f"--examples {count} is negative", hint="a number of images (0: none) or image ids")
        if count == 0 or n == 0:
            return []
        return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    position = {str(i): p for p, i in enumerate(image_ids)}
    missing = [w for w in wanted if w not in position]
    if missing or not wanted:
        known = ",".join(str(i) for i in list(image_ids)[:3])
        raise MaxMatchError(f"--examples {text!r}: image id(s) {first_few(missing or [text])} not in the split "
                            f"({n:,} images)", hint=f"pass a count or ids of the split's images, e.g. --examples "
                                                   f"{known}{',' if n == 1 else ''}")
    return list(dict.fromkeys(position[w] for w in wanted))


def image_files(store, indices: Sequence[int], root: str | os.PathLike | None = None) -> list[str | None]:
    """The image file of each stored image, where the feature file knows it and it exists; else None.

    A store that lists its image files (``extract-features images``: ``--kind pixels``, and ``--kind grid|region``
    since they record them) finds them under its ``image_root``, or under ``root`` when given (a folder moved
    since). Other stores keep only ids (synthetic, precomputed, BUTD TSV, or extracted before files were
    recorded); with ``root`` given, an id names ``root / id`` when it is a relative path (what ``extract-features
    images`` stores for a folder or a plain captions file), or ``root / filepath / filename`` of its entry in the
    Karpathy json the store was extracted from (its metadata's ``captions``, when that file is still there).
    """
    files = getattr(store, "image_files", None)
    relpaths = _karpathy_paths(store) if files is None and root is not None else {}
    out: list[str | None] = []
    for i in indices:
        path = None
        if files is not None:
            path = store.image_path(int(i), root)
        elif root is not None:
            ident = _plain(store.image_ids[int(i)])
            rel = ident if isinstance(ident, str) else relpaths.get(ident)
            if rel and not escapes_folder(rel):
                path = Path(root) / rel
        out.append(str(path) if path is not None and path.is_file() else None)
    return out


def _karpathy_paths(store) -> dict[Any, str]:
    """Image id -> relative path from the Karpathy json named in the store's metadata; {} when there is none."""
    from maxmatch_cli.features.karpathy import load_karpathy

    source = (getattr(store, "metadata", None) or {}).get("captions")
    if not isinstance(source, str) or not source.lower().endswith(".json") or not Path(source).is_file():
        return {}
    try:
        return {entry.key: entry.relpath for entry in load_karpathy(source, captions_per_image=0)}
    except MaxMatchError:  # a plain .json captions list, or a file changed since: ids only
        return {}


@dataclass
class SplitItems:
    """What the examples show of a split's items: ids, caption texts and image files."""

    image_ids: list[Any]
    captions: list[str]
    image_files: list[str | None]
    captions_per_image: int


@dataclass
class ElementRetrieval:
    """One model's per-element retrieval (see the module docstring)."""

    checkpoint: str
    K: int
    distinct: dict[str, dict[str, float]]
    """``{"i2t": {"shown", "split", "shown_images", "split_images"}, "t2i": {"shown", "split"}}``: mean number
    of distinct top-1 items per query (i2t also counts the captions' images); None when no query is shown."""
    examples: list[dict[str, Any]]
    """One record per shown query (both directions), see :func:`element_retrieval`."""
    trained_with: str = ""
    """The checkpoint's training similarity (``loss.similarity``), to label it."""
    reading: str = READING

    def to_json(self) -> dict[str, Any]:
        """A plain record for ``collapse.json`` and the figure and page writers."""
        return {"checkpoint": self.checkpoint, "trained_with": self.trained_with, "K": self.K,
                "reading": self.reading, "distinct": self.distinct, "examples": self.examples}


def element_retrieval(images: torch.Tensor, captions: torch.Tensor, items: SplitItems, picks: Sequence[int],
                      checkpoint: str = "", device: torch.device | str = "cpu",
                      trained_with: str = "", show_progress: bool = False) -> ElementRetrieval:
    """Top-1 item of every element of every query, both directions; records for the picked images.

    Args:
        images: (N, K, D) image sets of the split.
        captions: (N cpi, K', D) caption sets, grouped by image.
        items: the split's ids, caption texts and image files.
        picks: split positions of the images to show (:func:`pick_examples`).
        checkpoint: named in the result.
        trained_with: the checkpoint's training similarity, named in the result.
        show_progress: a progress bar per direction.
        device: where to rank.

    Returns:
        :class:`ElementRetrieval`. Each example record: ``direction`` (``i2t`` | ``t2i``), ``query``
        (``{"image", "image_id", "image_file"}``, plus ``"described_as"``, the image's first caption, for i2t and
        ``"caption", "text"`` for t2i), ``distinct`` (how many different items its K elements retrieved) and
        ``elements``: per query element ``{"k" (1-based), "item", "score", "correct", "same_as"}`` where item is a
        caption position (i2t: with its ``text`` and ``image``) or an image position (t2i: with ``image_id``,
        ``image_file`` and ``described_as``, its first caption); ``correct``: the item belongs to the query's own
        pair; ``same_as``: the first earlier element (1-based) that retrieved the same item, or None.
    """
    cpi = items.captions_per_image
    i2t, i2t_s = element_top1(images, captions, device, show_progress=show_progress,
                              what="image elements' top-1 captions")
    t2i, t2i_s = element_top1(captions, images, device, show_progress=show_progress,
                              what="caption elements' top-1 images")
    picks = list(picks)
    first_caps = [p * cpi for p in picks]

    def mean(x: torch.Tensor) -> float | None:  # None (JSON null) over no query
        return float(x.double().mean()) if x.numel() else None

    distinct = {
        "i2t": {"shown": mean(distinct_counts(i2t[picks])), "split": mean(distinct_counts(i2t)),
                "shown_images": mean(distinct_counts(i2t[picks] // cpi)),
                "split_images": mean(distinct_counts(i2t // cpi))},
        "t2i": {"shown": mean(distinct_counts(t2i[first_caps])), "split": mean(distinct_counts(t2i))}}
    examples = [_i2t_record(p, i2t[p], i2t_s[p], items) for p in picks]
    examples += [_t2i_record(p, t2i[p * cpi], t2i_s[p * cpi], items) for p in picks]
    return ElementRetrieval(checkpoint, images.shape[1], distinct, examples, trained_with)


def _image(items: SplitItems, p: int) -> dict[str, Any]:
    return {"image": int(p), "image_id": _plain(items.image_ids[p]), "image_file": items.image_files[p]}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _elements(top: torch.Tensor, score: torch.Tensor, correct: list[bool]) -> list[dict[str, Any]]:
    out, first = [], {}
    for k, (item, s) in enumerate(zip(top.tolist(), score.tolist())):
        out.append({"k": k + 1, "item": int(item), "score": float(s), "correct": correct[k],
                    "same_as": first.get(item)})
        first.setdefault(item, k + 1)
    return out


def _i2t_record(p: int, top: torch.Tensor, score: torch.Tensor, items: SplitItems) -> dict[str, Any]:
    cpi = items.captions_per_image
    elements = _elements(top, score, [int(j) // cpi == p for j in top.tolist()])
    for e in elements:
        e.update(text=items.captions[e["item"]], image=e["item"] // cpi)
    query = {**_image(items, p), "described_as": items.captions[p * cpi]}
    return {"direction": "i2t", "query": query, "distinct": len(set(top.tolist())), "elements": elements}


def _t2i_record(p: int, top: torch.Tensor, score: torch.Tensor, items: SplitItems) -> dict[str, Any]:
    c = p * items.captions_per_image
    elements = _elements(top, score, [int(g) == p for g in top.tolist()])
    for e in elements:
        e.update(_image(items, e["item"]), described_as=items.captions[e["item"] * items.captions_per_image])
        del e["image"]
    query = {**_image(items, p), "caption": c, "text": items.captions[c]}
    return {"direction": "t2i", "query": query, "distinct": len(set(top.tolist())), "elements": elements}


def split_items(store, split: str, captions_per_image: int, root: str | os.PathLike | None = None) -> SplitItems:
    """The ids, caption texts and image files of ``split`` (caption j of the split belongs to image j // cpi)."""
    from maxmatch_cli.data.datasets import split_layout

    images, captions = split_layout(store, split, captions_per_image)
    ids = [_plain(i) for i in np.asarray(store.image_ids, dtype=object)[images]]
    return SplitItems(ids, store.captions_text(captions), image_files(store, images, root), captions_per_image)


def open_compare(first: tuple[str | Path, Any], checkpoint: str | Path, data: str | None, split: str,
                 captions_per_image: int):
    """Load the ``--compare`` checkpoint and its store, checked to see the first checkpoint's images and captions
    of ``split``, in the same order (before anything is encoded).

    Args:
        first: (checkpoint path, open store) of the analysed checkpoint.
        checkpoint: the checkpoint to compare with.
        data: feature file for it (default: its recipe's ``data.path``); when given, the first one's store.
        split: the split both are analysed on.
        captions_per_image: the first checkpoint's.

    Returns:
        ``(checkpoint, store)``.

    Raises:
        MaxMatchError: the two see different images or captions, or another number of captions per image.
    """
    from maxmatch_cli.evaluation.encoding import check_features
    from maxmatch_cli.evaluation.ensemble import check_aligned
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cpi = ckpt.recipe.data.captions_per_image
    if cpi != captions_per_image:
        raise MaxMatchError(f"--compare {checkpoint}: its recipe has {cpi} captions per image, {first[0]} has "
                            f"{captions_per_image}", hint="compare checkpoints trained on one dataset")
    store = first[1] if data else open_store(ckpt.recipe.data.path)
    try:
        check_aligned(first, (ckpt.path, store), split, cpi)
    except MaxMatchError as exc:
        raise MaxMatchError(f"--compare: {exc.message}", hint="compare checkpoints on the same images and "
                            "captions: pass --data FILE for both, or feature files of the same split") from None
    check_features(ckpt, store)
    return ckpt, store
