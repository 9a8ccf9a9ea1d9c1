"""elements.html in a real headless browser (Debian's Chromium driven by playwright): what a person would see.

analyze-collapse runs on the tiny checkpoint with a second checkpoint beside it (--compare), on a copy of the
tiny feature file whose image ids are paths of small PNG files (as ``extract-features images`` stores them), so
the page embeds real thumbnails. Skipped, with the reason, only where /usr/bin/chromium is missing (``.ci/run``
installs it; playwright comes with the ``test`` extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                              "(apt-get install chromium; .ci/run installs it)")


def _store_with_image_files(tiny_h5: Path, folder: Path) -> Path:
    """A copy of the tiny feature file whose ids are 'img/NN.png', with those PNGs under ``folder``."""
    copy = shutil.copy(tiny_h5, folder / "with_files.h5")
    with h5py.File(copy, "r+") as f:
        n = len(f["images/ids"])
        del f["images/ids"]
        f["images/ids"] = np.array([f"img/{i:02d}.png" for i in range(n)], dtype=h5py.string_dtype())
    (folder / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.full((48, 64, 3), 40, dtype=np.uint8)
        pixels[..., i % 3] = 120 + rng.integers(0, 120)
        pixels[8:40, 8 + i % 24: 32 + i % 24] = 230  # a light square that moves with the image
        Image.fromarray(pixels).save(folder / "img" / f"{i:02d}.png")
    return Path(copy)


@pytest.fixture(scope="module")
def page(trained, tiny_h5, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    a = shutil.copy(trained / "best.safetensors", folder / "a.safetensors")
    b = shutil.copy(trained / "last.safetensors", folder / "b.safetensors")
    data = _store_with_image_files(tiny_h5, folder)
    out = folder / "collapse"
    result = CliRunner().invoke(app, ["analyze-collapse", str(a), "--split", "test", "--data", str(data),
                                      "--images", str(folder), "--compare", str(b), "--examples", "3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "elements.html" in result.output and "distinct top-1 items per query" in result.output
    return out


@pytest.mark.filterwarnings("ignore:.*no valid recorded content hash")
def test_page_shows_every_example_with_loaded_images_and_no_errors(page, tmp_path):
    from playwright import sync_api  # the `test` extra: not skipped when missing, since CI must run this test
    records = json.loads((page / "collapse.json").read_text())["elements"]
    expected = [f"{e['direction']}-{e['query']['image']}" for e in records[0]["examples"]]
    assert len(expected) == 6 and len(records) == 2
    problems, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            view = browser.new_page(viewport={"width": 1200, "height": 900})
            view.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            view.on("pageerror", lambda e: problems.append(str(e)))
            view.on("request", lambda r: requests.append(r.url))
            view.goto((page / "elements.html").as_uri())
            view.wait_for_load_state("load")
            shown = view.eval_on_selector_all("[data-example]", "els => els.map(e => e.dataset.example)")
            visible = [view.locator(f'[data-example="{e}"]').is_visible() for e in expected]
            images = view.eval_on_selector_all("img", "els => els.map(i => [i.complete, i.naturalWidth])")
            columns = [view.locator(f'th[data-model="{m}"]').count() for m in (0, 1)]
            cells = [view.locator(f'td[data-model="{m}"]').count() for m in (0, 1)]
            headers = view.eval_on_selector_all('th[data-model="1"]', "els => els.map(e => e.innerText)")
            view.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert shown == expected and all(visible)
    # Every query image (i2t) and every retrieved image (t2i) has a file here: all embedded, all decoded.
    k = records[0]["K"]
    assert len(images) == 3 + 3 * k * 2 and all(done and width > 0 for done, width in images), images
    assert columns == [6, 6] and cells == [6 * k, 6 * k]
    assert all("b.safetensors" in h for h in headers)
    assert not problems, problems
    # Offline: the page itself is the only thing fetched (thumbnails are data: URIs).
    assert [u for u in requests if not u.startswith("data:")] == [(page / "elements.html").as_uri()]
    assert (tmp_path / "page.png").stat().st_size > 10_000
