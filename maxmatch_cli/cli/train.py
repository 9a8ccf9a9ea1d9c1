"""``maxmatch train``: a model from a recipe, into a run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from maxmatch_cli.cli.options import SetOption, command_group, console, guarded, line, wrote

PANEL = "Training and evaluation"

app = command_group()


@app.command("train", rich_help_panel=PANEL)
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
    from maxmatch_cli.training.rundir import RUN_FILES, prepare_run_dir, run_lock
    from maxmatch_cli.training.interrupts import sigterm_interrupts
    from maxmatch_cli.training.tracking import tracker_folders
    from maxmatch_cli.training.trainer import train

    resolved = load_recipe(recipe, parse_overrides(overrides))
    out = out or Path("runs") / resolved.name
    # The lock before --overwrite removes anything: a second `train` on OUT is refused. SIGTERM (kill, SLURM,
    # Kubernetes) is handled as Ctrl-C is: the run is saved for --resume, the lock released, exit 143.
    with sigterm_interrupts(), run_lock(out):
        removed = prepare_run_dir(out, resume=resume, overwrite=overwrite)
        console.rule(f"[bold]maxmatch train[/] · recipe {escape(resolved.name)}")
        line(f"run folder {out}" + (" (continued)" if resume else ""))
        if removed:
            line(f"removed the earlier run's {len(removed)} file(s) from {out} (--overwrite)")
        console.print(Syntax(to_toml(resolved), "toml", theme="ansi_dark", background_color="default"))
        result = train(resolved, out, resume=resume)
    if result.last_metrics:
        console.print(recall_table([("validation (last epoch)", result.last_metrics)]))
    status = "interrupted" if result.interrupted else "done"
    console.print(f"[bold green]{status}[/]: {result.steps} steps in {result.seconds / 60:.1f} min; "
                  f"best val RSUM {result.best_rsum if result.best_rsum is None else round(result.best_rsum, 2)}",
                  soft_wrap=True)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes the run's files
        wrote(*(Path(result.out_dir) / name for name in RUN_FILES if (Path(result.out_dir) / name).is_file()))
        wrote(*tracker_folders(resolved.train.report_to, result.out_dir))  # OUT/tensorboard, OUT/wandb
    if result.interrupted:
        raise typer.Exit(result.exit_status or 130)
