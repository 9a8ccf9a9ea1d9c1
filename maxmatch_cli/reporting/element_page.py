"""A self-contained HTML page of the per-element retrieval examples (``elements.html`` of analyze-collapse).

One file, readable offline: no script, no external style sheet, font or image; thumbnails are embedded as
``data:`` URIs. For each shown query (both directions) a table: the query element's index k on the left, then for
each model (the analysed checkpoint, and the ``--compare`` one beside it) the item element k retrieved, its
score, a tick when it belongs to the query's own pair and ``same as k'`` when an earlier element retrieved it
already. Built from the plain records of :func:`maxmatch_cli.evaluation.element_retrieval.element_retrieval`.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any, Sequence

from maxmatch_cli.reporting.element_figure import fmt_mean, load_thumbnail, model_label

__all__ = ["element_page", "element_rows"]

_STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #212121; background: #fafafa; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
p.meta { color: #616161; margin-top: 0; } p.legend { margin-top: 0.6em; font-size: 13px; }
table { border-collapse: collapse; }
table.summary td, table.summary th { border: 1px solid #e0e0e0; padding: 4px 10px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
.example { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; margin: 0.8em 0; padding: 0.7em;
           display: flex; gap: 1em; align-items: flex-start; }
.query { width: 190px; flex: none; }
.query .label { font-size: 12px; color: #616161; }
.query img, .item img { display: block; border-radius: 3px; }
table.elements { width: 100%; table-layout: fixed; }
table.elements th { text-align: left; font-size: 12px; color: #424242; padding: 2px 6px; }
table.elements th.k, table.elements td.k { width: 2.2em; text-align: center; font-weight: bold; }
table.elements td { border-top: 1px solid #eeeeee; padding: 4px 6px; vertical-align: middle; }
.item { display: flex; gap: 8px; align-items: center; border-left: 4px solid #bdbdbd; padding-left: 6px; }
.item.correct { border-left-color: #2e7d32; } .item.repeat { border-left-color: #c62828; background: #fff5f5; }
.score { font-size: 12px; color: #616161; white-space: nowrap; }
.tick { color: #2e7d32; font-weight: bold; } .same { color: #c62828; font-weight: bold; }
.noimg { width: 64px; height: 64px; background: #eeeeee; border: 1px solid #bdbdbd; font-size: 11px;
         display: flex; align-items: center; justify-content: center; text-align: center; flex: none; }
.distinct { font-size: 12px; color: #424242; font-weight: normal; }
.described { font-size: 12px; font-style: italic; color: #424242; margin-top: 0.3em; }
"""


class _Thumbs:
    """data: URIs of thumbnails, each file encoded once."""

    def __init__(self, size: int):
        self.size, self.cache = size, {}

    def html(self, path: str | None, image_id: Any, query: bool = False) -> str:
        key = (path, 2 * self.size if query else self.size)
        if key not in self.cache:
            thumb = load_thumbnail(*key)
            uri = None
            if thumb is not None:
                buf = io.BytesIO()
                thumb.save(buf, format="JPEG", quality=85)
                uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            self.cache[key] = uri
        uri = self.cache[key]
        if uri is None:
            return "" if query else f'<div class="noimg">image<br>{escape(str(image_id))}</div>'
        width = ' style="max-width: 180px; width: 100%"' if query else ""
        return f'<img src="{uri}" alt="image {escape(str(image_id))}"{width}>'


def _item(element: dict[str, Any], direction: str, thumbs: _Thumbs) -> str:
    kind = "repeat" if element.get("same_as") else "correct" if element["correct"] else "other"
    tick = ' <span class="tick" title="belongs to the query\'s own pair">✓</span>' if element["correct"] else ""
    same = f' <span class="same">same as k={element["same_as"]}</span>' if element.get("same_as") else ""
    score = f'<span class="score">s={element["score"]:.3f}{tick}{same}</span>'
    if direction == "i2t":
        body = f'<div>{escape(element["text"])}<br>{score}</div>'
    else:
        described = (f' <span class="described">its first caption: “{escape(element["described_as"])}”</span>'
                     if element.get("described_as") else "")
        body = (thumbs.html(element.get("image_file"), element["image_id"])
                + f'<div>image {escape(str(element["image_id"]))}{described}<br>{score}</div>')
    return f'<div class="item {kind}">{body}</div>'


def _query(query: dict[str, Any], direction: str, thumbs: _Thumbs) -> str:
    if direction == "i2t":
        described = (f'<div class="described">its first caption: “{escape(query["described_as"])}”</div>'
                     if query.get("described_as") else "")
        return (f'<div class="query">{thumbs.html(query.get("image_file"), query["image_id"], query=True)}'
                f'<div class="label">query: image {escape(str(query["image_id"]))}</div>{described}</div>')
    return (f'<div class="query">“{escape(query["text"])}”'
            f'<div class="label">caption {query["caption"]} (of image {escape(str(query["image_id"]))})</div></div>')


def _example(columns: Sequence[dict[str, Any]], labels: Sequence[str], thumbs: _Thumbs) -> str:
    first = columns[0]
    direction = first["direction"]
    head = "".join(f'<th data-model="{m}">{escape(label)}<br><span class="distinct">{c["distinct"]} distinct '
                   f'of {len(c["elements"])}</span></th>' for m, (label, c) in enumerate(zip(labels, columns)))
    rows = []
    for row in range(max(len(c["elements"]) for c in columns)):  # models of different K: blank cells
        cells = "".join(f'<td data-model="{m}">'
                        + (_item(c["elements"][row], direction, thumbs) if row < len(c["elements"]) else "")
                        + "</td>" for m, c in enumerate(columns))
        rows.append(f'<tr><td class="k">{row + 1}</td>{cells}</tr>')
    ident = f'{direction}-{first["query"]["image"]}'
    return (f'<div class="example" id="{ident}" data-example="{ident}">{_query(first["query"], direction, thumbs)}'
            f'<table class="elements"><thead><tr><th class="k">k</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _summary(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Per model: its set size K and its mean distinct top-1 items (of K), both directions, shown and split."""
    rows = []
    for label, r in zip(labels, records):
        d = r["distinct"]
        values = (d[direction][where] for direction in ("i2t", "t2i") for where in ("shown", "split"))
        rows.append(f'<tr><td>{escape(label)}</td><td class="K">{r["K"]}</td>'
                    + "".join(f"<td>{fmt_mean(v)}</td>" for v in values) + "</tr>")
    return ('<table class="summary"><thead><tr><th rowspan="2">model</th><th rowspan="2">K</th>'
            '<th colspan="2">image → caption</th><th colspan="2">caption → image</th></tr><tr><th>shown</th>'
            f'<th>split</th><th>shown</th><th>split</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _intro(records: Sequence[dict[str, Any]]) -> str:
    """What a row and the summary's numbers mean; K named once when every model has the same."""
    sizes = sorted({r["K"] for r in records})
    k = str(sizes[0]) if len(sizes) == 1 else "K"
    mixed = ("" if len(sizes) == 1 else " Each model shows its own K elements (K is its set size, column K: "
             + " vs ".join(str(r["K"]) for r in records) + "); rows beyond a model's K are left empty.")
    one = (" A model with K = 1 (one vector per item) retrieves one item per query: its 1 is not collapse."
           if 1 in sizes else "")
    return (f'<p>Each row k: the item that query element k alone retrieves ({escape(records[0]["reading"])}). '
            f'Mean number of distinct items among a query\'s {k} top-1 items (1 = collapsed, {k} = every element '
            f'retrieves another item).{mixed}{one}</p>')


def element_page(records: Sequence[dict[str, Any]], title: str, subtitle: str = "", thumb_size: int = 96) -> str:
    """The HTML page: a summary of distinct top-1 items per model, then every example, both directions.

    Args:
        records: one per model (the analysed checkpoint first); their examples must be the same queries.
        title: the page's heading.
        subtitle: a line under it (checkpoint, split, ...).
        thumb_size: longer side of the embedded thumbnails, in pixels.

    Returns:
        The page, one self-contained HTML document.
    """
    labels = [model_label(r) for r in records]
    thumbs = _Thumbs(thumb_size)
    parts = [f"<h1>{escape(title)}</h1>", f'<p class="meta">{escape(subtitle)}</p>' if subtitle else "",
             _intro(records), _summary(records, labels),
             '<p class="meta legend">s = the element\'s score for the item; <span class="tick">✓</span> and a green bar: the '
             'item belongs to the query\'s own pair; <span class="same">same as k=j</span> and a red bar: element j '
             'already retrieved this item (collapse).</p>']
    for direction, heading in (("i2t", "Image → caption: each image element's top caption"),
                               ("t2i", "Caption → image: each caption element's top image")):
        parts.append(f'<section id="{direction}"><h2>{heading}</h2>')
        for columns in element_rows(records, direction):
            parts.append(_example(columns, labels, thumbs))
        parts.append("</section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body>\n' + "\n".join(p for p in parts if p) + "\n</body></html>\n")


def element_rows(records: Sequence[dict[str, Any]], direction: str) -> list[list[dict[str, Any]]]:
    """The examples of one direction as rows of one record per model (same query across a row)."""
    columns = [[e for e in r["examples"] if e["direction"] == direction] for r in records]
    return [list(row) for row in zip(*columns)]
