"""``maxmatch evaluate`` (one checkpoint) and ``maxmatch ensemble`` (several): Recall@K tables as in the paper."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from maxmatch_cli.cli.options import (CacheOption, CheckpointArgument, CocoCaptionsOption, CsvOption, DataOption,
                                      DeviceOption, EvalProtocolOption, JsonOption, SimilaritiesOption,
                                      SimilarityOption, SplitOption, command_group, console, guarded, line,
                                      require_inputs, wrote)

PANEL = "Training and evaluation"

app = command_group()


@app.command("evaluate", rich_help_panel=PANEL)
@guarded
def evaluate_cmd(
    checkpoint: CheckpointArgument,
    data: DataOption = None,
    split: SplitOption = None,
    protocol: EvalProtocolOption = None,
    similarity: SimilaritiesOption = None,
    device: DeviceOption = "auto",
    json_path: JsonOption = None,
    csv_path: CsvOption = None,
    cache: CacheOption = True,
    coco_captions: CocoCaptionsOption = None,
) -> None:
    """Recall@K and RSUM of a checkpoint, as in the paper's tables (and ECCV Caption / CxC on COCO 5K).

    The paper recipes score with §3.4's top-k inference; `--similarity topk,maxmatch` encodes once and reports
    top-k beside exact MaxMatch in one table (the JSON's "metrics" is the first's, "by_similarity" holds each).
    A checkpoint of a run folder keeps its result with the run, in RUN/eval/<split>-<protocol>.json, where
    `maxmatch compare RUN` finds it; a similarity other than the checkpoint's own is kept beside it, one file
    each, as RUN/eval/<split>-<protocol>-<similarity>.json.

    Examples:
      [bold]maxmatch evaluate demo/run/best.safetensors --split test --json results.json[/]
      [bold]maxmatch evaluate demo/run --split test --similarity topk,maxmatch[/]
      [bold]maxmatch evaluate runs/coco --split testall --protocol eccv \\
          --coco-captions captions_val2014.json[/]
    """
    require_inputs(data=data, coco_captions=coco_captions)
    from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, metrics_table
    from maxmatch_cli.evaluation.evaluate import evaluate_checkpoint
    from maxmatch_cli.reporting.tables import recall_table

    result = evaluate_checkpoint(checkpoint, data=data, split=split, protocol=protocol, similarity=similarity,
                                 device=device, json_path=json_path, csv_path=csv_path, cache=cache,
                                 coco_captions=coco_captions, keep_with_run=True)
    scored = list(result.by_similarity.values()) or [result]
    several = len(scored) > 1
    rows = [row for r in scored for row in _recall_rows(r, f"{r.similarity} · " if several else "")]
    line(f"checkpoint {result.checkpoint} · split {result.split} of {result.data}")
    names = ", ".join(r.similarity for r in scored)
    console.print(recall_table(rows, title=f"Recall@K (%) · similarit{'ies' if several else 'y'} {escape(names)}"))
    if result.protocol in ECCV_PROTOCOLS:
        for r in scored:
            console.print(metrics_table(r.metrics, r.protocol, r.similarity if several else None))
    wrote(*result.files)


def _recall_rows(result, prefix: str = "") -> list[tuple[str, dict[str, float]]]:
    """The Recall@K rows of one result: the protocol's, then the coco1k folds' mean (or each fold)."""
    from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS

    recall_protocol = "coco5k" if result.protocol in ECCV_PROTOCOLS else result.protocol
    rows = [(f"{prefix}{recall_protocol} ({result.n_images:,} images)", result.metrics)]
    if result.folds_mean is not None:
        rows.append((f"{prefix}coco1k (mean of {len(result.folds)} folds)", result.folds_mean))
    elif result.folds:
        rows += [(f"{prefix}fold {i + 1}", m) for i, m in enumerate(result.folds)]
    return rows


@app.command("ensemble", rich_help_panel=PANEL)
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
    require_inputs(data=data, coco_captions=coco_captions)
    from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, metrics_table
    from maxmatch_cli.evaluation.ensemble import ensemble_checkpoints
    from maxmatch_cli.reporting.tables import recall_table

    result = ensemble_checkpoints(checkpoints, data=data, split=split, protocol=protocol, similarity=similarity,
                                  device=device, json_path=json_path, csv_path=csv_path, cache=cache,
                                  coco_captions=coco_captions)
    ens = result.ensemble
    # Long paths would wrap inside the table: members are numbered there and listed here in full.
    for i, (path, m) in enumerate(zip(result.checkpoints, result.members), 1):
        line(f"member {i}: {path} ({m.similarity})")
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
    wrote(*result.files)
