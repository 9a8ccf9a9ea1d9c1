"""The per-element retrieval figure (paper Figures 5–7) of ``maxmatch analyze-collapse``, one per direction.

Each shown query takes K rows (the largest K of the models shown; a model of smaller K leaves its rows below
its own K empty): the query on the left (thumbnail or caption), the query element's index k next
to it, then for each model the item element k retrieved: a thumbnail where the feature file knows the image
file (else a box with the image id), or the caption's text; with its score s_k, a tick when it belongs to the
query's own pair and ``= k'`` when an earlier element already retrieved it (collapse). Drawn from the plain
records of :func:`maxmatch_cli.evaluation.element_retrieval.element_retrieval` (``to_json``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from maxmatch_cli.reporting import plots

__all__ = ["element_figure", "fmt_mean", "load_thumbnail", "model_label"]

_ROW_INCHES = 0.62
_CORRECT, _REPEAT, _OTHER = "#2e7d32", "#c62828", "#9e9e9e"


def fmt_mean(value: float | None) -> str:
    """A distinct-item mean with two decimals; an em dash when there is none (no query shown)."""
    return "—" if value is None else f"{value:.2f}"


def model_label(record: dict[str, Any]) -> str:
    """``run/best.safetensors (maxmatch)``: the checkpoint's folder and name, and what it was trained with."""
    ckpt = Path(record["checkpoint"])
    trained = f" ({record['trained_with']})" if record.get("trained_with") else ""
    return f"{ckpt.parent.name}/{ckpt.name}{trained}"


def load_thumbnail(path: str | None, size: int = 160):
    """The image file as an RGB PIL image at most ``size`` pixels on its longer side, or None when it is missing
    or unreadable (the figure and the page then show the id)."""
    if not path:
        return None
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return im.copy()
    except (OSError, ValueError):
        return None


def _marks(element: dict[str, Any]) -> str:
    mark = "  ✓" if element["correct"] else ""
    same = f"  = k{element['same_as']}" if element.get("same_as") else ""
    return f"s={element['score']:.3f}{mark}{same}"


def _described(element: dict[str, Any]) -> str:
    """An image item's label: its id, its first caption (what the image shows), its score and marks."""
    text = f"image {element['image_id']}"
    if element.get("described_as"):
        text += ": “" + textwrap.shorten(element["described_as"], 100, placeholder=" …") + "”"
    return textwrap.fill(text, 50) + "\n" + _marks(element)


def _colour(element: dict[str, Any]) -> str:
    return _REPEAT if element.get("same_as") else _CORRECT if element["correct"] else _OTHER


def _frame(ax, colour: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(1.2)


def _image_cell(ax, image_id: Any, path: str | None, caption: str, colour: str) -> None:
    """A thumbnail (or a grey box naming the image) on the left of the cell, ``caption`` beside it."""
    _frame(ax, colour)
    thumb = load_thumbnail(path)
    inner = ax.inset_axes((0.01, 0.05, 0.3, 0.9))
    inner.set_axis_off()
    if thumb is not None:
        inner.imshow(np.asarray(thumb), aspect="equal")
        inner.set_anchor("W")
    else:
        from matplotlib.patches import Rectangle

        inner.add_patch(Rectangle((0, 0), 1, 1, facecolor="#eeeeee", edgecolor="#bdbdbd"))
        inner.text(0.5, 0.5, f"image\n{image_id}", ha="center", va="center", fontsize=6.5)
    ax.text(0.34, 0.5, caption, ha="left", va="center", fontsize=6.5, transform=ax.transAxes)


def _text_cell(ax, text: str, caption: str, colour: str, width: int) -> None:
    _frame(ax, colour)
    wrapped = textwrap.shorten(text, width * 2, placeholder=" …")
    ax.text(0.02, 0.62, textwrap.fill(wrapped, width), ha="left", va="center", fontsize=6.5,
            transform=ax.transAxes)
    ax.text(0.02, 0.14, caption, ha="left", va="center", fontsize=6, color=colour, transform=ax.transAxes)


def _query_cell(ax, query: dict[str, Any], direction: str) -> None:
    """The query: its image (thumbnail when the file is known) and id, or the caption's text."""
    _frame(ax, "#424242")
    if direction == "t2i":
        text, label, thumb = f"“{query['text']}”", f"caption of image {query['image_id']}", None
    else:
        thumb = load_thumbnail(query.get("image_file"), 320)
        if thumb is not None:
            inner = ax.inset_axes((0.04, 0.4, 0.92, 0.56))
            inner.set_axis_off()
            inner.set_anchor("NW")
            inner.imshow(np.asarray(thumb), aspect="equal")
        text = f"its first caption: “{query['described_as']}”" if query.get("described_as") else ""
        label = f"query: image {query['image_id']}"
    top = 0.33 if direction == "i2t" and thumb is not None else 0.9
    ax.text(0.05, top if direction == "i2t" else 0.6, textwrap.fill(textwrap.shorten(text, 160, placeholder=" …"),
            30), ha="left", va="top" if direction == "i2t" else "center", fontsize=6.5, transform=ax.transAxes,
            style="italic" if direction == "i2t" else "normal")
    ax.text(0.05, 0.04, label, ha="left", va="bottom", fontsize=7, weight="bold", transform=ax.transAxes)


def _column_title(record: dict[str, Any], direction: str) -> str:
    """A model's column head: its label, then its distinct top-1 means out of its own K."""
    d = record["distinct"][direction]
    return (f"{model_label(record)}\ndistinct top-1 per query: {fmt_mean(d['shown'])} shown, "
            f"{fmt_mean(d['split'])} over the split, of K = {record['K']}")


def element_figure(records: Sequence[dict[str, Any]], direction: str, title: str = ""):
    """Figure 5 (t2i: each caption element's top image) or Figure 6 (i2t: each image element's top caption).

    Args:
        records: one model's per-element retrieval record per column (the analysed checkpoint first). Models
            may differ in K: each column shows its own K elements, rows beyond a model's K stay empty.
        direction: ``"i2t"`` or ``"t2i"``.
        title: the figure's title.

    Returns:
        A matplotlib figure (save it with :func:`maxmatch_cli.reporting.plots.save_figure`).
    """
    plt = plots.require_pyplot()
    columns = [[e for e in r["examples"] if e["direction"] == direction] for r in records]
    k = max(r["K"] for r in records)  # models of different K: blank cells below the smaller sets
    n = len(columns[0])
    fig = plt.figure(figsize=(2.6 + 4.2 * len(records), 0.9 + _ROW_INCHES * max(1, n * k)))
    grid = fig.add_gridspec(max(1, n * k), 2 + len(records), width_ratios=[2.4, 0.25] + [4.2] * len(records),
                            hspace=0.12, wspace=0.04, left=0.02, right=0.99, top=1 - 0.75 / fig.get_figheight(),
                            bottom=0.01)
    for e in range(n):
        _query_cell(fig.add_subplot(grid[e * k: (e + 1) * k, 0]), columns[0][e]["query"], direction)
        for row in range(k):
            label = fig.add_subplot(grid[e * k + row, 1])
            label.set_axis_off()
            label.text(0.5, 0.5, f"{row + 1}", ha="center", va="center", fontsize=8, weight="bold")
            for m, examples in enumerate(columns):
                if row >= len(examples[e]["elements"]):
                    continue
                ax = fig.add_subplot(grid[e * k + row, 2 + m])
                element = examples[e]["elements"][row]
                if direction == "i2t":
                    _text_cell(ax, element["text"], _marks(element), _colour(element), 70)
                else:
                    _image_cell(ax, element["image_id"], element.get("image_file"),
                                _described(element), _colour(element))
                if e == 0 and row == 0:
                    ax.set_title(_column_title(records[m], direction), fontsize=7.5)
    what = "each image element's top caption" if direction == "i2t" else "each caption element's top image"
    fig.suptitle(title or f"What each set element retrieves: {what}", fontsize=9)
    return fig
