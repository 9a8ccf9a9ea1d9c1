"""One table across runs: mean ± std over seeds, ΔRSUM against a baseline, as text, Markdown, LaTeX or CSV.

Inputs (:func:`load_results`), each giving one result per run:

* an evaluation JSON written by ``maxmatch evaluate --json`` (or ``ensemble --json``): its ``metrics``;
* a run folder (``recipe.toml``, ``metrics.jsonl``, checkpoints): the evaluation JSON inside it or in its
  ``eval/`` folder (where ``maxmatch evaluate`` keeps them) if there is one (of ``--split``, or of the recipe's
  ``eval.split``), else the last validation record of ``metrics.jsonl``, labelled as such;
* ``benchmarks/demo_results.json`` (``{"runs": [{config, seed, metrics, ...}], "commands": {config: ...}}``).

Runs whose recipes differ only in ``train.seed`` (and in settings that do not change what is trained:
:data:`NOT_CONFIG`) form one row (:func:`compare`); its label is the recipe name plus the overrides in which the
rows differ (where they differ from the shipped recipe of that name). The statistics are pandas' mean and sample
standard deviation (n − 1); every output format is rendered from the same :class:`Comparison`.

Modules: ``records`` (the columns, groupings and result classes), ``recipes`` (a result's recipe), ``loading``
(:func:`load_results`), ``grouping`` (:func:`compare`), ``formats`` (cells, Markdown, LaTeX, CSV, files) and
``terminal`` (:func:`rich_table`); every public name is importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from maxmatch_cli.reporting.compare.formats import (COCO_RSUM_HEAD, check_display, display_frame, to_csv, to_latex,
                                                    to_markdown, write_comparison)
from maxmatch_cli.reporting.compare.grouping import compare
from maxmatch_cli.reporting.compare.loading import load_results
from maxmatch_cli.reporting.compare.records import (COCO_EXTRAS, EVAL_DIR, EXTRAS, GROUP_BY, LAYOUTS, METRICS,
                                                    NOT_CONFIG, PATH_KEYS, REGULARISERS, SIMILARITY_NAMES,
                                                    Comparison, RunResult)
from maxmatch_cli.reporting.compare.terminal import rich_table

__all__ = ["COCO_EXTRAS", "COCO_RSUM_HEAD", "Comparison", "EVAL_DIR", "EXTRAS", "GROUP_BY", "LAYOUTS", "METRICS",
           "NOT_CONFIG", "PATH_KEYS", "REGULARISERS", "RunResult", "SIMILARITY_NAMES", "check_display", "compare",
           "compare_runs", "display_frame", "load_results", "rich_table", "to_csv", "to_latex", "to_markdown",
           "write_comparison"]


# compare_runs lives here, not in grouping.py, so that it calls this package's load_results: replacing
# maxmatch_cli.reporting.compare.load_results (as tests do) still takes effect.
def compare_runs(inputs: Sequence[str | Path], *, split: str | None = None, group_by: str = "config",
                 baseline: str | None = None) -> Comparison:
    """:func:`load_results` then :func:`compare`."""
    return compare(load_results(inputs, split=split), group_by=group_by, baseline=baseline)
