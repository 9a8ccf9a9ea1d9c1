"""A :class:`Comparison` as a rich table for the terminal (:func:`rich_table`)."""

from __future__ import annotations

from maxmatch_cli.reporting.compare.formats import (_COCO_NAMES, _COCO_PREFIX, COCO_RSUM_HEAD, _caption,
                                                    display_frame)
from maxmatch_cli.reporting.compare.records import COCO_EXTRAS, Comparison


def rich_table(comp: Comparison, layout: str = "recall", decimals: int = 1, width: int | None = None):
    """The table for the terminal; the best RSUM is bold when there are several rows. With collapse columns
    (``log Var.``) the recalls and the collapse figures are two tables sharing the row labels; a table wider than
    ``width`` (the console's) puts each ``± std`` under its mean, so that nothing is cropped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table, text_cols = display_frame(comp, layout, decimals)
    caption = _caption(comp, layout)  # the source column stays: which split (and protocol) each number is on
    short = {"i2t R@5": "R@5", "i2t R@10": "R@10", "t2i R@5": "R@5", "t2i R@10": "R@10"}  # as recall_table
    if layout in COCO_EXTRAS:  # the title names the family: "CxC i2t R@5" -> "R@5", "ECCV t2i R-P" -> "R-P"
        for col in table.columns:
            if col.startswith(_COCO_PREFIX[layout] + " "):
                head = col.split(" ", 1)[1]
                short[col] = short.get(head, head if head.endswith(("mAP@R", "R@1")) else head.split(" ", 1)[1])
    best = comp.frame["rsum_mean"].idxmax()
    extras = [c for c in table.columns if c.startswith("log Var.")]
    title = f"Comparison · {_COCO_NAMES[layout]}" if layout in COCO_EXTRAS else "Comparison"
    parts = [(title, [c for c in table.columns if c not in extras], None)]
    if extras:
        parts = [("Comparison · Recall@K (%)", parts[0][1], None),
                 ("Comparison · collapse", [c for c in ("", "n") if c in table] + extras, caption)]
    else:
        parts = [(parts[0][0], parts[0][1], caption)]

    def build(title: str, columns: list[str], note: str | None) -> Table:
        one_line = 1 + sum(3 + max([len(short.get(c, c))] + [len(str(v)) for v in table[c]]) for c in columns)
        stacked = width is not None and one_line > width
        out = Table(title=title, title_justify="left", caption=note, caption_justify="left")
        for col in columns:  # labels wrap between overrides, never cut inside one
            longest = max((len(word) for cell in table[col] for word in str(cell).split()), default=0)
            out.add_column(short.get(col, col), justify="left" if col in text_cols else "right", overflow="fold",
                           min_width=min(longest, 40) if col in text_cols else None,
                           style="bold" if col == "" else "cyan" if col in ("RSUM", COCO_RSUM_HEAD) else None)
        for i, row in enumerate(table[columns].itertuples(index=False)):
            out.add_row(*(Text(str(v).replace(" ± ", "\n± ") if stacked and col not in text_cols else str(v),
                               style="bold" if len(table) > 1 and i == best and col in ("RSUM", COCO_RSUM_HEAD)
                               else "")
                          for col, v in zip(columns, row)))
        return out

    tables = [build(*part) for part in parts]
    return tables[0] if len(tables) == 1 else Group(*tables)
