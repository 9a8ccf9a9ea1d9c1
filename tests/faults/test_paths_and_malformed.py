"""Read only what the user named; one clear message for malformed input (issue 18, items 6 to 9).

Each case builds the bad file for real (a Karpathy json, an index manifest, a recipe beside another, an HDF5
attribute, a safetensors header) and runs the command a user would: exit code 2, a message naming the input,
no traceback.
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.errors import MaxMatchError


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, *names):
    """Exit 2 with one message that names every one of ``names``, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    flat = " ".join(result.output.split())
    squeezed = "".join(result.output.split())  # rich wraps long lines, within a path too
    for name in names:
        assert "".join(str(name).split()) in squeezed, (name, result.output)
    return flat


# -- item 6: a Karpathy json names files outside the image folder ------------------------------------------------


def _image_folder(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(images / name)
    return images


def _karpathy(path, entries):
    sentences = [{"raw": f"a red picture number {k}"} for k in range(5)]
    path.write_text(json.dumps({"images": [{"split": "train", "sentences": sentences, **e} for e in entries]}))
    return path


@pytest.mark.parametrize("entry", [
    {"filepath": "..", "filename": "secret.jpg"},
    {"filepath": "sub/../..", "filename": "secret.jpg"},
    {"filename": "/etc/hostname"},
    {"filepath": "/etc", "filename": "hostname"},
    {"filename": "../secret.jpg"},
], ids=["filepath-dotdot", "nested-dotdot", "absolute-filename", "absolute-filepath", "filename-dotdot"])
@pytest.mark.parametrize("kind", ["pixels", "grid"])
def test_karpathy_paths_outside_the_image_folder_are_refused(tmp_path, entry, kind):
    images = _image_folder(tmp_path)
    (tmp_path / "secret.jpg").write_bytes((images / "a.jpg").read_bytes())  # a real image outside
    captions = _karpathy(tmp_path / "dataset.json", [{"filename": "a.jpg"}, entry])
    out = tmp_path / "out.h5"
    weights = ["--weights", "random"] if kind == "grid" else []
    result = _invoke("extract-features", "images", images, "--captions", captions, "--kind", kind, *weights,
                     "--out", out)
    flat = _refused(result, captions, "outside the image folder")
    assert "image 1" in flat
    assert not out.exists() and not list(tmp_path.glob("out.h5*"))


def test_karpathy_filename_of_another_type_is_one_message(tmp_path):
    images = _image_folder(tmp_path)
    captions = _karpathy(tmp_path / "dataset.json", [{"filename": 7}])
    result = _invoke("extract-features", "images", images, "--captions", captions, "--kind", "pixels",
                     "--out", tmp_path / "o.h5")
    _refused(result, captions, "must be strings")


def test_karpathy_paths_inside_the_folder_still_work(tmp_path):
    images = _image_folder(tmp_path)
    (images / "sub").mkdir()
    shutil.copy(images / "b.jpg", images / "sub" / "c.jpg")
    captions = _karpathy(tmp_path / "dataset.json", [{"filename": "a.jpg"}, {"filepath": "sub", "filename": "c.jpg"}])
    out = tmp_path / "ok.h5"
    result = _invoke("extract-features", "images", images, "--captions", captions, "--kind", "pixels", "--out", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert sorted(f["images/files"].asstr()[:]) == ["a.jpg", "sub/c.jpg"]


def test_image_file_store_naming_files_outside_its_root_is_refused(tmp_path):
    images = _image_folder(tmp_path)
    captions = _karpathy(tmp_path / "dataset.json", [{"filename": "a.jpg"}, {"filename": "b.jpg"}])
    store = tmp_path / "pixels.h5"
    assert _invoke("extract-features", "images", images, "--captions", captions, "--kind", "pixels",
                   "--out", store).exit_code == 0
    with h5py.File(store, "r+") as f:
        f["images/files"][1] = "../../etc/hostname"
    _refused(_invoke("features", "info", store), store, "outside its image folder", "../../etc/hostname")


# -- item 7: an index manifest names files outside the index folder ---------------------------------------------


@pytest.fixture(scope="module")
def built_index(trained, tiny_h5, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    shutil.copy2(trained / "best.safetensors", ckpt)
    out = tmp_path_factory.mktemp("index") / "idx"
    result = _invoke("index", ckpt, "--data", tiny_h5, "--split", "test", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def _copy_index(built_index, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(built_index, idx)
    return idx


def _edit_manifest(idx, **fields):
    manifest = json.loads((idx / "manifest.json").read_text())
    manifest.update(fields)
    (idx / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../outside.faiss", "/etc/hostname", "sub/../../outside.faiss"])
def test_manifest_element_file_outside_the_index_is_refused(built_index, tmp_path, name):
    idx = _copy_index(built_index, tmp_path)
    (tmp_path / "outside.faiss").write_bytes(b"not faiss")
    _edit_manifest(idx, element_index={"kind": "faiss-ivf", "file": name, "nlist": 4, "n_elements": 80})
    result = _invoke("query", idx, "--text", "a red square", "--engine", "faiss")
    _refused(result, idx, name, "element_index.file")


@pytest.mark.parametrize("name", ["elements.faiss", "sets.npy", "ids.json", "manifest.json"])
def test_a_link_leading_out_of_the_index_is_refused(built_index, tmp_path, name):
    idx = _copy_index(built_index, tmp_path)
    outside = tmp_path / f"elsewhere-{name}"
    if name == "elements.faiss":
        outside.write_bytes(b"not faiss")
        _edit_manifest(idx, element_index={"kind": "faiss-ivf", "file": name, "nlist": 4, "n_elements": 80})
    else:
        shutil.move(idx / name, outside)
    os.symlink(outside, idx / name)
    result = _invoke("query", idx, "--text", "a red square", "--engine", "exact")
    _refused(result, idx, name, "leads out of")


def test_a_shard_folder_linked_from_elsewhere_is_refused(built_index, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copytree(built_index, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", sharded / "shard-0-of-1")
    from maxmatch_cli.retrieval.index.shards import ShardedIndex

    with pytest.raises(MaxMatchError, match="leads out of"):
        ShardedIndex.open(sharded)


def test_the_index_folder_itself_may_be_a_link(built_index, tmp_path):
    os.symlink(built_index, tmp_path / "linked")
    result = _invoke("query", tmp_path / "linked", "--text", "a red square", "--engine", "exact", "-k", 2)
    assert result.exit_code == 0, result.output


# -- item 8: recipe extends ----------------------------------------------------------------------------------------


def _recipes(tmp_path, extends, *, base=True):
    folder = tmp_path / "recipes"
    folder.mkdir()
    if base:
        (folder / "base.toml").write_text('[recipe]\ndescription = "base"\n[optim]\nlr = 0.25\n[train]\nepochs = 7\n')
    child = folder / "child.toml"
    child.write_text(f'[recipe]\nextends = "{extends}"\ndescription = "child"\n[optim]\nweight_decay = 0.5\n')
    return child


def test_extends_is_resolved_beside_the_recipe_not_the_current_folder(tmp_path, monkeypatch):
    from maxmatch_cli.config.loading import load_recipe

    child = _recipes(tmp_path, "base.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.toml").write_text("[optim]\nlr = 9.0\n")  # a decoy in the current folder
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(str(child))
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.train.epochs) == (0.25, 0.5, 7)


def test_extends_a_bare_name_is_a_shipped_recipe(tmp_path):
    from maxmatch_cli.config.loading import load_recipe

    child = _recipes(tmp_path, "demo", base=False)
    assert load_recipe(str(child)).train.epochs == load_recipe("demo").train.epochs


@pytest.mark.parametrize("extends, message", [
    ("missing.toml", "does not exist"),
    ("../../outside.toml", "does not exist"),
    ("no-such-recipe", "not a shipped recipe"),
    ("base.txt", "not a .toml file"),
    ("/etc/hostname", "not a .toml file"),
])
def test_extends_that_cannot_be_followed_names_the_recipe_and_the_path(tmp_path, extends, message):
    child = _recipes(tmp_path, extends)
    (tmp_path / "recipes" / "base.txt").write_text("[optim]\nlr = 1.0\n")
    result = _invoke("train", "--recipe", child, "--out", tmp_path / "run")
    flat = _refused(result, child, extends, message)
    if message == "does not exist":
        assert str((child.parent / extends)) in flat.replace(" ", "") or str(child.parent) in flat
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_extends_of_another_type_is_one_message(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text("[recipe]\nextends = 5\n")
    _refused(_invoke("train", "--recipe", child, "--out", tmp_path / "run"), child, "not a recipe name")


# -- item 9: malformed recipes, feature files and checkpoints ------------------------------------------------------


def test_non_utf8_recipe_is_one_message(tmp_path):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('[recipe]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    _refused(_invoke("train", "--recipe", recipe, "--out", tmp_path / "run"), recipe, "not UTF-8")


def test_non_utf8_parent_recipe_is_one_message(tmp_path):
    child = _recipes(tmp_path, "base.toml")
    (child.parent / "base.toml").write_bytes(b"[optim]\nlr = 0.1 # \xff\n")
    _refused(_invoke("train", "--recipe", child, "--out", tmp_path / "run"), "base.toml", "not UTF-8")


@pytest.mark.parametrize("text, message", [
    ("train = 5\n", "[train] in"),  # a top-level key where a table belongs
    ('[recipe]\ndescription = "x"\ntrain = 5\n', "recipe.train"),  # lands inside [recipe]: was silently ignored
    ("recipe = 5\n", "[recipe]"),
])
def test_a_section_that_is_not_a_table_is_refused(tmp_path, text, message):
    recipe = tmp_path / "flat.toml"
    recipe.write_text(text)
    _refused(_invoke("train", "--recipe", recipe, "--out", tmp_path / "run"), recipe, message, "table")


def test_a_section_that_is_not_a_table_is_refused_with_overrides(tmp_path):
    recipe = tmp_path / "flat.toml"
    recipe.write_text("train = 5\n")
    _refused(_invoke("train", "--recipe", recipe, "--set", "train.epochs=2", "--out", tmp_path / "run"),
             "[train]", "table")


def _store_copy(tiny_h5, tmp_path):
    path = tmp_path / "copy.h5"
    shutil.copy2(tiny_h5, path)
    return path


@pytest.mark.parametrize("attr, value, message", [
    ("schema_version", "one", "schema_version"),
    ("schema_version", 1.5, "schema_version"),
    ("feature_dim", "garbage", "feature_dim"),
    ("feature_dim", -3, "feature_dim"),
    ("n_written", "many", "n_written"),
    ("metadata", "{not json", "metadata"),
    ("metadata", "[1, 2]", "metadata"),
    ("feature_kind", 7, "feature_kind"),
])
def test_malformed_root_attributes_are_one_message(tiny_h5, tmp_path, attr, value, message):
    path = _store_copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    _refused(_invoke("features", "info", path), path, message, "re-create it")


def test_non_utf8_captions_in_a_feature_file_are_one_message(tiny_h5, tmp_path, tiny_overrides):
    path = _store_copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f["captions/text"][3] = b"caf\xe9 on a table"
    result = _invoke("train", "--recipe", "demo", "--set", f"data.path={path}", *tiny_overrides,
                     "--set", "train.max_steps=1", "--out", tmp_path / "run")
    _refused(result, path, "captions/text[3]", "not UTF-8")


def test_non_utf8_captions_are_named_by_the_library(tiny_h5, tmp_path):
    from maxmatch_cli.features.store.reader import open_store

    path = _store_copy(tiny_h5, tmp_path)
    with h5py.File(path, "r+") as f:
        f["captions/text"][0] = b"\xff\xfe"
    with open_store(path) as store, pytest.raises(MaxMatchError, match=r"captions/text\[0\] is not UTF-8"):
        store.captions_text([0])


def _rewrite_checkpoint(src, dst, meta=None, drop=(), tensors=None):
    """Copy a checkpoint with some header metadata replaced (None values removed) or tensors swapped."""
    with safe_open(str(src), framework="pt") as fh:
        metadata = dict(fh.metadata())
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    state = load_file(str(src))
    state.update(tensors or {})
    save_file(state, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("meta, message", [
    ({"format_version": "one"}, "format_version"),
    ({"recipe": None}, "'recipe' is missing"),
    ({"recipe": "{not json"}, "'recipe'"),
    ({"recipe": "[1, 2]"}, "'recipe'"),
    ({"recipe": json.dumps({"optim": {"lr": "fast"}})}, "optim.lr"),
    ({"recipe": json.dumps({"train": 5})}, "[train]"),
    ({"provenance": "{oops"}, "'provenance'"),
    ({"provenance": "3"}, "'provenance'"),
    ({"train_state": "not json"}, "'train_state'"),
    ({"train_state": json.dumps({"epoch": -1})}, "epoch"),
    ({"train_state": json.dumps({"history": 4})}, "history"),
    ({"vocab": "{oops"}, "'vocab'"),
    ({"vocab": "[1, 2, 3]"}, "'vocab'"),
    ({"optim": "{oops"}, "'optim'"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}" for k in v))
def test_garbled_checkpoint_metadata_is_one_message(trained, tiny_h5, tmp_path, meta, message):
    ckpt = _rewrite_checkpoint(trained / "last.safetensors", tmp_path / "bad.safetensors", meta)
    result = _invoke("evaluate", ckpt, "--data", tiny_h5, "--split", "test", "--device", "cpu")
    _refused(result, ckpt, message)


def _shrunk(state, key):
    tensor = state[key]
    return {key: tensor[..., : max(tensor.shape[-1] - 1, 1)].contiguous().clone()}


def _a_weight(trained):
    state = load_file(str(trained / "best.safetensors"))
    return next(k for k, v in state.items() if k.startswith("model.") and v.ndim == 2), state


def test_checkpoint_tensor_of_the_wrong_shape_is_one_message_in_evaluate(trained, tiny_h5, tmp_path):
    key, state = _a_weight(trained)
    ckpt = _rewrite_checkpoint(trained / "best.safetensors", tmp_path / "bad.safetensors", tensors=_shrunk(state, key))
    result = _invoke("evaluate", ckpt, "--data", tiny_h5, "--split", "test", "--device", "cpu")
    _refused(result, ckpt, key[len("model."):], "has shape")


def test_checkpoint_tensor_of_the_wrong_shape_is_one_message_in_the_api(trained, tmp_path):
    import maxmatch_cli

    key, state = _a_weight(trained)
    ckpt = _rewrite_checkpoint(trained / "best.safetensors", tmp_path / "bad.safetensors", tensors=_shrunk(state, key))
    with pytest.raises(MaxMatchError, match="does not fit the model of its own recipe") as err:
        maxmatch_cli.load(ckpt, device="cpu")
    assert key[len("model."):] in str(err.value) and str(ckpt) in str(err.value)


def test_checkpoint_tensor_missing_or_extra_is_one_message(trained, tmp_path):
    from maxmatch_cli.evaluation.encoding import load_for_eval
    from maxmatch_cli.models.checkpoint import load_checkpoint

    import torch

    key, state = _a_weight(trained)
    ckpt = _rewrite_checkpoint(trained / "best.safetensors", tmp_path / "extra.safetensors",
                               tensors={"model.surplus.weight": torch.zeros(2)})
    with pytest.raises(MaxMatchError, match="surplus.weight is not part of"):
        load_for_eval(load_checkpoint(ckpt), torch.device("cpu"))


def test_resume_from_a_checkpoint_of_the_wrong_shape_is_one_message(trained, tiny_h5, tmp_path, tiny_overrides):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    key, state = _a_weight(trained)
    _rewrite_checkpoint(trained / "last.safetensors", run / "last.safetensors", tensors=_shrunk(state, key))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix == ".safetensors"}
    result = _invoke("train", "--recipe", "demo", "--set", f"data.path={tiny_h5}", "--set", "train.epochs=3",
                     *tiny_overrides, "--out", run, "--resume")
    _refused(result, run / "last.safetensors", key[len("model."):])
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing overwritten


def test_valid_inputs_of_each_kind_still_load(trained, tiny_h5):
    """The checks refuse only what is malformed: the session's own files pass them."""
    from maxmatch_cli.features.store.reader import open_store
    from maxmatch_cli.models.checkpoint import load_checkpoint

    with open_store(tiny_h5) as store:
        assert store.captions_text([0])[0] and np.all(store.image_ids == store.image_ids)
    for name in ("best", "last"):
        ckpt = load_checkpoint(trained / f"{name}.safetensors")
        assert ckpt.vocab_json and ckpt.train_state["global_step"] == 6
