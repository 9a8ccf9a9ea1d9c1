"""The `maxmatch` command line: thin Typer commands, each one call into the library."""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from maxmatch_cli import __version__
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.progress import console

err_console = Console(stderr=True, highlight=False)


# --help that reads well in an 80-column log. Typer shows `<str>`, `<bool>`, `<list[Path]>` and `{inputs}`, and in
# rich mode keeps every line break of a docstring; these classes keep the rendering and fix those three things.


class _Option(TyperOption):
    """An option whose help shows click's metavars (TEXT, INTEGER, FLOAT, PATH; none for a flag) rather than
    typer's ``<str>``, ``<bool>`` and ``<list[str]>``."""

    _NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH"}

    def display_type_rich(self, ctx):
        if self.metavar is not None:
            return self.metavar
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        shown = (self.display_type(ctx) or "").strip("<>")
        if shown.startswith("list[") and shown.endswith("]"):  # a repeatable option: one value each time
            shown = shown[5:-1]
        return self._NAMES.get(shown, shown if "|" in shown else shown.upper()) or None


class _Argument(TyperArgument):
    """An argument named in capitals in the usage line and the help (``CHECKPOINT``, ``INPUTS...``), without a type
    column repeating it."""

    def display_type_rich(self, ctx):
        return None

    def get_usage_pieces(self, ctx):
        return [self.metavar if self.required else f"[{self.metavar}]"]


def _reflow(text: str | None) -> str | None:
    """A docstring as rich help wants it: the lines of each prose paragraph joined, so that the terminal wraps
    them (rich keeps single line breaks, which at 80 columns leave half-empty lines); paragraphs with indented
    lines (examples) kept line by line."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.split("\n"))
                         for p in paragraphs)


def _readable(params: list) -> list:
    """Options with click's metavars, arguments in capitals (:class:`_Option`, :class:`_Argument`)."""
    for param in params:
        if type(param) is TyperOption:
            param.__class__ = _Option  # the same object; only methods that render help differ
        elif type(param) is TyperArgument:
            param.__class__ = _Argument
            param.metavar = param.metavar or param.name.upper() + ("..." if param.nargs != 1 else "")
    return params


class _ReadableCommand(TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx):  # the parameters and --help, which click adds here
        return _readable(super().get_params(ctx))


class _ReadableGroup(TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx):
        return _readable(super().get_params(ctx))


def readable_help(*typers: typer.Typer) -> None:
    """Make every command registered so far on ``typers`` a :class:`_ReadableCommand` (the groups are
    :class:`_ReadableGroup` from their creation)."""
    for t in typers:
        for info in t.registered_commands:
            if info.cls in (None, TyperCommand):
                info.cls = _ReadableCommand


app = typer.Typer(
    name="maxmatch",
    cls=_ReadableGroup,
    help="Set-based image-text retrieval with Maximal Pair Assignment Similarity (MaxMatch, ACL 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
features_app = typer.Typer(cls=_ReadableGroup, help="Inspect feature caches.", no_args_is_help=True)
app.add_typer(features_app, name="features")

# Shared option types.
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe value, e.g. --set optim.lr=2e-4 (repeatable).", metavar="SECTION.KEY=VALUE")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")]
CsvOption = Annotated[Optional[Path], typer.Option("--csv", help="Also write the results as CSV here.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
CacheOption = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse the split's embeddings cached next to the checkpoint (encode once).")]
DataOption = Annotated[Optional[str], typer.Option("--data", help="Feature cache (default: the recipe's).")]
SplitOption = Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: eval.split).")]
ProtocolOption = Annotated[Optional[str], typer.Option(
    "--protocol", help="auto, full, coco1k or coco5k (coco1k/coco5k: the 5,000-image COCO test split only; "
                       "default: eval.protocol).")]
EvalProtocolOption = Annotated[Optional[str], typer.Option(
    "--protocol", help="auto, full, coco1k, coco5k, eccv or cxc (coco1k/coco5k: the 5,000-image COCO test split only; "
                       "eccv/cxc: coco5k plus the ECCV Caption or CxC metrics, extra 'eccv'; default: eval.protocol).")]
CocoCaptionsOption = Annotated[Optional[Path], typer.Option(
    "--coco-captions", metavar="JSON", help="COCO caption annotations (captions_val2014.json) giving --protocol "
                                            "eccv/cxc the caption annotation ids, matched by image id and text.")]
SimilarityOption = Annotated[Optional[str], typer.Option(
    "--similarity", help="Set similarity at test time (default: the training one).")]


def guarded(func):
    """Turn user errors into one clear message and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (MaxMatchError, OSError) as exc:
            if os.environ.get("MAXMATCH_DEBUG") == "1":
                raise
            _report(exc)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _report(exc: Exception) -> None:
    """One message naming the input and the fix.

    Printed as it is: no rich markup taken from it (paths may hold brackets), and never hard-wrapped at the
    console width (off a terminal rich would break lines at 80 columns, splitting paths and messages).
    """
    if isinstance(exc, MaxMatchError):
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        return
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    err_console.print(f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}", soft_wrap=True)
    err_console.print("[yellow]hint:[/] check the path, its permissions and the free disk space", soft_wrap=True)


def _line(text: str) -> None:
    """Print one line of plain text (paths included) that is never wrapped or read as markup."""
    console.print(escape(text), soft_wrap=True)


def _wrote(*paths) -> None:
    """Announce each file a command wrote, one ``wrote PATH`` line each."""
    for path in paths:
        _line(f"wrote {path}")


def _version(value: bool) -> None:
    if value:
        console.print(f"maxmatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Set-based image-text retrieval with Maximal Pair Assignment Similarity (MaxMatch, ACL 2025)."""


@app.command("recipes")
@guarded
def recipes_cmd(
    name: Annotated[Optional[str], typer.Argument(help="A recipe name or .toml path to print resolved.")] = None,
    overrides: SetOption = None,
) -> None:
    """List the shipped recipes, or print one fully resolved.

    Example: [bold]maxmatch recipes coco-butd-bert --set optim.lr=2e-4[/]
    """
    from rich.syntax import Syntax
    from rich.table import Table

    from maxmatch_cli.config.recipes import list_recipes, load_recipe, parse_overrides, to_toml

    if name is None:
        table = Table(title="Shipped recipes", title_justify="left")
        table.add_column("name", style="bold cyan")
        table.add_column("purpose")
        for recipe_name, description in list_recipes().items():
            table.add_row(recipe_name, description)
        console.print(table)
        return
    recipe = load_recipe(name, parse_overrides(overrides))
    console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark", background_color="default"))


@app.command("similarities")
@guarded
def similarities_cmd() -> None:
    """List the set-to-set similarities (loss.similarity / eval.similarity / --similarity).

    Example: [bold]maxmatch evaluate demo/run --split test --similarity chamfer[/]
    """
    from rich.table import Table

    from maxmatch_cli.method.similarity import list_similarities

    table = Table(title="Set similarities", title_justify="left")
    table.add_column("name", style="bold cyan")
    table.add_column("what it computes")
    for name, description in list_similarities():
        table.add_row(name, description)
    console.print(table)


@app.command("extract-features")
@guarded
def extract_features_cmd(
    out: Annotated[Path, typer.Option("--out", help="HDF5 feature cache to write.")],
    synthetic: Annotated[Optional[str], typer.Option(
        "--synthetic", help="Generate the built-in synthetic dataset: 'demo' or 'tiny'.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --synthetic.")] = 0,
    from_precomp: Annotated[Optional[Path], typer.Option(
        "--from-precomp", help="SCAN / VSE-infinity precomp folder ({split}_ims.npy, {split}_caps.txt).")] = None,
    dataset: Annotated[str, typer.Option(help="coco (train/dev/test/testall) or f30k, for --from-precomp.")] = "coco",
    split: Annotated[Optional[list[str]], typer.Option(
        "--split", help="Import only this precomp split (repeatable; default: all found). --images with a plain "
                         "captions file or none: the one split to store (default train, or gallery without "
                         "--captions).")] = None,
    from_butd_tsv: Annotated[Optional[list[Path]], typer.Option(
        "--from-butd-tsv", help="bottom-up-attention TSV file (repeatable; shards in any order).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image folder to extract features from.")] = None,
    captions: Annotated[Optional[Path], typer.Option(
        "--captions", help="Karpathy split json (dataset_coco.json / dataset_flickr30k.json): captions and splits. "
                           "--images also takes image<TAB>caption lines (.txt), a .csv with columns image,caption "
                           "or a .json list of {image, caption}, or no captions (a gallery of every image).")] = None,
    kind: Annotated[str, typer.Option(
        help="--images: grid (ResNet cells), region (Faster R-CNN boxes) or pixels (index the image files for "
             "end-to-end CNN training: model.image_encoder=cnn).")] = "grid",
    backbone: Annotated[Optional[str], typer.Option(
        help="resnet152 | resnext101_32x8d (grid); fasterrcnn_resnet50_fpn[_v2] (region).")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="Grid: crop size (224 -> 7x7 cells); region: shorter side for the detector (default 600).")] = None,
    num_boxes: Annotated[int, typer.Option(help="Region: boxes per image (0 = adaptive min..max).")] = 36,
    min_boxes: Annotated[int, typer.Option(help="Region, adaptive: fewest boxes.")] = 10,
    max_boxes: Annotated[int, typer.Option(help="Region, adaptive: most boxes.")] = 100,
    score_threshold: Annotated[float, typer.Option(help="Region, adaptive: detection score threshold.")] = 0.2,
    weights: Annotated[Optional[str], typer.Option(
        help="Model checkpoint (.pth); default: the torch hub cache. Never downloaded.")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="--images: images per forward pass.")] = 16,
    num_workers: Annotated[Optional[int], typer.Option(help="--images: decoding workers.")] = None,
    skip_unreadable: Annotated[bool, typer.Option(
        "--skip-unreadable",
        help="--images: leave unreadable images out (listed in the metadata) instead of stopping.")] = False,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing",
        help="--from-butd-tsv: leave out json images that no TSV row provides instead of stopping.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Build a feature cache (HDF5 schema v1) that `train` and `evaluate` read.

    Re-running an interrupted extraction with the same arguments resumes it; re-running a finished one does
    nothing. Under torchrun, --images extraction is split over the ranks and merged.

    Examples:
      [bold]maxmatch extract-features --synthetic demo --out demo/features.h5[/]
      [bold]maxmatch extract-features --from-precomp data/coco_precomp --dataset coco \\
          --out coco.h5[/]
      [bold]maxmatch extract-features --from-butd-tsv trainval_36/*.tsv \\
          --captions dataset_coco.json --out coco_butd.h5[/]
      [bold]maxmatch extract-features --images coco/images \\
          --captions dataset_coco.json --kind grid --out coco_grid.h5[/]
      [bold]maxmatch extract-features --images coco/images \\
          --captions dataset_coco.json --kind pixels --out coco_images.h5[/]
      # no captions: a gallery, its split is called gallery
      [bold]maxmatch extract-features --images photos/ --kind grid --out gallery.h5[/]
    """
    from maxmatch_cli.features.extract import extract_features
    from maxmatch_cli.features.store import describe_store, store_state

    before = store_state(out) if out.exists() and not overwrite else "missing"
    path = extract_features(
        out, synthetic=synthetic, seed=seed, from_precomp=from_precomp, dataset=dataset, splits=split,
        from_butd_tsv=from_butd_tsv, images=images, captions=captions, kind=kind, backbone=backbone,
        image_size=image_size, num_boxes=num_boxes, min_boxes=min_boxes, max_boxes=max_boxes,
        score_threshold=score_threshold, weights=weights, device=device, batch_size=batch_size,
        num_workers=num_workers, skip_unreadable=skip_unreadable, allow_missing=allow_missing, overwrite=overwrite,
    )
    if before == "complete":
        _line(f"{path} is already complete (same arguments): nothing to do.")
    if path.exists():  # on torchrun ranks other than 0 only a shard was written
        _print_store_info(describe_store(path))
        if before != "complete":
            _wrote(path)


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
    _line(f"feature cache {info.get('path', '')}")  # a path in a table cell or title would be wrapped
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
    _wrote(path)


@app.command("train")
@guarded
def train_cmd(
    recipe: Annotated[str, typer.Option("--recipe", help="Shipped recipe name or a .toml path.")],
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the run already in OUT (its checkpoints, metrics.jsonl, steps.jsonl, "
                            "recipe.toml and cached embeddings; nothing else).")] = False,
) -> None:
    """Train a model; writes best.safetensors, last.safetensors, metrics.jsonl, steps.jsonl and recipe.toml to
    the run folder.

    A folder that already holds a run is refused: continue it with --resume or replace it with --overwrite.

    Example:
      [bold]maxmatch train --recipe demo --set data.path=demo/features.h5 \\
          --out runs/demo[/]
    """
    from rich.syntax import Syntax

    from maxmatch_cli.config.recipes import load_recipe, parse_overrides, to_toml
    from maxmatch_cli.reporting.tables import recall_table
    from maxmatch_cli.training.rundir import RUN_FILES, prepare_run_dir
    from maxmatch_cli.training.trainer import train

    resolved = load_recipe(recipe, parse_overrides(overrides))
    out = out or Path("runs") / resolved.name
    removed = prepare_run_dir(out, resume=resume, overwrite=overwrite)
    console.rule(f"[bold]maxmatch train[/] · recipe {escape(resolved.name)}")
    _line(f"run folder {out}" + (" (continued)" if resume else ""))
    if removed:
        _line(f"removed the earlier run's {len(removed)} file(s) from {out} (--overwrite)")
    console.print(Syntax(to_toml(resolved), "toml", theme="ansi_dark", background_color="default"))
    result = train(resolved, out, resume=resume)
    if result.last_metrics:
        console.print(recall_table([("validation (last epoch)", result.last_metrics)]))
    status = "interrupted" if result.interrupted else "done"
    console.print(f"[bold green]{status}[/]: {result.steps} steps in {result.seconds / 60:.1f} min; "
                  f"best val RSUM {result.best_rsum if result.best_rsum is None else round(result.best_rsum, 2)}",
                  soft_wrap=True)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes the run's files
        _wrote(*(Path(result.out_dir) / name for name in RUN_FILES if (Path(result.out_dir) / name).is_file()))
    if result.interrupted:
        raise typer.Exit(130)


@app.command("evaluate")
@guarded
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (or run folder) from `maxmatch train`.")],
    data: DataOption = None,
    split: SplitOption = None,
    protocol: EvalProtocolOption = None,
    similarity: SimilarityOption = None,
    device: DeviceOption = "auto",
    json_path: JsonOption = None,
    csv_path: CsvOption = None,
    cache: CacheOption = True,
    coco_captions: CocoCaptionsOption = None,
) -> None:
    """Recall@K and RSUM of a checkpoint, as in the paper's tables (and ECCV Caption / CxC on COCO 5K).

    Examples:
      [bold]maxmatch evaluate runs/demo/best.safetensors --split test --json results.json[/]
      [bold]maxmatch evaluate runs/coco --split testall --protocol eccv \\
          --coco-captions captions_val2014.json[/]
    """
    from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, metrics_table
    from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint
    from maxmatch_cli.reporting.tables import recall_table

    result = evaluate_checkpoint(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                                 device=device, json_path=json_path, csv_path=csv_path, cache=cache,
                                 coco_captions=coco_captions)
    recall_protocol = "coco5k" if result.protocol in ECCV_PROTOCOLS else result.protocol
    rows = [(f"{recall_protocol} ({result.n_images:,} images)", result.metrics)]
    if result.folds_mean is not None:
        rows.append((f"coco1k (mean of {len(result.folds)} folds)", result.folds_mean))
    elif result.folds:
        rows += [(f"fold {i + 1}", m) for i, m in enumerate(result.folds)]
    _line(f"checkpoint {result.checkpoint} · split {result.split} of {result.data}")
    console.print(recall_table(rows, title=f"Recall@K (%) · similarity {escape(result.similarity)}"))
    if result.protocol in ECCV_PROTOCOLS:
        console.print(metrics_table(result.metrics, result.protocol))
    _wrote(*result.files)


@app.command("ensemble")
@guarded
def ensemble_cmd(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints (files or run folders).")],
    data: DataOption = None,
    split: SplitOption = None,
    protocol: EvalProtocolOption = None,
    similarity: SimilarityOption = None,
    device: DeviceOption = "auto",
    json_path: JsonOption = None,
    csv_path: CsvOption = None,
    cache: CacheOption = True,
    coco_captions: CocoCaptionsOption = None,
) -> None:
    """Average the similarities of several checkpoints (paper §4.2: two seeds) and report each and the ensemble.

    Every checkpoint keeps its own recipe, vocabulary and similarity; all must see the same images and captions.

    Examples:
      [bold]maxmatch ensemble runs/seed0 runs/seed1 --split test --json ensemble.json[/]
      [bold]maxmatch ensemble runs/seed0 runs/seed1 --split testall --protocol eccv \\
          --coco-captions captions_val2014.json[/]
    """
    from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, metrics_table
    from maxmatch_cli.evaluation.evaluate import ensemble_checkpoints
    from maxmatch_cli.reporting.tables import recall_table

    result = ensemble_checkpoints(checkpoints, data=data, split=split, protocol=protocol, similarity=similarity,
                                  device=device, json_path=json_path, csv_path=csv_path, cache=cache,
                                  coco_captions=coco_captions)
    ens = result.ensemble
    # Long paths would wrap inside the table: members are numbered there and listed here in full.
    for i, (path, m) in enumerate(zip(result.checkpoints, result.members), 1):
        _line(f"member {i}: {path} ({m.similarity})")
    labels = [f"member {i}" for i in range(1, len(result.members) + 1)]
    rows = [*zip(labels, (m.metrics for m in result.members)), (f"ensemble of {len(labels)}", ens.metrics)]
    recall_protocol = "coco5k" if ens.protocol in ECCV_PROTOCOLS else ens.protocol
    console.print(recall_table(rows, title=f"Recall@K (%) · {recall_protocol} ({ens.n_images:,} images)"))
    if ens.folds_mean is not None:
        rows = [*zip(labels, (m.folds_mean for m in result.members)), (f"ensemble of {len(labels)}", ens.folds_mean)]
        console.print(recall_table(rows, title=f"Recall@K (%) · coco1k (mean of {len(ens.folds)} folds)"))
    if ens.protocol in ECCV_PROTOCOLS:
        for label, m in zip(labels, result.members):
            console.print(metrics_table(m.metrics, ens.protocol, label))
        console.print(metrics_table(ens.metrics, ens.protocol, f"ensemble of {len(labels)}"))
    _wrote(*result.files)


@app.command("analyze-collapse")
@guarded
def analyze_collapse_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (or run folder) from `maxmatch train`.")],
    data: DataOption = None,
    split: SplitOption = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output folder (default: collapse-<checkpoint>-<split> next to the checkpoint).")] = None,
    protocol: ProtocolOption = None,
    similarity: SimilarityOption = None,
    device: DeviceOption = "auto",
    cache: CacheOption = True,
    tsne: Annotated[int, typer.Option(
        "--tsne", metavar="N", help="Also a t-SNE of the set elements of the split's first N images and their "
                                    "captions (Figure 3): tsne.csv, tsne.png, tsne.pdf. 0: none.")] = 0,
) -> None:
    """Set-collapse analyses: circular variance, per-slot ablation (Table 4), pair heatmaps (Figure 4) and
    per-element retrieval with its diversity (§4.5); writes collapse.json, CSV files and the heatmaps as PNG/PDF.
    With --tsne N also the t-SNE of Figure 3: colour = element, dots = image, crosses = text.

    Example:
      [bold]maxmatch analyze-collapse runs/demo/best.safetensors --split test \\
          --out analysis/ --tsne 100[/]
    """
    from maxmatch_cli.evaluation.collapse import analyze_collapse
    from maxmatch_cli.reporting.tables import collapse_tables

    report = analyze_collapse(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                              out_dir=out, device=device, cache=cache, tsne=tsne)
    _line(f"checkpoint {report.checkpoint} · split {report.split} · {report.n_images:,} images, "
          f"{report.n_captions:,} captions, K={report.K}")
    for table in collapse_tables(report):
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    _wrote(*report.cache_files, *(Path(report.out_dir) / name for name in report.files))


@app.command("plot")
@guarded
def plot_cmd(
    run: Annotated[Path, typer.Argument(help="A training run folder (steps.jsonl, metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="File stem to write, .png and .pdf are added (default: RUN/curves).")] = None,
) -> None:
    """Training curves of a run: every loss term per step (raw and smoothed), the learning rate, and validation
    RSUM and R@1 per epoch, as PNG and PDF.

    Example: [bold]maxmatch plot demo/run[/]
    """
    from maxmatch_cli.reporting.plots import plot_training_curves

    _wrote(*plot_training_curves(run, out))


@app.command("compare")
@guarded
def compare_cmd(
    inputs: Annotated[list[Path], typer.Argument(
        help="Evaluation JSON files (evaluate --json), run folders, or benchmarks/demo_results.json.")],
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Label (or a part naming one row) of the row ΔRSUM is taken against; default the first.")
    ] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="config: runs differing only in train.seed share a row; recipe: runs of one recipe name "
                           "share a row; run: one row per run.")] = "config",
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Compare results of this split (a run folder: its evaluation JSON of that split).")] = None,
    layout: Annotated[str, typer.Option(
        "--layout", help="recall (the six recalls, RSUM), table3 (Similarity | Div | MMD | GD | ISD | RSUM), "
                         "eccv or cxc (ECCV Caption / CxC metrics of evaluation files).")
    ] = "recall",
    decimals: Annotated[int, typer.Option("--decimals", help="Decimals shown (the CSV keeps every digit).")] = 1,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown here.")
                        ] = None,
    latex: Annotated[Optional[Path], typer.Option("--latex", help="Also write the table as LaTeX (booktabs) here.")
                     ] = None,
    csv_path: CsvOption = None,
    figure: Annotated[Optional[Path], typer.Option(
        "--figure", metavar="STEM", help="Also draw the recalls as grouped bars (one bar per row, error bars: std "
                                         "over seeds) to STEM.png and STEM.pdf.")] = None,
) -> None:
    """One table across runs or evaluation files: mean ± std over seeds, ΔRSUM against a baseline row.

    Examples:
      [bold]maxmatch compare runs/demo-seed0 runs/demo-seed1 runs/chamfer-seed0 \\
          runs/chamfer-seed1[/]
      [bold]maxmatch compare benchmarks/demo_results.json --layout table3 \\
          --latex table3.tex --csv table3.csv[/]
      [bold]maxmatch compare benchmarks/demo_results.json --figure recall-bars[/]
    """
    from maxmatch_cli.reporting.compare import compare_runs, rich_table, write_comparison

    result = compare_runs(inputs, split=split, group_by=group_by, baseline=baseline)
    console.print(rich_table(result, layout, decimals, width=console.width))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    _wrote(*write_comparison(result, markdown=markdown, latex=latex, csv=csv_path, figure=figure, layout=layout,
                             decimals=decimals))


from maxmatch_cli.cli import index as cli_index  # noqa: E402,F401  (registers `index` and `query` on app)

readable_help(app, features_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
