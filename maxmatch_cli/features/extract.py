"""One entry point for ``maxmatch extract-features``: pick the source, check the options, run the importer."""

from __future__ import annotations

import os
from pathlib import Path

from maxmatch_cli.errors import MaxMatchError


def extract_features(
    out: str | os.PathLike,
    *,
    synthetic: str | None = None,
    seed: int = 0,
    from_precomp: str | os.PathLike | None = None,
    dataset: str = "coco",
    splits: list[str] | None = None,
    from_butd_tsv: list[str | os.PathLike] | None = None,
    images: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    kind: str = "grid",
    backbone: str | None = None,
    image_size: int | None = None,
    num_boxes: int = 36,
    min_boxes: int = 10,
    max_boxes: int = 100,
    score_threshold: float = 0.2,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    num_workers: int | None = None,
    skip_unreadable: bool = False,
    allow_missing: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build a feature store from exactly one source; see each importer for the details.

    Sources: ``synthetic`` (demo data), ``from_precomp`` (SCAN folder, with ``dataset``), ``from_butd_tsv``
    (TSV files, with ``captions``), ``images`` (an image folder, with ``captions``, ``kind`` grid or region;
    ``kind`` pixels indexes the image files for end-to-end CNN training instead of extracting features).
    With ``images``, ``captions`` may be a Karpathy json, a plain captions file (txt/csv/json list, all images
    in split ``splits[0]``, default ``train``) or ``None``: a gallery of every image file under the folder
    (split ``splits[0]``, default ``gallery``), without captions; see :mod:`maxmatch_cli.features.captions_file`.

    Returns:
        The output path (already complete when an identical earlier run finished: nothing is redone).
    """
    _check_one_source(synthetic=synthetic, from_precomp=from_precomp, from_butd_tsv=from_butd_tsv, images=images,
                      captions=captions)
    image_split = _one_image_split(splits) if images and splits else None
    if synthetic:
        from maxmatch_cli.features.synthetic import generate_synthetic

        return generate_synthetic(out, preset=synthetic, seed=seed, overwrite=overwrite, progress=progress or None)
    if from_precomp:
        from maxmatch_cli.features.precomp import import_precomp

        return import_precomp(from_precomp, out, dataset=dataset, splits=splits, overwrite=overwrite,
                              progress=progress)
    if from_butd_tsv:
        from maxmatch_cli.features.butd_tsv import import_butd_tsv

        return import_butd_tsv(list(from_butd_tsv), out, captions=captions, allow_missing=allow_missing,
                               overwrite=overwrite, progress=progress)
    if kind not in ("grid", "region", "pixels"):
        raise MaxMatchError(f"unknown --kind '{kind}'.", hint="use --kind grid, region or pixels")
    if kind == "pixels":
        return _index_pixels(images, captions, out, backbone=backbone, weights=weights,  # type: ignore[arg-type]
                             image_size=image_size, skip_unreadable=skip_unreadable, overwrite=overwrite,
                             progress=progress, split=image_split)
    from maxmatch_cli.features.images import ExtractConfig, extract_from_images

    config = ExtractConfig(
        kind=kind,
        backbone=backbone or ("resnet152" if kind == "grid" else "fasterrcnn_resnet50_fpn"),
        image_size=image_size or (224 if kind == "grid" else 600),
        num_boxes=num_boxes, min_boxes=min_boxes, max_boxes=max_boxes, score_threshold=score_threshold,
        skip_unreadable=skip_unreadable,
    )
    return extract_from_images(images, captions, out, config=config, weights=weights, device=device,  # type: ignore[arg-type]
                               split=image_split, batch_size=batch_size, num_workers=num_workers, overwrite=overwrite,
                               progress=progress)


def _check_one_source(*, synthetic, from_precomp, from_butd_tsv, images, captions) -> None:
    """Exactly one source must be given; BUTD TSV files need a caption file."""
    sources = {"--synthetic": synthetic, "--from-precomp": from_precomp, "--from-butd-tsv": from_butd_tsv,
               "--images": images}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise MaxMatchError(
            "give exactly one source" + (f" (got {', '.join(given)})" if given else "") + ".",
            hint="maxmatch extract-features synthetic demo | precomp DIR --dataset coco|f30k | tsv FILE... "
                 "--captions JSON | images DIR [--captions FILE] [--kind grid|region|pixels], each with --out FILE",
        )
    if from_butd_tsv and not captions:
        raise MaxMatchError(f"{given[0]} needs --captions (a Karpathy split json: dataset_coco.json or "
                            "dataset_flickr30k.json).", hint="pass --captions PATH")


def _one_image_split(splits: list[str]) -> str:
    """The split an image folder is stored as: ``--images`` takes one ``--split``."""
    if len(splits) > 1:
        raise MaxMatchError(f"--images stores one split, but --split was given {len(splits)} times.",
                            hint="pass --split NAME once (default: gallery without --captions, train with a "
                                 "plain captions file)")
    return splits[0]


def _index_pixels(images: str | os.PathLike, captions, out, *, backbone: str | None, weights: str | None,
                  image_size: int | None, skip_unreadable: bool, overwrite: bool, progress: bool,
                  split: str | None) -> Path:
    """``--kind pixels``: index the image files for end-to-end training; extractor options do not apply."""
    from maxmatch_cli.features.pixels import index_images

    unused = [flag for flag, value in (("--backbone", backbone), ("--weights", weights),
                                       ("--image-size", image_size)) if value]
    if unused:
        raise MaxMatchError(f"--kind pixels extracts no features, so {', '.join(unused)} does not apply.",
                            hint="the CNN, its weights and the input size come from the training recipe "
                                 "(model.cnn_backbone, model.cnn_weights, data.image_size)")
    return index_images(images, captions, out, skip_unreadable=skip_unreadable, overwrite=overwrite,
                        progress=progress, split=split)
