"""``maxmatch analyze-collapse`` (set-collapse analyses of a checkpoint) and ``maxmatch similarities``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maxmatch_cli.cli.options import (CacheOption, CheckpointArgument, DataOption, DeviceOption, ProtocolOption,
                                      SimilarityOption, SplitOption, command_group, console, guarded, line, note,
                                      require_inputs, wrote)

PANEL = "Analysis"

app = command_group()


@app.command("analyze-collapse", rich_help_panel=PANEL)
@guarded
def analyze_collapse_cmd(
    checkpoint: CheckpointArgument,
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
      [bold]maxmatch analyze-collapse demo/run/best.safetensors --split test \\
          --out demo/collapse --tsne 100[/]
    """
    require_inputs(data=data)
    from maxmatch_cli.evaluation.collapse import analyze_collapse
    from maxmatch_cli.reporting.collapse import write_collapse_report
    from maxmatch_cli.reporting.tables import collapse_tables

    report = analyze_collapse(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                              device=device, cache=cache, tsne=tsne)
    write_collapse_report(report, out)
    line(f"checkpoint {report.checkpoint} · split {report.split} · {report.n_images:,} images, "
         f"{report.n_captions:,} captions, K={report.K}")
    for table in collapse_tables(report):
        console.print(table)
    for text in report.notes:
        note(text)
    wrote(*report.cache_files, *(Path(report.out_dir) / name for name in report.files))


@app.command("similarities", rich_help_panel=PANEL)
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
