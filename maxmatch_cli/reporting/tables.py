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


def collapse_tables(report) -> list[Table]:
    """Tables for a :class:`maxmatch_cli.evaluation.collapse.CollapseReport`: circular variance, per-slot ablation
    (Table 4), the pair heatmaps (Figure 4) and per-element retrieval (§4.5)."""
    var = Table(title="Circular variance", title_justify="left",
                caption="lower = more collapsed; log(Var.) = log of the mean (Table 4)", caption_justify="left")
    for head in ("sets", "mean", "log(Var.)", "median", "min", "max"):
        var.add_column(head, justify="left" if head == "sets" else "right", style="bold" if head == "sets" else None)
    for name, v in report.variance.items():
        log_mean = "-inf" if v["log_mean"] is None else f"{v['log_mean']:.2f}"
        var.add_row(name, f"{v['mean']:.4f}", log_mean, f"{v['median']:.4f}", f"{v['min']:.4f}", f"{v['max']:.4f}")

    abl = Table(title=f"Per-slot ablation · {report.protocol} · {report.similarity}", title_justify="left",
                caption="only element k of one set, the other set whole (Table 4)", caption_justify="left")
    abl.add_column("elements", style="bold")
    for head in ("i2t R@1", "t2i R@1", "RSUM", "Δ RSUM"):
        abl.add_column(head, justify="right")
    full = report.ablation["full"]
    abl.add_row("all", f"{full['i2t_r1']:.2f}", f"{full['t2i_r1']:.2f}", f"[cyan]{full['rsum']:.2f}[/]", "")
    for side, symbol in (("image", "S^V"), ("text", "S^T")):
        for r in report.ablation[side]:
            abl.add_row(f"{symbol}({r['slot']}) only", f"{r['i2t_r1']:.2f}", f"{r['t2i_r1']:.2f}", f"{r['rsum']:.2f}",
                        f"{r['rsum'] - full['rsum']:+.2f}")

    tables = [var, abl]
    for name, caption in (("raw", "stored order"), ("aligned", "columns reordered by the MaxMatch assignment")):
        m = report.heatmaps[name]
        c = report.contrast[name]
        t = Table(title=f"Pair heatmap · {name}", title_justify="left", caption_justify="left",
                  caption=f"mean cosine, image set vs its own captions, {caption}; "
                          f"diagonal {c['diagonal']:.3f}, off-diagonal {c['off_diagonal']:.3f}")
        t.add_column("", style="bold")
        for col in range(len(m[0])):
            t.add_column(f"T{col + 1}", justify="right")
        for k, row in enumerate(m):
            t.add_row(f"V{k + 1}", *(f"{v:.3f}" for v in row))
        tables.append(t)

    ret = Table(title="Per-element retrieval", title_justify="left", caption_justify="left",
                caption="each query element alone vs the best-matched element of each gallery set (§4.5)")
    ret.add_column("direction", style="bold")
    for k in range(report.K):
        ret.add_column(f"R@1 e{k + 1}", justify="right")
    ret.add_column("R@1 any", justify="right")
    ret.add_column(f"distinct top-1 (of {report.K})", justify="right", style="cyan")
    for direction, label in (("i2t", "image → text"), ("t2i", "text → image")):
        r = report.retrieval[direction]
        distinct = f"{r['distinct']:.2f}"
        if "distinct_images" in r:
            distinct += f" ({r['distinct_images']:.2f} images)"
        ret.add_row(label, *(f"{v:.2f}" for v in r["r1"]), f"{r['r1_any']:.2f}", distinct)
    tables.append(ret)
    return tables
