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
    examples: Annotated[str, typer.Option(
        "--examples", metavar="N|IDS", help="Figures 5-7: the images whose per-element retrieval is shown, both "
        "directions (each image, and its first caption): a count N spread over the split, or image ids separated "
        "by commas (one id: end it with a comma). 0: none; the distinct-item means over the split are always "
        "computed.")] = "4",
    compare: Annotated[Optional[Path], typer.Option(
        "--compare", metavar="CKPT", help="A second checkpoint (e.g. smooth-Chamfer beside MaxMatch) whose "
        "per-element retrieval is shown beside, on the same images and captions; its set size K may differ.")] = None,
    images: Annotated[Optional[Path], typer.Option(
        "--images", metavar="DIR", help="Image folder for the thumbnails of a feature file made by extract-features "
        "images. One that records its image files (--kind pixels, and grid|region extracted by this version) knows "
        "its folder: DIR is needed only where it moved. For others, ids are paths under DIR or COCO ids of the "
        "Karpathy json the file was made from (without files, ids and first captions are shown).")] = None,
) -> None:
    """Set-collapse analyses: circular variance, per-slot ablation (Table 4), pair heatmaps (Figure 4) and
    per-element retrieval with its diversity (§4.5); writes collapse.json, CSV files and the heatmaps as PNG/PDF.
    With --tsne N also the t-SNE of Figure 3: colour = element, dots = image, crosses = text.
    Figures 5-7: for a few queries, what each element of the query's set retrieves alone (elements_i2t.png,
    elements_t2i.png and the offline page elements.html); --compare CKPT shows a second model beside, with its
    own set size K (e.g. K = 8 or a one-vector VSE++ beside K = 4: each model's K elements, distinct out of its K).

    Example:
      [bold]maxmatch analyze-collapse demo/run/best.safetensors --split test \\
          --out demo/collapse --tsne 100 --compare demo/chamfer/best.safetensors[/]
    """
    require_inputs(data=data, compare=compare, images=images)
    from maxmatch_cli.evaluation.collapse import analyze_collapse
    from maxmatch_cli.reporting.collapse import write_collapse_report
    from maxmatch_cli.reporting.element_figure import fmt_mean
    from maxmatch_cli.reporting.tables import collapse_tables

    report = analyze_collapse(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                              device=device, cache=cache, tsne=tsne, examples=examples, compare=compare,
                              image_root=images)
    write_collapse_report(report, out)
    line(f"checkpoint {report.checkpoint} · split {report.split} · {report.n_images:,} images, "
         f"{report.n_captions:,} captions, K={report.K}")
    for table in collapse_tables(report):
        console.print(table)
    for record in report.elements:
        d, k = record["distinct"], record["K"]
        scale = f"1 = collapsed, {k} = all different" if k > 1 else "one vector per item: always 1"
        line(f"distinct top-1 items per query of K = {k} ({scale}), {record['checkpoint']}: "
             f"image->caption {fmt_mean(d['i2t']['shown'])} shown, {fmt_mean(d['i2t']['split'])} over the split; "
             f"caption->image {fmt_mean(d['t2i']['shown'])} shown, {fmt_mean(d['t2i']['split'])} over the split")
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
