"""``maxmatch extract-features synthetic|precomp|tsv|images`` and ``maxmatch features info|merge``.

Each source of ``extract-features`` is a subcommand with only its own options. The spelling of earlier versions
(``maxmatch extract-features --synthetic demo --out F.h5``, ``--from-precomp``, ``--from-butd-tsv``,
``--images``) still works: the group's hidden options take it and make the same library call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from maxmatch_cli.cli.options import DeviceOption, command_group, console, guarded, line, wrote
from maxmatch_cli.errors import MaxMatchError

PANEL = "Feature caches"

app = command_group()
extract_app = command_group(no_args_is_help=True)
features_app = command_group(help="Inspect feature caches.", no_args_is_help=True)
app.add_typer(extract_app, name="extract-features", rich_help_panel=PANEL)
app.add_typer(features_app, name="features", rich_help_panel=PANEL)

OutOption = Annotated[Path, typer.Option("--out", help="HDF5 feature cache to write.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]


def _extract(out: Path, overwrite: bool, **source) -> None:
    """Run :func:`~maxmatch_cli.features.extract.extract_features` and describe what it wrote (or found done)."""
    from maxmatch_cli.features.extract import extract_features
    from maxmatch_cli.features.store import describe_store, store_state

    before = store_state(out) if out.exists() and not overwrite else "missing"
    path = extract_features(out, overwrite=overwrite, **source)
    if before == "complete":
        line(f"{path} is already complete (same arguments): nothing to do.")
    if path.exists():  # on torchrun ranks other than 0 only a shard was written
        _print_store_info(describe_store(path))
        if before != "complete":
            wrote(path)


# ------------------------------------------------------------------------------------------ extract-features


def _hidden(*names: str):
    return typer.Option(*names, hidden=True)


@extract_app.callback(invoke_without_command=True)
@guarded
def extract_features_cmd(
    ctx: typer.Context,
    # The spelling of earlier versions, one option per source; hidden, and used only without a subcommand.
    out: Annotated[Optional[Path], _hidden("--out")] = None,
    synthetic: Annotated[Optional[str], _hidden("--synthetic")] = None,
    seed: Annotated[int, _hidden("--seed")] = 0,
    from_precomp: Annotated[Optional[Path], _hidden("--from-precomp")] = None,
    dataset: Annotated[str, _hidden("--dataset")] = "coco",
    split: Annotated[Optional[list[str]], _hidden("--split")] = None,
    from_butd_tsv: Annotated[Optional[list[Path]], _hidden("--from-butd-tsv")] = None,
    images: Annotated[Optional[Path], _hidden("--images")] = None,
    captions: Annotated[Optional[Path], _hidden("--captions")] = None,
    kind: Annotated[str, _hidden("--kind")] = "grid",
    backbone: Annotated[Optional[str], _hidden("--backbone")] = None,
    image_size: Annotated[Optional[int], _hidden("--image-size")] = None,
    num_boxes: Annotated[int, _hidden("--num-boxes")] = 36,
    min_boxes: Annotated[int, _hidden("--min-boxes")] = 10,
    max_boxes: Annotated[int, _hidden("--max-boxes")] = 100,
    score_threshold: Annotated[float, _hidden("--score-threshold")] = 0.2,
    weights: Annotated[Optional[str], _hidden("--weights")] = None,
    device: Annotated[str, _hidden("--device")] = "auto",
    batch_size: Annotated[int, _hidden("--batch-size")] = 16,
    num_workers: Annotated[Optional[int], _hidden("--num-workers")] = None,
    skip_unreadable: Annotated[bool, _hidden("--skip-unreadable")] = False,
    allow_missing: Annotated[bool, _hidden("--allow-missing")] = False,
    overwrite: Annotated[bool, _hidden("--overwrite")] = False,
) -> None:
    """Build a feature cache (HDF5 schema v1) that `train` and `evaluate` read.

    One subcommand per source: synthetic (the built-in data), precomp (a SCAN folder), tsv (bottom-up-attention
    files) or images (an image folder). Re-running an interrupted extraction with the same arguments resumes it;
    re-running a finished one does nothing. `maxmatch extract-features SOURCE --help` lists the options of a
    source.

    Examples:
      [bold]maxmatch extract-features synthetic demo --out demo/features.h5[/]
      [bold]maxmatch extract-features precomp data/coco_precomp --dataset coco \\
          --out coco.h5[/]
      [bold]maxmatch extract-features tsv trainval_36/*.tsv \\
          --captions dataset_coco.json --out coco_butd.h5[/]
      [bold]maxmatch extract-features images coco/images \\
          --captions dataset_coco.json --kind grid --out coco_grid.h5[/]
    """
    source = ctx.invoked_subcommand
    if source is not None:
        # (by the enum's name: typer bundles its own click, whose ParameterSource is not click's)
        given = [p.opts[0] for p in ctx.command.params if ctx.get_parameter_source(p.name).name == "COMMANDLINE"]
        if given:
            raise MaxMatchError(f"{', '.join(given)} before '{source}': give a source's options after its name",
                                hint=f"maxmatch extract-features {source} ... {given[0]} ...")
        return
    if out is None:
        raise MaxMatchError("Missing option '--out'.",
                            hint="maxmatch extract-features synthetic demo --out demo/features.h5 (sources: "
                                 "synthetic, precomp, tsv, images; see maxmatch extract-features --help)")
    _extract(out, overwrite, synthetic=synthetic, seed=seed, from_precomp=from_precomp, dataset=dataset,
             splits=split, from_butd_tsv=from_butd_tsv, images=images, captions=captions, kind=kind,
             backbone=backbone, image_size=image_size, num_boxes=num_boxes, min_boxes=min_boxes,
             max_boxes=max_boxes, score_threshold=score_threshold, weights=weights, device=device,
             batch_size=batch_size, num_workers=num_workers, skip_unreadable=skip_unreadable,
             allow_missing=allow_missing)


@extract_app.command("synthetic")
@guarded
def extract_synthetic_cmd(
    preset: Annotated[str, typer.Argument(help="demo (the demo's data) or tiny (the tests').")],
    out: OutOption,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generator.")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Generate the built-in synthetic dataset: BUTD-shaped region features and captions, no files from outside.

    Examples:
      [bold]maxmatch extract-features synthetic demo --out demo/features.h5[/]
      [bold]maxmatch extract-features synthetic tiny --seed 1 --out tiny.h5[/]
    """
    _extract(out, overwrite, synthetic=preset, seed=seed)


@extract_app.command("precomp")
@guarded
def extract_precomp_cmd(
    folder: Annotated[Path, typer.Argument(
        help="SCAN / VSE-infinity precomp folder ({split}_ims.npy, {split}_caps.txt).")],
    out: OutOption,
    dataset: Annotated[str, typer.Option("--dataset", help="coco (train/dev/test/testall) or f30k.")] = "coco",
    split: Annotated[Optional[list[str]], typer.Option(
        "--split", help="Import only this split (repeatable; default: all found).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import SCAN precomp features (36 BUTD regions of 2048 dimensions per image) and their captions.

    Examples:
      [bold]maxmatch extract-features precomp data/coco_precomp --dataset coco \\
          --out coco.h5[/]
      [bold]maxmatch extract-features precomp data/f30k_precomp --dataset f30k \\
          --split test --out f30k_test.h5[/]
    """
    _extract(out, overwrite, from_precomp=folder, dataset=dataset, splits=split)


@extract_app.command("tsv")
@guarded
def extract_tsv_cmd(
    files: Annotated[list[Path], typer.Argument(help="bottom-up-attention TSV files (shards in any order).")],
    captions: Annotated[Path, typer.Option(
        "--captions", help="Karpathy split json (dataset_coco.json / dataset_flickr30k.json): captions and "
                           "splits.")],
    out: OutOption,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Leave out json images that no TSV row provides instead of stopping.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Import bottom-up-attention TSV files (image_id, boxes, base64 features), with a Karpathy json's captions.

    Example:
      [bold]maxmatch extract-features tsv trainval_36/*.tsv \\
          --captions dataset_coco.json --out coco_butd.h5[/]
    """
    _extract(out, overwrite, from_butd_tsv=files, captions=captions, allow_missing=allow_missing)


@extract_app.command("images")
@guarded
def extract_images_cmd(
    folder: Annotated[Path, typer.Argument(help="Image folder to extract features from.")],
    out: OutOption,
    captions: Annotated[Optional[Path], typer.Option(
        "--captions", help="Karpathy split json (captions and splits), image<TAB>caption lines (.txt), a .csv "
                           "with columns image,caption or a .json list of {image, caption}; none: a gallery of "
                           "every image.")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="With a plain captions file or none: the split to store (default train, or gallery "
                        "without --captions).")] = None,
    kind: Annotated[str, typer.Option(
        "--kind", help="grid (ResNet cells), region (Faster R-CNN boxes) or pixels (index the image files for "
                       "end-to-end CNN training: model.image_encoder=cnn).")] = "grid",
    backbone: Annotated[Optional[str], typer.Option(
        "--backbone", help="resnet152 | resnext101_32x8d (grid); fasterrcnn_resnet50_fpn[_v2] (region).")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", help="Grid: crop size (224 -> 7x7 cells); region: shorter side for the detector "
                             "(default 600).")] = None,
    num_boxes: Annotated[int, typer.Option("--num-boxes", help="Region: boxes per image (0 = adaptive "
                                                               "min..max).")] = 36,
    min_boxes: Annotated[int, typer.Option("--min-boxes", help="Region, adaptive: fewest boxes.")] = 10,
    max_boxes: Annotated[int, typer.Option("--max-boxes", help="Region, adaptive: most boxes.")] = 100,
    score_threshold: Annotated[float, typer.Option(
        "--score-threshold", help="Region, adaptive: detection score threshold.")] = 0.2,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="Model checkpoint (.pth); default: the torch hub cache. Never downloaded.")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 16,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="Decoding workers.")] = None,
    skip_unreadable: Annotated[bool, typer.Option(
        "--skip-unreadable", help="Leave unreadable images out (listed in the metadata) instead of "
                                  "stopping.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Extract CNN features from an image folder: grid cells or detector regions, or (--kind pixels) an index of
    the image files for end-to-end training.

    Under torchrun the images are split over the ranks and the shards merged.

    Examples:
      [bold]maxmatch extract-features images coco/images \\
          --captions dataset_coco.json --kind grid --out coco_grid.h5[/]
      [bold]maxmatch extract-features images coco/images \\
          --captions dataset_coco.json --kind pixels --out coco_images.h5[/]
      # no captions: a gallery, its split is called gallery
      [bold]maxmatch extract-features images photos/ --kind grid --out gallery.h5[/]
    """
    _extract(out, overwrite, images=folder, captions=captions, splits=[split] if split else None, kind=kind,
             backbone=backbone, image_size=image_size, num_boxes=num_boxes, min_boxes=min_boxes,
             max_boxes=max_boxes, score_threshold=score_threshold, weights=weights, device=device,
             batch_size=batch_size, num_workers=num_workers, skip_unreadable=skip_unreadable)


# ------------------------------------------------------------------------------------------ features info / merge


def _print_store_info(info: dict) -> None:
    from rich.table import Table

    from maxmatch_cli.reporting.tables import key_value_table

    def short(value) -> str:
        # Metadata can hold whole class lists; show the scalar facts and name the rest.
        if isinstance(value, dict):
            parts = [f"{k}={v}" if isinstance(v, (str, int, float, bool)) else f"{k}=…" for k, v in value.items()]
            value = ", ".join(parts)
        text = str(value)
        return text if len(text) <= 160 else text[:157] + "…"

    info = dict(info)
    if isinstance(info.get("size_bytes"), int):
        info["size_bytes"] = f"{info['size_bytes']:,} ({info['size_bytes'] / 2**20:,.1f} MiB)"
    line(f"feature cache {info.get('path', '')}")  # a path in a table cell or title would be wrapped
    console.print(key_value_table({k: short(v) for k, v in info.items() if k not in ("splits", "path")},
                                  title="feature cache"))
    splits = info.get("splits", {})
    table = Table(title="splits", title_justify="left")
    table.add_column("split", style="bold")
    table.add_column("images", justify="right")
    table.add_column("captions", justify="right")
    for name, counts in splits.items():
        table.add_row(name, f"{counts['images']:,}", f"{counts['captions']:,}")
    console.print(table)


@features_app.command("info")
@guarded
def features_info_cmd(
    file: Annotated[Path, typer.Argument(help="An HDF5 feature cache.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the same information as JSON on stdout.")] = False,
) -> None:
    """Schema version, source, splits, feature shape and dtype, size on disk, completeness.

    Examples:
      [bold]maxmatch features info demo/features.h5[/]
      [bold]maxmatch features info demo/features.h5 --json > info.json[/]
    """
    from maxmatch_cli.features.store import describe_store

    info = describe_store(file)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=_json_default))
    else:
        _print_store_info(info)


def _json_default(value):
    """numpy scalars and arrays, and paths, in the store's metadata."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@features_app.command("merge")
@guarded
def features_merge_cmd(
    shards: Annotated[list[Path], typer.Argument(help="Finished stores to merge (e.g. OUT.shards/rank-*.h5).")],
    out: Annotated[Path, typer.Option("--out", help="Merged HDF5 feature cache to write.")],
    captions: Annotated[Optional[Path], typer.Option(
        "--captions", help="Karpathy json giving image order, captions and splits (for extraction shards).")] = None,
    keep_shards: Annotated[bool, typer.Option("--keep-shards", help="Keep the shard files after merging.")] = False,
) -> None:
    """Merge per-rank shards (or compatible caches) into one, checking no image is lost or doubled.

    Example:
      [bold]maxmatch features merge coco_grid.h5.shards/rank-*.h5 \\
          --captions dataset_coco.json --out coco_grid.h5[/]
    """
    from maxmatch_cli.features.merge import merge_shards
    from maxmatch_cli.features.store import describe_store

    path = merge_shards(shards, out, captions=captions, remove_shards=not keep_shards)
    _print_store_info(describe_store(path))
    wrote(path)
