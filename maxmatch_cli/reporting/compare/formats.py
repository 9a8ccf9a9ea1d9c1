"""A :class:`Comparison` as text cells (:func:`display_frame`) and as Markdown, LaTeX and CSV; the files of
``compare --markdown/--latex/--csv/--figure`` (:func:`write_comparison`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.reporting.compare.records import (COCO_EXTRAS, EXTRAS, GROUP_BY, LAYOUTS, METRICS, REGULARISERS,
                                                    SIMILARITY_NAMES, Comparison)


_RECALL_HEADS = {"i2t_r1": "i2t R@1", "i2t_r5": "i2t R@5", "i2t_r10": "i2t R@10", "t2i_r1": "t2i R@1",
                 "t2i_r5": "t2i R@5", "t2i_r10": "t2i R@10", "rsum": "RSUM",
                 "log_var_image": "log Var. image", "log_var_text": "log Var. text"}
_COCO_HEADS = {"map_at_r": "mAP@R", "rprecision": "R-P", "r1": "R@1", "r5": "R@5", "r10": "R@10"}
_COCO_NAMES = {"eccv": "ECCV Caption", "cxc": "CxC"}
_COCO_PREFIX = {"eccv": "ECCV", "cxc": "CxC"}
COCO_RSUM_HEAD = "5K RSUM"
"""The RSUM column of the eccv and cxc layouts: the COCO 5K recalls' sum, not a sum of the columns beside it."""


def _cell(mean: float, std: float, n: int, decimals: int, pm: str) -> str:
    if math.isnan(mean):
        return ""
    if n < 2 or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f}{pm}{std:.{decimals}f}"


def check_display(layout: str = "recall", decimals: int = 1, group_by: str = "config") -> None:
    """Refuse a ``--layout``, ``--decimals`` or ``--group-by`` the table cannot take, before any input is read."""
    if layout not in LAYOUTS:
        raise MaxMatchError(f"unknown --layout '{layout}'", hint=f"use one of: {', '.join(LAYOUTS)}")
    if not 0 <= decimals <= 6:
        raise MaxMatchError(f"--decimals {decimals} is out of range", hint="use 0 to 6 (the paper shows 1)")
    if group_by not in GROUP_BY:
        raise MaxMatchError(f"unknown --group-by '{group_by}'", hint=f"use one of: {', '.join(GROUP_BY)}")


def display_frame(comp: Comparison, layout: str = "recall", decimals: int = 1,
                  latex: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The table as text cells (``layout`` of :data:`LAYOUTS`) and the names of its text (left-aligned) columns.

    ``latex``: cells and headers in LaTeX (``$\\pm$``, ``\\checkmark``); the text columns are left unescaped.
    """
    check_display(layout, decimals)
    f = comp.frame
    pm, dash, check = (r" $\pm$ ", "---", r"\checkmark") if latex else (" ± ", "—", "✓")
    delta_head = r"$\Delta$RSUM" if latex else "ΔRSUM"

    def stat(m: str) -> list[str]:
        return [_cell(a, s, n, decimals, pm) for a, s, n in zip(f[f"{m}_mean"], f[f"{m}_std"], f["n"])]

    deltas = [dash if label == comp.baseline else f"{d:+.{decimals}f}" for label, d in zip(f["label"], f["delta_rsum"])]
    out: dict[str, list[str]] = {}
    if layout == "table3":
        out["Similarity"] = [SIMILARITY_NAMES.get(s, s) or "?" for s in f["similarity"]]
        for head, weight in REGULARISERS:
            out[head] = ["?" if math.isnan(w) else check if w > 0 else "" for w in f[weight]]
        out["RSUM"] = stat("rsum")
        out[delta_head] = deltas
        out["n"] = [str(n) for n in f["n"]]
        return pd.DataFrame(out), ["Similarity"]
    if layout in COCO_EXTRAS:
        keys = COCO_EXTRAS[layout]
        lacking = [label for i, label in enumerate(f["label"])
                   if any(f"{k}_mean" not in f or math.isnan(f.loc[i, f"{k}_mean"]) for k in keys)]
        if lacking:
            raise MaxMatchError(f"--layout {layout}: {len(lacking)} row(s) have no {_COCO_NAMES[layout]} metrics "
                                f"(or NaN ones) "
                                f"({', '.join(repr(x) for x in lacking[:3])}{' ...' if len(lacking) > 3 else ''})",
                                hint=f"compare evaluation files of `maxmatch evaluate CKPT --split testall --protocol "
                                     f"{layout} --json F` (or ensemble), one per run")
        out[""] = list(f["label"])
        out["n"] = [str(n) for n in f["n"]]
        for k in keys:  # eccv_i2t_map_at_r -> "ECCV i2t mAP@R": never mistaken for the COCO 5K recalls
            direction, name = k.split("_", 2)[1:]
            out[f"{_COCO_PREFIX[layout]} {direction} {_COCO_HEADS[name]}"] = stat(k)
        out[COCO_RSUM_HEAD] = stat("rsum")
        out[delta_head] = deltas
        out["source"] = list(f["source"])
        return pd.DataFrame(out), ["", "source"]
    out[""] = list(f["label"])
    out["n"] = [str(n) for n in f["n"]]
    for m in METRICS:
        out[_RECALL_HEADS[m]] = stat(m)
    out[delta_head] = deltas
    for m in EXTRAS:
        if f"{m}_mean" in f:
            out[_RECALL_HEADS[m]] = stat(m)
    out["source"] = list(f["source"])
    return pd.DataFrame(out), ["", "source"]


def _caption(comp: Comparison, layout: str = "recall") -> str:
    note = (f"{_COCO_NAMES[layout]} metrics (%) of the eccv-caption package; {COCO_RSUM_HEAD}: sum of the COCO 5K "
            f"recalls; " if layout in COCO_EXTRAS else "")
    return (f"{note}mean ± sample std over the n runs of a row (n − 1); ΔRSUM against '{comp.baseline}'; "
            f"rows grouped by {comp.group_by}")


def to_markdown(comp: Comparison, layout: str = "recall", decimals: int = 1) -> str:
    """A GitHub Markdown table (text columns left-aligned, numbers right-aligned) and its caption line."""
    table, text_cols = display_frame(comp, layout, decimals)

    def cells(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(table.columns), "| " + " | ".join("---" if c in text_cols else "---:" for c in table.columns) + " |"]
    lines += [cells(row) for row in table.itertuples(index=False)]
    return "\n".join(lines) + f"\n\n{_caption(comp, layout)}\n"


def to_latex(comp: Comparison, layout: str = "recall", decimals: int = 1) -> str:
    """A booktabs ``tabular`` (pandas Styler.to_latex) with the text cells escaped for LaTeX."""
    table, text_cols = display_frame(comp, layout, decimals, latex=True)
    try:
        styler = table.style.hide(axis="index").format(escape="latex", subset=text_cols)
        body = styler.to_latex(hrules=True, column_format="".join("l" if c in text_cols else "r"
                                                                  for c in table.columns))
    except ImportError as exc:  # Styler needs jinja2 (torch brings it)
        raise MaxMatchError(f"LaTeX output needs jinja2 ({exc})", hint="pip install jinja2") from None
    needs = r"\usepackage{booktabs}" + (r" and \usepackage{amssymb} (\checkmark)" if layout == "table3" else "")
    return f"% maxmatch compare: {_caption(comp, layout)}\n% needs {needs}\n{body}"


def to_csv(comp: Comparison) -> str:
    """Every number of :attr:`Comparison.frame` (means, sample stds, ΔRSUM, loss weights), unrounded."""
    return comp.frame.to_csv(index=False)



def write_comparison(comp: Comparison, *, markdown: Path | None = None, latex: Path | None = None,
                     csv: Path | None = None, figure: Path | None = None, layout: str = "recall",
                     decimals: int = 1) -> list[Path]:
    """Write the requested files atomically (:func:`maxmatch_cli.fileio.write_text`); returns their paths.

    ``figure``: a file stem for the Recall@K bars (:func:`maxmatch_cli.reporting.plots.plot_recall_bars`), written as
    ``figure``.png and ``figure``.pdf; checked for matplotlib before any file is written.
    """
    from maxmatch_cli.fileio import write_text

    if figure is not None and not Path(figure).name:
        raise MaxMatchError(f"--figure {str(figure)!r} names no file", hint="give a file stem, e.g. --figure recall-bars")
    if figure is not None:
        from maxmatch_cli.reporting.plots import require_pyplot

        require_pyplot()
    files = []
    if markdown:
        files.append(write_text(markdown, to_markdown(comp, layout, decimals)))
    if latex:
        files.append(write_text(latex, to_latex(comp, layout, decimals)))
    if csv:
        files.append(write_text(csv, to_csv(comp)))
    if figure is not None:
        from maxmatch_cli.reporting.plots import plot_recall_bars

        files += plot_recall_bars(comp.frame, figure)
    return files
