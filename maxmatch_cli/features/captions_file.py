"""What ``extract-features images DIR`` encodes: a Karpathy json, a plain captions file, or no captions at all.

* **No captions file** (a gallery): every image file under ``DIR`` (recursively, sorted, extensions in
  :data:`IMAGE_EXTENSIONS`) becomes an image of one split (``--split``, default ``gallery``) with no captions.
  Image ids are the paths relative to ``DIR`` (``a/b.jpg``).
* **Plain captions file**, one split (``--split``, default ``train``), image ids = paths relative to ``DIR``:

  - ``.txt`` / ``.tsv``: one ``image<TAB>caption`` per line (blank lines are skipped);
  - ``.csv``: a header with the columns ``image`` and ``caption`` (others are ignored);
  - ``.json``: a list of ``{"image": ..., "caption": ...}`` objects.

  Captions are grouped per image in file order, images keep the order of their first caption. Images may
  have different numbers of captions: that is stored as is (``features info`` shows captions_per_image 0 for
  the split and the metadata gives the range), but training and evaluation need the same count per image.
* **Karpathy json** (``{"images": [...]}``): see :mod:`maxmatch_cli.features.karpathy`; its own splits are used.

The format is told by the extension and, for other extensions, by the content (``{``/``[`` json, a tab on the
first line, or an ``image,caption`` header). A malformed file stops with one message naming the file and line.
An image named in a plain captions file but missing under ``DIR`` stops with its name, unless missing images
are to be skipped (``--skip-unreadable``): then the extractor leaves it out like any unreadable image.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from maxmatch_cli.errors import MaxMatchError, first_few
from maxmatch_cli.features.karpathy import KarpathyImage, load_karpathy
from maxmatch_cli.fileio import escapes_folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GALLERY_SPLIT = "gallery"
PLAIN_SPLIT = "train"
FORMAT_HINT = ("one 'image<TAB>caption' a line (.txt/.tsv), a .csv with columns image,caption, a .json list of "
               '{"image": ..., "caption": ...}, or a Karpathy split json')


@dataclass
class Entries:
    """The images to encode, in order, with what the store's metadata should say about where they came from."""

    images: list[KarpathyImage]
    format: str  # karpathy | gallery | tsv | csv | json
    metadata: dict = field(default_factory=dict)


def list_gallery(images_dir: str | os.PathLike, split: str = GALLERY_SPLIT) -> list[KarpathyImage]:
    """Every image file under ``images_dir`` (recursive, sorted by relative path), without captions."""
    root = Path(images_dir)
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not rels:
        raise MaxMatchError(f"no image files under {root}.",
                            hint=f"image files end in {', '.join(IMAGE_EXTENSIONS)}")
    outside = [rel for rel in rels if escapes_folder(rel)]  # legal names such as 'a\\..\\b.jpg' read as paths
    if outside:
        raise MaxMatchError(f"{len(outside)} image file name(s) under {root} read as paths that leave the folder "
                            f"(a '..' part, also written with backslashes): {first_few([repr(r) for r in outside])}.",
                            hint="rename these files (or move them out of the folder) and run the command again")
    return [KarpathyImage(rel, rel, split, ()) for rel in rels]


def detect_format(path: Path) -> str:
    """``json`` (Karpathy or plain list), ``tsv`` or ``csv``: by extension, else by the first characters."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".txt", ".tsv"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096)
    stripped = head.lstrip("\ufeff \t\r\n")
    first_line = stripped.split("\n", 1)[0]
    if stripped[:1] in ("{", "["):
        return "json"
    if "\t" in first_line:
        return "tsv"
    if [c.strip().lower() for c in first_line.split(",")][:2] == ["image", "caption"] or (
            "image" in first_line.lower() and "," in first_line):
        return "csv"
    raise MaxMatchError(f"cannot tell the format of caption file {path}.", hint=f"pass {FORMAT_HINT}")


def _relpath(image: str, root: Path, where: str) -> str:
    image = image.strip()
    if not image:
        raise MaxMatchError(f"{where}: the image name is empty.", hint=f"expected {FORMAT_HINT}")
    p = Path(image)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            raise MaxMatchError(f"{where}: image {image} is not under the image folder {root}.",
                                hint="name images by their path relative to the image folder") from None
    rel = PurePosixPath(p.as_posix())
    if escapes_folder(str(rel)):
        raise MaxMatchError(f"{where}: image {image} points outside the image folder.",
                            hint="name images by their path relative to the image folder")
    return str(rel)


def _read_rows(path: Path, fmt: str) -> list[tuple[str, str, str]]:
    """``(image, caption, where)`` rows of a plain captions file; ``where`` is ``FILE:LINE`` (or item)."""
    rows: list[tuple[str, str, str]] = []
    try:
        if fmt == "tsv":
            with open(path, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    if "\t" not in line:
                        raise MaxMatchError(f"{path}:{n}: expected 'image<TAB>caption', got {line[:80]!r}.",
                                            hint="one image path, a tab and the caption per line")
                    image, caption = line.split("\t", 1)
                    rows.append((image, caption, f"{path}:{n}"))
        elif fmt == "csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                names = [h.strip().lower() for h in header or []]
                if "image" not in names or "caption" not in names:
                    raise MaxMatchError(f"{path}:1: the header {header!r} lacks the columns image and caption.",
                                        hint="the first line must name the columns, e.g. image,caption")
                ci, cc = names.index("image"), names.index("caption")
                for row in reader:
                    n = reader.line_num
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) <= max(ci, cc):
                        raise MaxMatchError(f"{path}:{n}: {len(row)} column(s), the header has {len(names)}.",
                                            hint="quote captions that contain commas")
                    rows.append((row[ci], row[cc], f"{path}:{n}"))
        else:
            raise AssertionError(fmt)
    except UnicodeDecodeError as exc:
        raise MaxMatchError(f"{path} is not UTF-8 text ({exc}).", hint="save the caption file as UTF-8") from None
    except csv.Error as exc:
        raise MaxMatchError(f"{path}:{reader.line_num}: {exc}.", hint="check the CSV quoting") from None
    return rows


def _json_rows(path: Path, data: list) -> list[tuple[str, str, str]]:
    rows = []
    for k, item in enumerate(data):
        where = f"{path}, item {k}"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) \
                or not isinstance(item.get("caption"), str):
            raise MaxMatchError(f"{where}: expected {{\"image\": str, \"caption\": str}}, got {str(item)[:80]}.",
                                hint=f"expected {FORMAT_HINT}")
        rows.append((item["image"], item["caption"], where))
    return rows


def load_plain_captions(path: str | os.PathLike, images_dir: str | os.PathLike, split: str = PLAIN_SPLIT, *,
                        fmt: str | None = None, data: list | None = None,
                        skip_missing: bool = False) -> list[KarpathyImage]:
    """Images and their captions from a plain captions file (see the module docstring), all in ``split``.

    Raises:
        MaxMatchError: a malformed line (named ``FILE:LINE``), an empty caption, no rows, or (without
            ``skip_missing``) images that are not under ``images_dir``.
    """
    path, root = Path(path), Path(images_dir)
    fmt = fmt or detect_format(path)
    rows = _json_rows(path, data) if fmt == "json" else _read_rows(path, fmt)
    grouped: dict[str, list[str]] = {}
    first_seen: dict[str, str] = {}
    for image, caption, where in rows:
        rel = _relpath(image, root, where)
        caption = caption.strip()
        if not caption:
            raise MaxMatchError(f"{where}: the caption of {rel} is empty.", hint="remove the line or fill it in")
        grouped.setdefault(rel, []).append(caption)
        first_seen.setdefault(rel, where)
    if not grouped:
        raise MaxMatchError(f"{path} holds no captions.", hint=f"expected {FORMAT_HINT}")
    missing = [rel for rel in grouped if not (root / rel).is_file()]
    if missing and not skip_missing:
        listed = first_few([f"{rel} ({first_seen[rel]})" for rel in missing])
        raise MaxMatchError(f"{len(missing)} image(s) named in {path} are not in {root}: {listed}.",
                            hint="image names are paths relative to the image folder; pass --skip-unreadable to "
                                 "leave missing images out")
    return [KarpathyImage(rel, rel, split, tuple(caps)) for rel, caps in grouped.items()]


def load_entries(images_dir: str | os.PathLike, captions: str | os.PathLike | None, *,
                 captions_per_image: int = 5, split: str | None = None, skip_missing: bool = False) -> Entries:
    """The images for ``--images DIR``: from a Karpathy json, a plain captions file, or the folder alone."""
    if captions is None:
        name = split or GALLERY_SPLIT
        return Entries(list_gallery(images_dir, name), "gallery", {"captions_format": "none (gallery)",
                                                                   "split": name})
    path = Path(captions)
    if not path.is_file():
        raise MaxMatchError(f"caption file {path} does not exist.", hint=f"pass {FORMAT_HINT}")
    fmt = detect_format(path)
    data = None
    if fmt == "json":
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise MaxMatchError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).",
                                hint=f"expected {FORMAT_HINT}") from None
        except UnicodeDecodeError as exc:
            raise MaxMatchError(f"{path} is not UTF-8 text ({exc}).", hint="save the file as UTF-8") from None
        if isinstance(data, dict):
            if split:
                raise MaxMatchError(f"{path} is a Karpathy json, which names each image's split: --split does "
                                    "not apply.", hint="leave --split out")
            return Entries(load_karpathy(path, captions_per_image), "karpathy")
        if not isinstance(data, list):
            raise MaxMatchError(f"{path} holds a JSON {type(data).__name__}, not a list or a Karpathy object.",
                                hint=f"expected {FORMAT_HINT}")
    name = split or PLAIN_SPLIT
    images = load_plain_captions(path, images_dir, name, fmt=fmt, data=data, skip_missing=skip_missing)
    counts = [len(im.captions) for im in images]
    meta: dict = {"captions_format": fmt, "split": name, "captions_per_image": min(counts)
                  if min(counts) == max(counts) else f"varies ({min(counts)}..{max(counts)})"}
    if min(counts) != max(counts):
        meta["captions_note"] = ("images have different numbers of captions: stored as is, but training and "
                                 "evaluation need the same count per image")
    return Entries(images, fmt, meta)
