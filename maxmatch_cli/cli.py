"""The `maxmatch` command line: thin Typer commands, each one call into the library."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from maxmatch_cli import __version__
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.progress import console

err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="maxmatch",
    help="Set-based image-text retrieval with Maximal Pair Assignment Similarity (MaxMatch, ACL 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
features_app = typer.Typer(help="Inspect feature caches.", no_args_is_help=True)
app.add_typer(features_app, name="features")

# Shared option types.
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe value, e.g. --set optim.lr=2e-4 (repeatable).", metavar="SECTION.KEY=VALUE")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")]
CsvOption = Annotated[Optional[Path], typer.Option("--csv", help="Also write the results as CSV here.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]


def guarded(func):
    """Turn user errors into one clear message and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MaxMatchError as exc:
            err_console.print(f"[bold red]error:[/] {exc.message}")
            if exc.hint:
                err_console.print(f"[yellow]hint:[/] {exc.hint}")
            raise typer.Exit(2) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {where}{exc.strerror or exc}")
            err_console.print("[yellow]hint:[/] check the path, its permissions and the free disk space")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


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

    from maxmatch_cli.recipes import list_recipes, load_recipe, parse_overrides, to_toml

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
    """List the set-to-set similarities (loss.similarity / eval.similarity / --similarity)."""
    from rich.table import Table

    from maxmatch_cli.similarity import list_similarities

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
) -> None:
    """Build a feature cache (HDF5 schema v1) that `train` and `evaluate` read.

    Example: [bold]maxmatch extract-features --synthetic demo --out demo/features.h5[/]
    """
    from maxmatch_cli.features.store import open_store
    from maxmatch_cli.features.synthetic import generate_synthetic

    if synthetic is None:
        raise MaxMatchError("no source given", hint="use --synthetic demo (real-data importers: see --help)")
    path = generate_synthetic(out, preset=synthetic, seed=seed)
    _print_store_info(open_store(path).describe())


def _print_store_info(info: dict) -> None:
    from rich.table import Table

    from maxmatch_cli.report import key_value_table

    console.print(key_value_table({k: v for k, v in info.items() if k != "splits"}, title=f"{info.get('path', '')}"))
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
def features_info_cmd(file: Annotated[Path, typer.Argument(help="An HDF5 feature cache.")]) -> None:
    """Schema version, source, splits, feature shape and dtype, size on disk, completeness.

    Example: [bold]maxmatch features info demo/features.h5[/]
    """
    from maxmatch_cli.features.store import open_store

    _print_store_info(open_store(file).describe())


@app.command("train")
@guarded
def train_cmd(
    recipe: Annotated[str, typer.Option("--recipe", help="Shipped recipe name or a .toml path.")],
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<recipe>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
) -> None:
    """Train a model; writes best.safetensors, last.safetensors and metrics.jsonl to the run folder.

    Example: [bold]maxmatch train --recipe demo --set data.path=demo/features.h5 --out runs/demo[/]
    """
    from rich.syntax import Syntax

    from maxmatch_cli.recipes import load_recipe, parse_overrides, to_toml
    from maxmatch_cli.report import recall_table
    from maxmatch_cli.train import train

    resolved = load_recipe(recipe, parse_overrides(overrides))
    out = out or Path("runs") / resolved.name
    console.rule(f"[bold]maxmatch train[/] · recipe {resolved.name} → {out}")
    console.print(Syntax(to_toml(resolved), "toml", theme="ansi_dark", background_color="default"))
    result = train(resolved, out, resume=resume)
    if result.last_metrics:
        console.print(recall_table([("validation (last epoch)", result.last_metrics)]))
    status = "interrupted" if result.interrupted else "done"
    console.print(f"[bold green]{status}[/]: {result.steps} steps in {result.seconds / 60:.1f} min; "
                  f"best val RSUM {result.best_rsum if result.best_rsum is None else round(result.best_rsum, 2)}; "
                  f"checkpoints in {result.out_dir}")
    if result.interrupted:
        raise typer.Exit(130)


@app.command("evaluate")
@guarded
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (or run folder) from `maxmatch train`.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Feature cache (default: the recipe's).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: eval.split).")] = None,
    protocol: Annotated[Optional[str], typer.Option(
        "--protocol", help="auto, full, coco1k or coco5k (default: eval.protocol).")] = None,
    similarity: Annotated[Optional[str], typer.Option(
        "--similarity", help="Set similarity at test time (default: the training one).")] = None,
    device: DeviceOption = "auto",
    json_path: JsonOption = None,
    csv_path: CsvOption = None,
) -> None:
    """Recall@K and RSUM of a checkpoint, as in the paper's tables.

    Example: [bold]maxmatch evaluate runs/demo/best.safetensors --split test --json results.json[/]
    """
    from maxmatch_cli.evaluate import evaluate_checkpoint
    from maxmatch_cli.report import recall_table

    result = evaluate_checkpoint(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                                 device=device, json_path=json_path, csv_path=csv_path)
    rows = [(f"{result.protocol} ({result.n_images:,} images)", result.metrics)]
    if result.folds_mean is not None:
        rows.append((f"coco1k (mean of {len(result.folds)} folds)", result.folds_mean))
    elif result.folds:
        rows += [(f"fold {i + 1}", m) for i, m in enumerate(result.folds)]
    console.print(recall_table(rows, title=f"Recall@K (%) · {checkpoint} · similarity {result.similarity}"))
    if json_path:
        console.print(f"wrote {json_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
