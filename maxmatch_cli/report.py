"""Rich tables for results, laid out like the paper's (i2t R@1/5/10, t2i R@1/5/10, RSUM)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.table import Table

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def recall_table(rows: Sequence[tuple[str, Mapping[str, float]]], title: str = "Recall@K (%)") -> Table:
    """One row per (label, metrics) pair; the best RSUM is bold when there are several rows."""
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for head in ("i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10"):
        table.add_column(head, justify="right")
    table.add_column("RSUM", justify="right", style="cyan")
    table.add_column("medr i2t/t2i", justify="right", style="dim")
    best = max((m["rsum"] for _, m in rows), default=None)
    for label, m in rows:
        rsum = f"{m['rsum']:.2f}"
        if len(rows) > 1 and m["rsum"] == best:
            rsum = f"[bold]{rsum}[/]"
        table.add_row(label, *(f"{m[k]:.2f}" for k in RECALL_KEYS), rsum,
                      f"{m.get('i2t_medr', float('nan')):.0f}/{m.get('t2i_medr', float('nan')):.0f}")
    return table


def key_value_table(values: Mapping[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in values.items():
        table.add_row(str(k), str(v))
    return table
