"""Import bottom-up-attention TSV files (``generate_tsv.py`` output) into a feature store.

Each line holds ``image_id, image_w, image_h, num_boxes, boxes, features`` separated by tabs, the last two
base64-encoded float32 arrays of shape (num_boxes, 4) and (num_boxes, 2048). Releases come with a fixed 36
boxes per image (``trainval_36``) or an adaptive 10-100 (``trainval``), often split into several files (one per
GPU) in no particular order. Extra trailing columns (some forks add class scores) are ignored.

Captions and splits come from a Karpathy-split json (:mod:`maxmatch_cli.features.karpathy`); a TSV row belongs
to the Karpathy image whose key (COCO id, or Flickr30K file number) equals its ``image_id``. Rows of images
that the json does not list are skipped, as are repeated rows of an image already stored.

Regions are stored in the flat layout (rows of all images plus offsets), so adaptive counts cost no padding;
with a chunk of 36 rows, fixed-36 files still read one chunk per image. Boxes and image sizes are kept.

Resuming: images are written in the order the rows come; a re-run with the same arguments skips the rows whose
images are already in the partial file. A corrupt row stops the import with the file and line number (the
partial file stays, resumable once the file is fixed). Images of the json that no TSV row provides stop the
import at the end, unless ``allow_missing`` leaves them (and their captions) out, recorded in the metadata.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.karpathy import captions_and_splits, load_karpathy
from maxmatch_cli.features.store import StoreWriter, args_fingerprint, store_state

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


class TsvRow:
    """One decoded TSV row."""

    __slots__ = ("image_id", "width", "height", "boxes", "features")

    def __init__(self, image_id: int | str, width: int, height: int, boxes: np.ndarray, features: np.ndarray):
        self.image_id = image_id
        self.width = width
        self.height = height
        self.boxes = boxes
        self.features = features


def _key(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def scan_tsv(path: Path) -> Iterator[tuple[int, int | str, bytes]]:
    """Yield ``(line number, image id, raw line)`` without decoding the arrays (cheap)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            head = line.split(b"\t", 1)[0]
            try:
                yield number, _key(head.decode("utf-8")), line
            except UnicodeDecodeError:
                raise MaxMatchError(f"{path}, line {number}: the image id is not text; this is not a BUTD TSV file.",
                                    hint=f"expected tab-separated columns {', '.join(TSV_FIELDS)}") from None


def decode_row(path: Path, number: int, line: bytes, feature_dim: int | None = None) -> TsvRow:
    """Decode one raw TSV line, with errors that name the file and the line."""
    where = f"{path}, line {number}"
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) < len(TSV_FIELDS):
        raise MaxMatchError(
            f"{where} has {len(fields)} columns; a bottom-up-attention row has {len(TSV_FIELDS)} "
            f"({', '.join(TSV_FIELDS)}). The file may be truncated.",
            hint="re-extract or re-download this TSV file, then re-run to resume",
        )
    try:
        image_id = _key(fields[0].decode())
        width, height, n = int(fields[1]), int(fields[2]), int(fields[3])
    except ValueError:
        raise MaxMatchError(f"{where}: image_w, image_h or num_boxes is not an integer.",
                            hint="the row is corrupt; re-extract this file") from None
    try:
        boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), dtype=np.float32)
        feats = np.frombuffer(base64.b64decode(fields[5], validate=True), dtype=np.float32)
    except (binascii.Error, ValueError) as exc:
        raise MaxMatchError(f"{where} (image {image_id}): boxes or features are not valid base64 float32 ({exc}).",
                            hint="the row is corrupt or cut short; re-extract this file, then re-run to resume") from None
    if n <= 0 or boxes.size != 4 * n or feats.size % n or (feature_dim and feats.size != n * feature_dim):
        expected = f"{n} x {feature_dim}" if feature_dim else f"{n} x D"
        raise MaxMatchError(
            f"{where} (image {image_id}): num_boxes={n} but {boxes.size // 4 if boxes.size % 4 == 0 else boxes.size / 4} "
            f"boxes and {feats.size} feature values (expected {expected}).",
            hint="the row is corrupt or cut short; re-extract this file",
        )
    return TsvRow(image_id, width, height, boxes.reshape(n, 4), feats.reshape(n, -1))


def import_butd_tsv(
    tsv_files: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    captions: str | os.PathLike,
    captions_per_image: int = 5,
    allow_missing: bool = False,
    overwrite: bool = False,
    batch_images: int = 64,
    progress: bool = True,
) -> Path:
    """Convert bottom-up-attention TSV files plus a Karpathy json into a feature store.

    Args:
        tsv_files: the TSV files (any order, e.g. one per GPU shard).
        out: output ``.h5`` path.
        captions: Karpathy split json (``dataset_coco.json`` / ``dataset_flickr30k.json``).
        captions_per_image: captions kept per image (the first ones).
        allow_missing: leave out json images that no TSV row provides (recorded in the metadata) instead of
            stopping.
        overwrite: replace an existing output file.
        batch_images: images decoded and written at a time.
        progress: show a progress bar.

    Returns:
        The output path.
    """
    files = [Path(p) for p in tsv_files]
    if not files:
        raise MaxMatchError("no TSV file given.",
                            hint="pass one or more: maxmatch extract-features tsv FILE... --captions JSON")
    for p in files:
        if not p.is_file():
            raise MaxMatchError(f"TSV file {p} does not exist.", hint="check the path (shell globs: quote nothing)")
    images = load_karpathy(captions, captions_per_image)
    wanted = {im.key: im for im in images}
    fp = args_fingerprint(
        kind="butd-tsv",
        files=[[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in files],
        captions=str(Path(captions).resolve()), captions_size=Path(captions).stat().st_size,
        captions_per_image=captions_per_image, allow_missing=allow_missing,
    )
    out = Path(out)
    if not overwrite and store_state(out, fp) == "complete":
        return out

    first = _first_row(files, wanted)
    chunk_rows = int(np.clip(len(first.features), 8, 128))
    id_kind = "int" if all(isinstance(k, int) for k in wanted) else "str"
    with StoreWriter(
        out, feature_kind="region", source="butd-tsv", feature_dim=first.features.shape[1], regions_per_image=None,
        id_kind=id_kind, with_boxes=True, with_sizes=True, args_fingerprint=fp, resume=True, overwrite=overwrite,
        chunk_rows=chunk_rows, flush_every=max(256, 4 * batch_images),
        metadata={"importer": "butd-tsv", "files": [p.name for p in files], "captions": str(captions)},
    ) as writer:
        stored = _copy_rows(writer, files, wanted, batch_images, progress)
        missing = [k for k in wanted if k not in stored]
        if missing and not allow_missing:
            raise MaxMatchError(
                f"{len(missing)} of the {len(wanted)} images in {captions} have no row in the TSV files "
                f"(e.g. {', '.join(map(str, missing[:5]))}).",
                hint="add the TSV files that hold them and re-run (what is written is kept), or pass "
                "--allow-missing to leave these images out",
            )
        texts, owners, splits = captions_and_splits(images, stored)
        writer.set_captions(texts, owners)
        for name, idx in splits.items():
            writer.add_split(name, idx)
        writer.set_metadata(missing_images=[str(k) for k in missing[:1000]], n_missing_images=len(missing))
    return out


def _first_row(files: list[Path], wanted: dict) -> TsvRow:
    for path in files:
        for number, key, line in scan_tsv(path):
            if key in wanted:
                return decode_row(path, number, line)
    raise MaxMatchError(
        f"none of the TSV rows in {', '.join(p.name for p in files)} belongs to an image of the caption file.",
        hint="the image_id column must hold the COCO id (or the Flickr30K file number) of the json's images",
    )


def _copy_rows(writer: StoreWriter, files: list[Path], wanted: dict, batch_images: int,
               progress: bool) -> dict[int | str, int]:
    """Write every wanted image once; returns store index by image key."""
    from maxmatch_cli.progress import make_progress

    stored: dict[int | str, int] = {k: i for i, k in enumerate(writer.written_ids())}
    dim = writer.feature_dim
    pending: list[TsvRow] = []

    def flush_pending() -> None:
        if pending:
            writer.write_images(
                [r.features for r in pending], ids=[r.image_id for r in pending],
                boxes=[r.boxes for r in pending], sizes=[(r.width, r.height) for r in pending],
            )
            pending.clear()

    with make_progress(transient=True) as bar:
        task = bar.add_task("BUTD TSV import", total=len(wanted), completed=len(stored), unit="images",
                            status="resumed" if stored else "", visible=progress)
        for path in files:
            bar.update(task, status=path.name)
            for number, key, line in scan_tsv(path):
                if key not in wanted or key in stored:
                    continue
                row = decode_row(path, number, line, dim)
                stored[key] = len(stored)
                pending.append(row)
                if len(pending) >= batch_images:
                    flush_pending()
                    bar.update(task, completed=len(stored))
        flush_pending()
        bar.update(task, completed=len(stored))
    return stored
