"""ECCV Caption and CxC metrics on the COCO 5K test split (``maxmatch evaluate --protocol eccv`` / ``cxc``).

Both benchmarks re-annotate the Karpathy 5K COCO test split with more positives per query: ECCV Caption (Chun et
al., ECCV 2022) for 1,261 image and 1,332 caption queries, scored by mAP@R, R-Precision and R@1; CxC (Parekh et
al., EACL 2021) for every image and caption, scored by R@1/5/10. The numbers come from the ``eccv-caption``
package (extra ``eccv``): its ``Metrics`` class holds the annotations (shipped in the wheel, nothing is
downloaded) and defines the metrics; this module only turns our similarity matrix into the package's input, a
ranked list of ids per query, and names the results. The package returns fractions; we report them in %, like
every other metric here: ``eccv_{i2t,t2i}_{map_at_r,rprecision,r1}`` and ``cxc_{i2t,t2i}_r{1,5,10}``.

Rankings: each query's candidates by descending score, ties broken by the lower position in the split (a stable
sort), cut after the most positives any query has (at least 10, for R@10): the package never looks further.

Ids. The package keys everything by COCO ids: image ids (``cocoid``) and caption *annotation* ids (the ``id`` of
an entry in ``captions_val2014.json``). Rows are easy: the feature store keeps each image's dataset id, the COCO
id for every COCO import (SCAN precomp ``{split}_ids.txt``, BUTD ``image_id``, Karpathy ``cocoid``). Caption
annotation ids are not in Karpathy json (its ``sentid`` is a running number) nor in precomp folders, so they come
from, in this order:

1. ``coco_captions``: the COCO caption annotation file (``captions_val2014.json``, which holds all 5K test
   images). Each stored caption is matched to an annotation of *its own image* by text, compared case-folded and
   reduced to its words (so "A dog." matches "a dog"); two identical captions of one image take their ids in
   ascending order, which changes nothing since their scores are identical too.
2. the feature file's ``captions/ids``, when they are exactly the COCO annotation ids of the split's captions.

Never by position: nothing shows that a store's caption order is the package's. Whatever the source, the ids are
checked before any encoding: the split's image ids must be the package's 5,000 test images, its caption ids its
25,000 test captions, each caption belonging to its own row's image. Otherwise :class:`MaxMatchError` names the
input and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where it runs: the module loads without torch for the package's fast paths
    import torch

from maxmatch_cli.errors import MaxMatchError, first_few

ECCV_PROTOCOLS = ("eccv", "cxc")
"""Protocols computed by the eccv-caption package."""
ECCV_KEYS = tuple(f"eccv_{d}_{m}" for d in ("i2t", "t2i") for m in ("map_at_r", "rprecision", "r1"))
"""ECCV Caption metrics (%): mAP@R, R-Precision and Recall@1 per direction."""
CXC_KEYS = tuple(f"cxc_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
"""CxC metrics (%): Recall@1/5/10 per direction."""
INSTALL_HINT = "pip install 'maxmatch[eccv]' (or run make, which installs every extra)"
_COCO_HINT = ("pass --coco-captions captions_val2014.json (the COCO 2014 caption annotations, which hold the 5K "
              "test images) to match the captions to their annotation ids by image and text")
_BLOCK_ELEMENTS = 1 << 24  # scores per block when ranking: ~64 MB of float32


def require_package():
    """The ``eccv_caption`` module, or a :class:`MaxMatchError` saying how to install it."""
    try:
        with warnings.catch_warnings():  # "failed to import ujson / tqdm": the package falls back by itself
            warnings.simplefilter("ignore")
            import eccv_caption
    except ImportError:
        raise MaxMatchError("the ECCV Caption / CxC metrics need the eccv-caption package, which is not installed",
                            hint=INSTALL_HINT) from None
    return eccv_caption


@functools.lru_cache(maxsize=1)
def _reference():
    """The package's ``Metrics`` (reads its annotation files once per process)."""
    module = require_package()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.Metrics()


def package_image_ids() -> set[int]:
    """The 5,000 COCO image ids of the package's test split."""
    require_package()
    return set(_reference().coco_gts["i2t"])


def package_caption_images() -> dict[int, int]:
    """COCO caption annotation id -> COCO image id, for the package's 25,000 test captions."""
    require_package()
    return {caption: images[0] for caption, images in _reference().coco_gts["t2i"].items()}


@dataclass(frozen=True)
class CocoIds:
    """COCO ids of a similarity matrix's rows and columns, what ECCV Caption and CxC are keyed by."""

    image_ids: np.ndarray
    """(n_images,) int64 COCO image ids, in row order."""
    caption_ids: np.ndarray
    """(n_captions,) int64 COCO caption annotation ids, in column order."""
    source: str = ""
    """Where the caption ids come from (recorded in the evaluation file)."""


# ------------------------------------------------------------------------------------------- checking ids


def _as_int_ids(ids, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    if all(isinstance(x, str) and x.isdigit() for x in ids.tolist()):
        return ids.astype(np.int64)
    sample = ", ".join(repr(x) for x in ids[:3].tolist())
    raise MaxMatchError(f"{what} are not COCO ids (e.g. {sample})",
                        hint="ECCV Caption and CxC need a COCO feature file whose images keep their COCO ids "
                             "(SCAN precomp with testall_ids.txt, BUTD TSV, or Karpathy json with cocoid)")


def check_image_ids(image_ids, what: str = "the images") -> np.ndarray:
    """Refuse image ids that are not exactly the package's 5,000 COCO test image ids; return them as int64."""
    ids = _as_int_ids(image_ids, f"the image ids of {what}")
    expected = package_image_ids()
    fix = ("ECCV Caption and CxC annotate the Karpathy 5K COCO test split: evaluate --split testall (or test) of a "
           "COCO feature file that keeps COCO image ids")
    if len(set(ids.tolist())) != len(ids):
        raise MaxMatchError(f"{what} list an image id twice", hint=fix)
    unknown = sorted(set(ids.tolist()) - expected)
    if len(ids) != len(expected) or unknown:
        detail = f"{len(unknown):,} of them are not test images (e.g. {first_few([str(i) for i in unknown])})" \
            if unknown else "all of them are test images, but not all test images are there"
        raise MaxMatchError(f"{what} have {len(ids):,} images, not the {len(expected):,} COCO 5K test images of "
                            f"ECCV Caption / CxC: {detail}", hint=fix)
    return ids


def id_mismatches(image_ids: np.ndarray, caption_ids, captions_per_image: int) -> list[str]:
    """Why caption ids are not the COCO annotation ids of the captions of ``image_ids`` (empty: they are).

    Args:
        image_ids: (n_images,) COCO image ids, the package's test images.
        caption_ids: (n_images * captions_per_image,) candidate annotation ids; caption j belongs to image
            j // captions_per_image.
        captions_per_image: captions per image.
    """
    caption_ids = np.asarray(caption_ids)
    owners = package_caption_images()
    if len(caption_ids) != len(owners):
        return [f"{len(caption_ids):,} captions, where the test split has {len(owners):,}"]
    if caption_ids.dtype.kind not in "iu":
        return [f"ids of type {caption_ids.dtype}, not integers"]
    ids = caption_ids.astype(np.int64).tolist()
    if len(set(ids)) != len(ids):
        return ["an id appears twice"]
    problems = []
    for j, cid in enumerate(ids):
        own = int(image_ids[j // captions_per_image])
        if cid not in owners:
            problems.append(f"caption {j} (image {own}): {cid} is not a test caption id")
        elif owners[cid] != own:
            problems.append(f"caption {j} (image {own}): {cid} is a caption of image {owners[cid]}")
    return problems


# ------------------------------------------------------------------------------- caption ids from COCO json


def normalise_caption(text: str) -> str:
    """A caption's words, case-folded, single-spaced: what matching a caption to its annotation compares."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _load_annotations(path: Path) -> list[dict[str, Any]]:
    fix = "pass the COCO 2014 caption annotations (annotations/captions_val2014.json)"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MaxMatchError(f"COCO caption file {path} does not exist", hint=fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaxMatchError(f"{path} is not valid JSON ({exc})", hint=fix) from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and {"id", "image_id", "caption"} <= a.keys() for a in annotations):
        raise MaxMatchError(f"{path} is not a COCO caption file: it needs an 'annotations' list of "
                            "{'id', 'image_id', 'caption'} entries", hint=fix)
    return annotations


def caption_ids_from_annotations(path: str | os.PathLike, image_ids: np.ndarray, texts: list[str],
                                 captions_per_image: int) -> np.ndarray:
    """Annotation ids of a split's captions, found in a COCO caption file by (image id, normalised text).

    Args:
        path: ``captions_val2014.json`` (or any file of COCO caption annotations holding the images).
        image_ids: (n_images,) COCO image ids of the split.
        texts: the split's captions, caption j of image ``image_ids[j // captions_per_image]``.
        captions_per_image: captions per image.

    Returns:
        (n_captions,) int64 annotation ids.

    Raises:
        MaxMatchError: the file is missing or malformed, an image is not in it, or a caption is not among its
            image's annotations.
    """
    path = Path(path)
    wanted = {int(i) for i in image_ids}
    by_image: dict[int, dict[str, list[int]]] = {}
    for a in _load_annotations(path):
        if int(a["image_id"]) in wanted:
            by_image.setdefault(int(a["image_id"]), {}).setdefault(normalise_caption(str(a["caption"])),
                                                                   []).append(int(a["id"]))
    absent = [i for i in image_ids.tolist() if i not in by_image]
    if absent:
        raise MaxMatchError(f"{len(absent):,} of the split's {len(image_ids):,} images have no caption in {path} "
                            f"(e.g. {first_few([str(i) for i in absent])})",
                            hint="the 5K test images are COCO val2014 images: pass annotations/captions_val2014.json")
    for candidates in by_image.values():
        for ids in candidates.values():
            ids.sort()
    out = np.empty(len(texts), dtype=np.int64)
    unmatched = []
    for j, text in enumerate(texts):
        image = int(image_ids[j // captions_per_image])
        candidates = by_image[image].get(normalise_caption(text))
        if not candidates:
            unmatched.append(f"caption {j} of image {image}: {text!r}")
            continue
        out[j] = candidates.pop(0)
    if unmatched:
        raise MaxMatchError(f"{len(unmatched):,} captions of the split are not among their image's captions in "
                            f"{path}: {first_few(unmatched)}",
                            hint="pass the COCO caption file the split's captions come from (captions_val2014.json)")
    return out


def split_coco_ids(store, split: str, captions_per_image: int,
                   coco_captions: str | os.PathLike | None = None) -> CocoIds:
    """COCO image and caption annotation ids of a split, checked against the package's test split.

    Caption ids come from ``coco_captions`` when given, else from the feature file (module docstring).

    Raises:
        MaxMatchError: the package is missing; the split is not the COCO 5K test; no caption ids can be found or
            they are not those of the split's captions.
    """
    from maxmatch_cli.data.datasets import split_layout

    require_package()
    images, captions = split_layout(store, split, captions_per_image)
    where = f"split '{split}' of {store.path}"
    image_ids = check_image_ids(np.asarray(store.image_ids)[images], where)
    if coco_captions is not None:
        caption_ids = caption_ids_from_annotations(coco_captions, image_ids, store.captions_text(captions),
                                                   captions_per_image)
        source = str(coco_captions)
        problems = id_mismatches(image_ids, caption_ids, captions_per_image)
        if problems:
            raise MaxMatchError(f"the captions of {where}, matched in {coco_captions}, are not the ECCV Caption / "
                                f"CxC test captions: {first_few(problems)}",
                                hint="the split must keep the 5 captions per image that the Karpathy 5K test "
                                     "uses; re-import it from dataset_coco.json or the SCAN testall folder")
    elif store.caption_ids is None:
        raise MaxMatchError(f"{store.path} keeps no COCO caption annotation ids, which ECCV Caption and CxC are "
                            "keyed by", hint=_COCO_HINT)
    else:
        caption_ids = np.asarray(store.caption_ids)[captions]
        source = f"{store.path} captions/ids"
        problems = id_mismatches(image_ids, caption_ids, captions_per_image)
        if problems:
            raise MaxMatchError(f"the caption ids of {where} are not the COCO caption annotation ids of its "
                                f"captions: {first_few(problems)}", hint=_COCO_HINT)
    return CocoIds(image_ids, caption_ids.astype(np.int64), source)


# -------------------------------------------------------------------------------------------- rankings


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's ``k`` highest scores, best first; equal scores: the lower index first.

    Args:
        scores: (n, m) floating point, no NaN.
        k: 1 <= k <= m.

    Returns:
        (n, k) int64, the first k of a stable descending sort of each row.
    """
    import torch

    n, m = scores.shape
    out = torch.empty(n, k, dtype=torch.long)
    rows = max(1, _BLOCK_ELEMENTS // max(m, 1))
    for start in range(0, n, rows):
        block = scores[start: start + rows].float()
        values, idx = torch.topk(block, min(k + 1, m), dim=1)
        # topk orders ties arbitrarily: put its set in index order, then sort stably by score.
        idx = idx[:, :k].sort(dim=1).values
        order = torch.sort(block.gather(1, idx), dim=1, descending=True, stable=True).indices
        best = idx.gather(1, order)
        # A tie across the k-th place makes the set itself arbitrary: sort those rows in full.
        tied = values[:, k - 1] == values[:, k] if k < m else torch.zeros(len(block), dtype=torch.bool)
        if tied.any():
            best[tied] = torch.sort(block[tied], dim=1, descending=True, stable=True).indices[:, :k]
        out[start: start + block.shape[0]] = best
    return out


def ranked_lists(sims: torch.Tensor, ids: CocoIds, k_i2t: int,
                 k_t2i: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The package's input: image id -> its ``k_i2t`` best caption ids, caption id -> its ``k_t2i`` best image ids.

    Args:
        sims: (n_images, n_captions) similarities, rows and columns as in ``ids``.
        ids: COCO ids of the rows and columns.
        k_i2t, k_t2i: list lengths (cut to the number of candidates).
    """
    n_images, n_captions = sims.shape
    i2t = top_k(sims, min(k_i2t, n_captions)).numpy()
    t2i = top_k(sims.T, min(k_t2i, n_images)).numpy()
    image_ids, caption_ids = ids.image_ids.tolist(), np.asarray(ids.caption_ids)
    images = np.asarray(ids.image_ids)
    return ({image_ids[i]: caption_ids[row].tolist() for i, row in enumerate(i2t)},
            {int(c): images[row].tolist() for c, row in zip(caption_ids, t2i)})


def _list_lengths() -> tuple[int, int]:
    """How deep the package reads a ranking: R (the most positives of a query) for mAP@R, 10 for R@10."""
    ref = _reference()
    longest = {d: max(max(map(len, gts[d].values())) for gts in (ref.eccv_gts, ref.cxc_gts)) for d in ("i2t", "t2i")}
    return max(10, longest["i2t"]), max(10, longest["t2i"])


def coco_metrics(sims, ids: CocoIds, protocol: str, captions_per_image: int = 5) -> dict[str, float]:
    """ECCV Caption (``protocol="eccv"``) or CxC (``"cxc"``) metrics of a COCO 5K similarity matrix, in %.

    Args:
        sims: (5,000, 25,000) similarities, images as rows, captions as columns (caption j of image
            j // captions_per_image), torch tensor or numpy array.
        ids: COCO ids of the rows and columns (:func:`split_coco_ids`); checked against the package's test split.
        protocol: ``eccv`` or ``cxc``.
        captions_per_image: captions per image.

    Returns:
        :data:`ECCV_KEYS` or :data:`CXC_KEYS`, as the package computes them, times 100.

    Raises:
        MaxMatchError: the package is missing, an unknown protocol, or ids that do not fit the test split.
    """
    require_package()
    if protocol not in ECCV_PROTOCOLS:
        raise MaxMatchError(f"unknown protocol '{protocol}' for the eccv-caption metrics",
                            hint=f"use one of: {', '.join(ECCV_PROTOCOLS)}")
    from maxmatch_cli.evaluation.metrics import validate_sims

    sims = validate_sims(sims, captions_per_image)
    image_ids = check_image_ids(ids.image_ids, "the similarity matrix's rows")
    if len(image_ids) != sims.shape[0]:
        raise MaxMatchError(f"{len(image_ids):,} image ids for {sims.shape[0]:,} rows")
    problems = id_mismatches(image_ids, ids.caption_ids, captions_per_image)
    if problems:
        raise MaxMatchError(f"the caption ids are not the COCO annotation ids of the columns' captions: "
                            f"{first_few(problems)}", hint=_COCO_HINT)
    i2t, t2i = ranked_lists(sims.detach().cpu(), CocoIds(image_ids, np.asarray(ids.caption_ids, np.int64)),
                            *_list_lengths())
    ref = _reference()
    if protocol == "eccv":
        targets, ks, keys = ("eccv_r1", "eccv_map_at_r", "eccv_rprecision"), (1,), ECCV_KEYS
    else:
        targets, ks, keys = ("cxc_recalls",), (1, 5, 10), CXC_KEYS
    # compute_eccv_metrics draws a tqdm bar whatever `verbose` says: keep it off the terminal.
    with contextlib.redirect_stderr(io.StringIO()):
        raw = ref.compute_all_metrics(i2t, t2i, target_metrics=targets, Ks=ks, verbose=False)
    out = {}
    for name, by_direction in raw.items():
        dataset, metric = name.split("_", 1)
        for direction, value in by_direction.items():
            out[f"{dataset}_{direction}_{metric}"] = 100.0 * float(value)
    return {key: out[key] for key in keys}


def metrics_table(metrics: dict[str, float], protocol: str, label: str | None = None):
    """A rich table of the ECCV Caption or CxC metrics in ``metrics`` (one row per direction), its title naming
    ``label`` (e.g. an ensemble member) where given."""
    from rich.table import Table

    if protocol == "eccv":
        title, heads, names = "ECCV Caption (%)", ("mAP@R", "R-P", "R@1"), ("map_at_r", "rprecision", "r1")
    else:
        title, heads, names = "CxC (%)", ("R@1", "R@5", "R@10"), ("r1", "r5", "r10")
    table = Table(title=f"{title} · {label}" if label else title, title_justify="left")
    table.add_column("", style="bold")
    for head in heads:
        table.add_column(head, justify="right")
    for direction, label in (("i2t", "image → text"), ("t2i", "text → image")):
        table.add_row(label, *(f"{metrics[f'{protocol}_{direction}_{n}']:.2f}" for n in names))
    return table
