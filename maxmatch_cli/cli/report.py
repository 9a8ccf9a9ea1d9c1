"""``maxmatch compare`` (one table across runs), ``maxmatch plot`` (training curves) and ``maxmatch recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maxmatch_cli.cli.options import CsvOption, SetOption, command_group, console, guarded, note, wrote

PANEL = "Reports and recipes"

app = command_group()


@app.command("compare", rich_help_panel=PANEL)
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

    A run folder gives its test evaluation (RUN/eval, written by `maxmatch evaluate`), else its last validation;
    the source column names the split (and protocol) of each row.

    Examples:
      [bold]maxmatch compare demo/run[/]
      [bold]maxmatch compare runs/demo-seed0 runs/demo-seed1 runs/chamfer-seed0 \\
          runs/chamfer-seed1[/]
      [bold]maxmatch compare benchmarks/demo_results.json --layout table3 \\
          --latex table3.tex --csv table3.csv[/]
      [bold]maxmatch compare benchmarks/demo_results.json --figure recall-bars[/]
    """
    from maxmatch_cli.reporting.compare import check_display, compare_runs, rich_table, write_comparison

    check_display(layout, decimals, group_by)  # before any input is read
    result = compare_runs(inputs, split=split, group_by=group_by, baseline=baseline)
    console.print(rich_table(result, layout, decimals, width=console.width))
    for text in result.notes:
        note(text)
    wrote(*write_comparison(result, markdown=markdown, latex=latex, csv=csv_path, figure=figure, layout=layout,
                            decimals=decimals))


@app.command("plot", rich_help_panel=PANEL)
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

    wrote(*plot_training_curves(run, out))


@app.command("recipes", rich_help_panel=PANEL)
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
