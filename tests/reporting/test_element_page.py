"""The per-element retrieval page, figure and CSV (Figures 5–7 of analyze-collapse), from hand-built records."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from maxmatch_cli.evaluation.element_retrieval import SplitItems, element_retrieval
from maxmatch_cli.reporting import plots
from maxmatch_cli.reporting.collapse import element_csv
from maxmatch_cli.reporting.element_figure import element_figure
from maxmatch_cli.reporting.element_page import element_page


@pytest.fixture
def records(tmp_path):
    """Two models on 4 images (one caption each): a collapsed one and one whose elements point apart; images 0-2
    have files, image 3 none; one caption holds HTML that must be shown as text."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    items = SplitItems([10, 11, 12, 13], ["a red <b>bench</b>", "a dog & a cat", "a vase", "a cake"],
                       files + [None], 1)
    eye = torch.eye(6)
    spread = eye[:4].expand(4, 4, 6).clone()
    captions = torch.stack([eye[j].expand(4, 6) for j in range(4)])
    collapsed = eye[0].expand(4, 4, 6).clone()
    out = []
    for name, images in (("m/maxmatch.safetensors", spread), ("c/chamfer.safetensors", collapsed)):
        out.append(element_retrieval(images, captions, items, [0, 3], name, trained_with=name[2:-12]).to_json())
    return out


def test_page_is_self_contained_and_shows_every_example(records):
    page = element_page(records, "What each set element retrieves", "split test")
    # Offline: no script, no external URL, no link; thumbnails are data: URIs.
    assert "<script" not in page and "<link" not in page and not re.search(r"(src|href)=\"(?!data:)", page)
    assert "http" not in page.replace('xmlns="http', "")
    examples = re.findall(r'data-example="([^"]+)"', page)
    assert examples == ["i2t-0", "i2t-3", "t2i-0", "t2i-3"]
    # Every example has both models' columns and K rows; the labels name each model and its training similarity.
    assert page.count('<th data-model="0">') == page.count('<th data-model="1">') == 4
    assert page.count('<td class="k">') == 4 * 4
    assert "m/maxmatch.safetensors (maxmatch)" in page and "c/chamfer.safetensors (chamfer)" in page
    # Captions are text, not markup; an image without a file shows its id.
    assert "a red &lt;b&gt;bench&lt;/b&gt;" in page and "<b>bench" not in page and "a dog &amp; a cat" in page
    i2t_3 = page[page.index('data-example="i2t-3"'):page.index('data-example="t2i-0"')]
    assert "query: image 13" in i2t_3 and "<img" not in i2t_3.split("<table")[0]  # no file: no thumbnail
    records[1]["examples"][-1]["elements"][0]["image_file"] = None  # t2i-3, chamfer, k = 1: image 10, file gone
    page = element_page(records, "t")
    assert page.count('<div class="noimg">image<br>10</div>') == 1
    # Collapse is visible: a collapsed set repeats element 1's item three times: the collapsed model's 4 queries
    # and the text queries of the other (its caption sets are K copies too).
    assert page.count("same as k=1") == (4 + 2) * 3
    assert "1 distinct of 4" in page and "4 distinct of 4" in page


def test_thumbnails_are_the_image_files(records):
    page = element_page(records, "t", thumb_size=32)
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris  # the query image 0 (i2t) and the retrieved images with files (t2i)
    for uri in uris:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as im:
            # 60 x 40 files: items at most 32 px, queries at most 64 (never enlarged), aspect kept
            assert max(im.size) in (32, 60) and im.size[0] > im.size[1]


def test_summary_holds_both_models_distinct_counts(records):
    page = element_page(records, "t")
    summary = page[page.index('<table class="summary">'): page.index("</table>")]
    rows = re.findall(r'<tr><td>([^<]+)</td><td class="K">(\d+)</td>((?:<td>[^<]+</td>){4})</tr>', summary)
    values = {name: [float(v) for v in re.findall(r"<td>([^<]+)</td>", cells)] for name, _, cells in rows}
    assert values["m/maxmatch.safetensors (maxmatch)"][:2] == [4.0, 4.0]
    assert values["c/chamfer.safetensors (chamfer)"][:2] == [1.0, 1.0]
    assert [k for _, k, _ in rows] == ["4", "4"]


def test_csv_has_a_row_per_model_query_and_element(records):
    lines = element_csv(records).splitlines()
    assert lines[0].startswith("model,direction,query_image_id")
    assert len(lines) == 1 + 2 * 4 * 4  # 2 models x (2 queries x 2 directions) x K = 4
    first = lines[1].split(",")
    assert first[:2] == ["m/maxmatch.safetensors", "i2t"] and first[4:6] == ["1", "0"] and first[8] == "true"
    assert lines[0].endswith(",model_K") and {line.split(",")[-1] for line in lines[1:]} == {"4"}


@pytest.mark.skipif(plots.pyplot() is None, reason="matplotlib is not installed")
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_figure_has_a_row_per_element_and_a_column_per_model(records, direction, tmp_path):
    fig = element_figure(records, direction, "title")
    # 2 queries x (query + 4 label cells + 4 x 2 model cells), plus the thumbnails' inset axes.
    main = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert len(main) == 2 * (1 + 4 + 4 * 2)
    titles = [ax.get_title() for ax in main if ax.get_title() and "distinct" in ax.get_title()]
    shown = {"i2t": ["4.00", "1.00"], "t2i": ["1.00", "1.00"]}[direction]  # caption sets are K copies
    assert [t.split("\n")[0] for t in titles] == ["m/maxmatch.safetensors (maxmatch)",
                                                  "c/chamfer.safetensors (chamfer)"]
    assert [t.split("per query: ")[1].split(" ")[0] for t in titles] == shown
    assert all(t.endswith("over the split, of K = 4") for t in titles)
    images = [im for ax in fig.axes for sub in (ax, *ax.child_axes) for im in sub.get_images()]
    # Files known: i2t, query image 0; t2i, image 0, the top item (first among ties) of all 4 caption elements of
    # both queries under both models.
    assert len(images) == (1 if direction == "i2t" else 2 * 4 * 2)
    assert all(im.get_array().shape == (40, 60, 3) for im in images)
    assert plots.save_figure(fig, tmp_path / "f") == ["f.png", "f.pdf"]
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_models_of_different_set_sizes_leave_blank_cells(records):
    small = json_copy(records[1])
    small["K"] = 2
    for example in small["examples"]:
        example["elements"] = example["elements"][:2]
    page = element_page([records[0], small], "t")
    assert page.count('<td class="k">') == 4 * 4 and page.count('<td data-model="1"></td>') == 4 * 2
    assert page.count("1 distinct of 2") == 4  # the collapsed model, cut to K = 2: one item per query
    assert re.findall(r'<td class="K">(\d+)</td>', page) == ["4", "2"] and "column K: 4 vs 2" in page
    csv_k = [line.split(",")[-1] for line in element_csv([records[0], small]).splitlines()[1:]]
    assert csv_k == ["4"] * (4 * 4) + ["2"] * (4 * 2)
    if plots.pyplot() is not None:
        fig = element_figure([records[0], small], "i2t")
        main = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
        assert len(main) == 2 * (1 + 4 + 4 + 2)


def json_copy(record):
    import json

    return json.loads(json.dumps(record))
