"""analyze-collapse --compare with models of different set sizes K: a one-vector VSE++ model (K = 1) beside the
K = 4 MaxMatch model, and a K = 8 model beside it. Each model shows its own K elements on the page, in the
figure and the CSV; its distinct top-1 counts are out of its own K and equal a count from element_top1."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.evaluation.cache import checkpoint_embeddings
from maxmatch_cli.evaluation.element_retrieval import element_top1
from maxmatch_cli.features.store import open_store
from maxmatch_cli.models.checkpoint import load_checkpoint
from maxmatch_cli.reporting import plots

SIZES = {"k1": ["--set", "model.num_embeds=1", "--set", "model.set_head=pooled", "--set", "loss.similarity=mil",
                *(a for w in ("gd", "isd", "mmd", "div") for a in ("--set", f"loss.{w}_weight=0"))],
         "k8": ["--set", "model.num_embeds=8"]}


@pytest.fixture(scope="module")
def models(trained, tiny_h5, tiny_overrides, tmp_path_factory):
    """Checkpoint paths by name: k4 (the session's tiny model), k1 (VSE++-style pooled) and k8, 4 steps each."""
    folder = tmp_path_factory.mktemp("sizes")
    out = {"k4": shutil.copy(trained / "best.safetensors", folder / "k4.safetensors")}
    for name, extra in SIZES.items():
        result = CliRunner().invoke(app, ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set",
                                          "train.epochs=2", "--set", "train.max_steps=4", *tiny_overrides, *extra,
                                          "--out", str(folder / name)])
        assert result.exit_code == 0, result.output
        out[name] = shutil.copy(folder / name / "best.safetensors", folder / f"{name}.safetensors")
    return out


def _cells(example_html: str, model: int) -> list[str]:
    return re.findall(rf'<td data-model="{model}">(.*?)</td>', example_html)


@pytest.mark.parametrize("first, second", [("k4", "k1"), ("k8", "k4")])
def test_compare_shows_each_model_with_its_own_k(models, tiny_h5, tmp_path, first, second):
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["analyze-collapse", str(models[first]), "--split", "test", "--examples", "2",
                                      "--compare", str(models[second]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "collapse.json").read_text())["elements"]
    sizes = [records[0]["K"], records[1]["K"]]
    assert sizes == [int(first[1:]), int(second[1:])]
    text = " ".join(result.output.split())
    for k in sizes:
        assert f"distinct top-1 items per query of K = {k} (" in text
    if 1 in sizes:
        assert "of K = 1 (one vector per item: always 1)" in text

    # The page: every example has K_m item cells for model m (blank cells up to the larger K), its head says
    # "d distinct of K_m"; the summary has a K column.
    page = (out / "elements.html").read_text()
    examples = page.split('data-example="')[1:]
    assert len(examples) == 4
    for example in examples:
        assert example.count('<td class="k">') == max(sizes)
        for m, k in enumerate(sizes):
            cells = _cells(example, m)
            assert len(cells) == max(sizes) and sum('class="item' in c for c in cells) == k
            assert all('class="item' in c for c in cells[:k]) and not any(cells[k:])
            assert re.search(rf'<th data-model="{m}">[^<]*<br><span class="distinct">\d distinct of {k}<', example)
    summary = page[page.index('<table class="summary">'): page.index("</table>")]
    assert re.findall(r'<td class="K">(\d+)</td>', summary) == [str(k) for k in sizes]

    # The CSV: K_m rows per query for model m, k = 1..K_m, and model_K = K_m.
    rows = list(csv.DictReader((out / "element_retrieval.csv").open()))
    for r, k in zip(records, sizes):
        mine = [row for row in rows if row["model"] == r["checkpoint"]]
        assert len(mine) == 4 * k and {row["model_K"] for row in mine} == {str(k)}
        assert sorted({int(row["k"]) for row in mine}) == list(range(1, k + 1))

    # The figures: written, non-empty, readable.
    if plots.pyplot() is not None:
        for direction in ("i2t", "t2i"):
            png = out / f"elements_{direction}.png"
            assert png.stat().st_size > 1000
            with Image.open(png) as im:
                assert min(im.size) > 100

    # Distinct counts: a plain set count over element_top1's rows of each model's own embeddings.
    store = open_store(tiny_h5)
    for r, k in zip(records, sizes):
        emb = checkpoint_embeddings(load_checkpoint(r["checkpoint"]), store, "test", torch.device("cpu"),
                                    show_progress=False)
        assert emb.images.shape[1] == emb.captions.shape[1] == k
        i2t, _ = element_top1(emb.images, emb.captions)
        t2i, _ = element_top1(emb.captions, emb.images)
        per_image = [len(set(row)) for row in i2t.tolist()]
        per_caption = [len(set(row)) for row in t2i.tolist()]
        assert r["distinct"]["i2t"]["split"] == pytest.approx(sum(per_image) / len(per_image))
        assert r["distinct"]["t2i"]["split"] == pytest.approx(sum(per_caption) / len(per_caption))
        shown = [ex for ex in r["examples"] if ex["direction"] == "i2t"]
        picks = [ex["query"]["image"] for ex in shown]
        assert r["distinct"]["i2t"]["shown"] == pytest.approx(sum(per_image[p] for p in picks) / len(picks))
        for ex in shown:
            assert [e["item"] for e in ex["elements"]] == i2t[ex["query"]["image"]].tolist()
            assert ex["distinct"] == per_image[ex["query"]["image"]] <= k
        if k == 1:
            assert r["distinct"]["i2t"]["split"] == r["distinct"]["t2i"]["split"] == 1.0
