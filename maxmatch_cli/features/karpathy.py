"""Karpathy-split caption files (``dataset_coco.json``, ``dataset_flickr30k.json``): captions and splits.

Format: ``{"images": [{"filename", "filepath" (COCO only), "imgid", "split", "sentences": [{"raw", "tokens"}],
"cocoid" (COCO only)}]}`` with split in train / restval / val / test. Store split names follow SCAN: ``train``
(train + restval: 113,287 COCO images), ``dev`` (val) and ``test``; a 5,000-image COCO test is also listed as
``testall``, the name SCAN's precomp folders use for the 5K test.

An image is matched to features by its *key*: the COCO id when present (what bottom-up-attention TSV files
call ``image_id``), else the file name's stem as an integer when it is one (Flickr30K ``1000092795.jpg``), else
the stem as a string.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.fileio import escapes_folder

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy file."""

    key: int | str
    relpath: str  # filepath/filename, relative to the image root
    split: str  # store split name: train / dev / test
    captions: tuple[str, ...]


def image_key(entry: dict) -> int | str:
    """The id that links a Karpathy entry to feature rows: COCO id, else the numeric file stem, else the stem."""
    if "cocoid" in entry:
        return int(entry["cocoid"])
    stem = Path(str(entry.get("filename", ""))).stem
    return int(stem) if stem.isdigit() else stem


def _relpath(entry: dict, where: str) -> str:
    """``filepath/filename`` of an entry, refused unless it is a path inside the image folder."""
    filepath, filename = entry.get("filepath", ""), entry["filename"]
    if not isinstance(filepath, str) or not isinstance(filename, str):
        raise MaxMatchError(f"{where}: 'filepath' and 'filename' must be strings, got {filepath!r} and {filename!r}.",
                            hint="the file does not follow the Karpathy format")
    relpath = str(PurePosixPath(filepath) / filename) if filepath else filename
    if escapes_folder(relpath) or escapes_folder(filename):
        raise MaxMatchError(f"{where}: image {relpath!r} points outside the image folder (an absolute path or a "
                            "'..' part).", hint="'filepath' and 'filename' name images relative to the image folder")
    return relpath


def load_karpathy(path: str | os.PathLike, captions_per_image: int = 5) -> list[KarpathyImage]:
    """Read a Karpathy-split json, keeping the first ``captions_per_image`` captions of every image.

    Raises:
        MaxMatchError: unreadable json, missing fields, unknown split, an image with too few captions, or a
            key used twice.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MaxMatchError(f"caption file {path} does not exist.",
                            hint="pass dataset_coco.json or dataset_flickr30k.json (Karpathy splits)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaxMatchError(f"{path} is not valid JSON ({exc}).", hint="re-download the Karpathy split file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise MaxMatchError(f"{path} has no 'images' list: not a Karpathy split file.",
                            hint='expected {"images": [{"filename", "split", "sentences": [...]}, ...]}')
    images: list[KarpathyImage] = []
    seen: dict[int | str, int] = {}
    for n, entry in enumerate(data["images"]):
        name = entry.get("filename", "?") if isinstance(entry, dict) else repr(entry)
        where = f"{path}, image {n} ({name})"
        if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry or "split" not in entry:
            raise MaxMatchError(f"{where} lacks 'filename', 'split' or 'sentences'.",
                                hint="the file does not follow the Karpathy format")
        if entry["split"] not in SPLIT_NAMES:
            raise MaxMatchError(f"{where} has split {entry['split']!r}.",
                                hint=f"Karpathy splits are {', '.join(SPLIT_NAMES)}")
        sentences = [str(s.get("raw", " ".join(s.get("tokens", [])))).strip() for s in entry["sentences"]]
        sentences = [s for s in sentences if s]
        if len(sentences) < captions_per_image:
            raise MaxMatchError(f"{where} has {len(sentences)} captions; {captions_per_image} are needed.",
                                hint="every image needs at least captions_per_image captions")
        key = image_key(entry)
        if key in seen:
            raise MaxMatchError(f"{where} has the same id {key!r} as image {seen[key]}.",
                                hint="image ids (cocoid / file names) must be unique")
        seen[key] = n
        relpath = _relpath(entry, where)
        images.append(KarpathyImage(key, relpath, SPLIT_NAMES[entry["split"]], tuple(sentences[:captions_per_image])))
    if not images:
        raise MaxMatchError(f"{path} lists no images.", hint="pass a non-empty Karpathy split file")
    return images


def captions_and_splits(
    images: list[KarpathyImage], index_of_key: dict[int | str, int], coco_testall: bool = True
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Captions (grouped by image) and split image lists for the images that were stored.

    Args:
        images: the Karpathy images, in file order (which becomes each split's order).
        index_of_key: store index of every stored image key; images not in it are left out.
        coco_testall: also list a 5,000-image test split as ``testall``.

    Returns:
        ``(texts, owners, splits)`` where ``owners[j]`` is the store index of caption j's image and
        ``splits[name]`` the store indices of that split's images.
    """
    texts: list[str] = []
    owners: list[int] = []
    splits: dict[str, list[int]] = {}
    for im in images:
        index = index_of_key.get(im.key)
        if index is None:
            continue
        splits.setdefault(im.split, []).append(index)
        texts.extend(im.captions)
        owners.extend([index] * len(im.captions))
    out = {name: np.asarray(idx, dtype=np.int64) for name, idx in splits.items()}
    if coco_testall and len(out.get("test", ())) == 5000:
        out["testall"] = out["test"]
    return texts, np.asarray(owners, dtype=np.int64), out
