"""The Python API (maxmatch_cli.load -> Model) against the evaluation path and a full-matrix reference."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import maxmatch_cli
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.encoding import encode_split
from maxmatch_cli.features.store import open_store
from maxmatch_cli.method.similarity import set_similarity

# The fixtures tiny_h5 and trained (a run folder trained for a few steps) live in conftest.py.


@pytest.fixture(scope="module")
def model(trained):
    return maxmatch_cli.load(trained / "best.safetensors", device="cpu")


@pytest.fixture(scope="module")
def test_split(model, tiny_h5):
    """The test split encoded by the evaluation path: (store, Embeddings)."""
    store = open_store(tiny_h5)
    recipe = model.recipe
    emb = encode_split(model.network, store, "test", model.tokenizer, recipe.data.captions_per_image, model.device,
                       batch_size=recipe.eval.batch_size, max_len=recipe.data.max_caption_len, show_progress=False)
    return store, emb


def test_load_rebuilds_the_checkpoint_model(model, trained):
    assert not model.network.training
    assert model.checkpoint == trained / "best.safetensors"
    assert model.similarity == "maxmatch"  # the demo recipe trains and evaluates with MaxMatch
    # A run folder resolves to its best checkpoint, as for `maxmatch evaluate`.
    assert maxmatch_cli.load(trained, device="cpu").checkpoint == trained / "best.safetensors"


def test_encode_texts_equals_evaluation_path(model, test_split):
    store, emb = test_split
    sets = model.encode_texts(store.captions_text(emb.caption_indices))
    assert sets.dtype == torch.float32 and sets.shape == (len(emb.caption_indices), model.num_embeds, model.embed_dim)
    torch.testing.assert_close(sets, emb.captions, rtol=0, atol=0)
    # Other batch sizes pad differently; masking keeps the sets the same (up to float rounding).
    torch.testing.assert_close(model.encode_texts(store.captions_text(emb.caption_indices), batch_size=3),
                               emb.captions, rtol=1e-5, atol=1e-5)


def test_encode_images_equals_evaluation_path_for_every_input_form(model, test_split):
    store, emb = test_split
    torch.testing.assert_close(model.encode_images(store, emb.image_indices), emb.images, rtol=0, atol=0)
    feats = [store.image_features(int(i)) for i in emb.image_indices]
    stacked = np.stack(feats)  # the tiny images all have the same number of regions
    for form in (stacked, torch.from_numpy(stacked), feats):
        torch.testing.assert_close(model.encode_images(form, batch_size=7), emb.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_images(feats[3]), emb.images[3:4], rtol=1e-5, atol=1e-5)


def test_encode_images_masks_padded_regions(model, test_split):
    store, emb = test_split
    short = store.image_features(int(emb.image_indices[0]))[:5]
    alone = model.encode_images(short)
    padded = model.encode_images([short, store.image_features(int(emb.image_indices[1]))])
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-5)


def _reference_order(sims: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("block_size", [7, None])
def test_rank_captions_against_images_equals_full_argsort(model, test_split, block_size):
    _, emb = test_split
    full = set_similarity(emb.images, emb.captions, kind="maxmatch").T  # (captions, images)
    ranking = model.rank(emb.captions, emb.images, k=10, block_size=block_size)
    assert ranking.indices.shape == ranking.scores.shape == (len(emb.captions), 10)
    assert torch.equal(ranking.indices, _reference_order(full, 10))
    torch.testing.assert_close(ranking.scores, full.gather(1, ranking.indices), rtol=1e-6, atol=1e-6)
    # Scores come out best first.
    assert bool((ranking.scores[:, :-1] >= ranking.scores[:, 1:]).all())


def test_rank_other_kind_direction_and_float16_gallery(model, test_split):
    _, emb = test_split
    # Images as queries against the captions, with chamfer and the recipe's alpha.
    full = set_similarity(emb.images, emb.captions, kind="chamfer", alpha=model.recipe.loss.chamfer_alpha)
    ranking = model.rank(emb.images, emb.captions, kind="chamfer", k=5, query_side="image", block_size=11)
    assert torch.equal(ranking.indices, _reference_order(full, 5))
    # A float16 NumPy gallery (what an index memory-maps) ranks as its float32 values do.
    gallery16 = emb.images.numpy().astype(np.float16)
    ranking = model.rank(emb.captions[:4], gallery16, k=3, block_size=6)
    full16 = set_similarity(torch.from_numpy(gallery16.astype(np.float32)), emb.captions[:4]).T
    assert torch.equal(ranking.indices, _reference_order(full16, 3))


def test_rank_ties_go_to_the_lower_row(model):
    sets = torch.randn(1, model.num_embeds, model.embed_dim)
    gallery = sets.repeat(9, 1, 1)  # nine identical gallery sets: all scores tie
    ranking = model.rank(sets, gallery, k=4, block_size=2)
    assert ranking.indices.tolist() == [[0, 1, 2, 3]]
    assert model.rank(sets, gallery, k=50).indices.shape == (1, 9)  # k is capped at the gallery size


def test_bad_inputs_are_clear_errors(model, test_split):
    _, emb = test_split
    with pytest.raises(MaxMatchError, match="dimensional local features"):
        model.encode_images(np.zeros((2, 5, model.recipe.model.image_feature_dim + 1), dtype=np.float32))
    with pytest.raises(MaxMatchError, match=r"\(R, F\) or \(N, R, F\)"):
        model.encode_images(np.zeros(7, dtype=np.float32))
    with pytest.raises(MaxMatchError, match="strings"):
        model.encode_texts([1, 2])
    with pytest.raises(MaxMatchError, match="k must be"):
        model.rank(emb.captions, emb.images, k=0)
    with pytest.raises(MaxMatchError, match="unknown similarity"):
        model.rank(emb.captions, emb.images, kind="maxmach")
    with pytest.raises(MaxMatchError, match="does not exist"):
        maxmatch_cli.load(Path("no/such/checkpoint.safetensors"))
    assert model.encode_texts([]).shape == (0, model.num_embeds, model.embed_dim)


def test_api_does_not_import_the_training_loop(trained):
    code = ("import sys, maxmatch_cli\n"
            "assert 'torch' not in sys.modules, 'import maxmatch_cli pulls in torch'\n"
            f"m = maxmatch_cli.load({str(trained / 'best.safetensors')!r}, device='cpu')\n"
            "s = m.encode_texts(['a red bus'])\n"
            "m.rank(s, s)\n"
            "bad = sorted(n for n in sys.modules if n in ('maxmatch_cli.training.trainer', 'maxmatch_cli.method.losses'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_readme_python_example_runs_and_ranks_by_the_similarity(trained, tiny_h5):
    """The README's Python block, on the tiny run and feature file: it runs as printed and its top-5 is the
    brute-force top-5 under the checkpoint's similarity."""
    import re
    from pathlib import Path

    from maxmatch_cli.method.similarity import set_similarity

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using a trained model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "maxmatch_cli.load(" in code and "encode_texts" in code and "rank(" in code
    code = code.replace("demo/run/best.safetensors", str(trained / "best.safetensors"))
    code = code.replace("demo/features.h5", str(tiny_h5))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model, gallery, top = namespace["model"], namespace["gallery"], namespace["top"]
    query = model.encode_texts([re.search(r'encode_texts\(\["([^"]+)"\]\)', code).group(1)])
    scores = set_similarity(gallery, query, kind=model.similarity,
                            **model.similarity_options(model.similarity))[:, 0]
    assert top.indices.shape == (1, 5)
    assert top.indices[0].tolist() == torch.sort(scores, descending=True, stable=True).indices[:5].tolist()
