"""Every recipe value is range-checked when the recipe is built, before any work (issue 18, item 10).

Each bad value is refused by name (the dotted key) through ``--set``, as a user would pass it; the value just
inside the range is accepted.
"""

import pytest
from typer.testing import CliRunner

from maxmatch_cli.cli.app import app
from maxmatch_cli.config.loading import load_recipe
from maxmatch_cli.errors import MaxMatchError

# (key, a refused value, an accepted value at the edge of the range)
RANGES = [
    ("data.train_split", " ", "train"),
    ("data.vocab_min_count", "0", "1"),
    ("data.captions_per_image", "0", "1"),
    ("data.region_dropout", "1", "0"),
    ("data.word_dropout", "-0.1", "0.99"),
    ("data.max_caption_len", "3", "4"),
    ("data.num_workers", "-1", "0"),
    ("data.image_size", "31", "32"),
    ("model.embed_dim", "0", "1"),
    ("model.num_embeds", "0", "2"),
    ("model.image_feature_dim", "0", "1"),
    ("model.word_dim", "0", "1"),
    ("model.gru_layers", "0", "1"),
    ("model.set_depth", "0", "1"),
    ("model.set_heads", "0", "1"),
    ("model.set_head_dim", "0", "1"),
    ("model.set_ff_dim", "0", "1"),
    ("model.set_dropout", "1.0", "0"),
    ("model.set_dropout", "-0.5", "0.5"),
    ("model.text_dropout", "1", "0"),
    ("model.image_dropout", "1", "0"),
    ("model.cnn_freeze_epochs", "-1", "0"),
    ("loss.chamfer_alpha", "0", "0.5"),
    ("loss.sinkhorn_tau", "0", "0.01"),
    ("loss.sinkhorn_iters", "0", "1"),
    ("loss.scale", "0", "0.1"),
    ("loss.margin", "-0.1", "0"),
    ("loss.topk_k", "-1", "0"),
    ("loss.gd_weight", "-1", "0"),
    ("loss.isd_weight", "-1", "0"),
    ("loss.mmd_weight", "-1", "0"),
    ("loss.div_weight", "-1", "0"),
    ("loss.contrastive_weight", "-1", "0"),
    ("loss.contrastive_temperature", "0", "0.01"),
    ("loss.warmup_epochs", "-1", "0"),
    ("optim.lr", "0", "1e-6"),
    ("optim.weight_decay", "-1", "0"),
    ("optim.step_epochs", "0", "1"),
    ("optim.gamma", "0", "1"),
    ("optim.gamma", "1.5", "0.5"),
    ("optim.warmup_steps", "-1", "0"),
    ("optim.grad_clip", "-1", "0"),
    ("optim.lr_scale_set", "-0.1", "0"),
    ("optim.lr_scale_text", "-0.1", "0"),
    ("optim.lr_scale_cnn", "-0.1", "0"),
    ("train.epochs", "0", "1"),
    ("train.batch_size", "1", "2"),
    ("train.max_steps", "-1", "0"),
    ("train.seed", "-1", "0"),
    ("train.seed", str(2**46), str(2**46 - 1)),
    ("train.device", "gpu", "cuda:1"),
    ("train.log_every", "0", "1"),
    ("train.val_every", "0", "1"),
    ("train.val_max_images", "-1", "0"),
    ("eval.split", "", "dev"),
    ("eval.batch_size", "0", "1"),
    ("eval.block_size", "0", "1"),
]


@pytest.mark.parametrize("key, bad, good", RANGES, ids=[f"{k}={b!r}" for k, b, _ in RANGES])
def test_each_value_out_of_range_is_refused_by_name(key, bad, good):
    with pytest.raises(MaxMatchError, match=key.replace(".", r"\.")):
        load_recipe("demo", {key: bad})
    section, name = key.split(".")
    extra = {"loss.warmup_epochs": "0"} if key == "train.epochs" else {}  # demo warms up for an epoch
    value = getattr(getattr(load_recipe("demo", {key: good, **extra}), section), name)
    assert value == (type(value)(good) if isinstance(value, str) else type(value)(float(good)))


def test_every_section_field_is_covered_or_a_choice_or_free_text():
    """A new numeric field must get a range check here: the table above lists every number of every section."""
    import dataclasses

    from maxmatch_cli.config.schema import SECTIONS

    checked = {key for key, _, _ in RANGES}
    free = {"data.path", "data.val_split", "data.image_root", "data.batching", "model.image_encoder",
            "model.image_mlp", "model.image_pool", "model.image_tower_lr_as_set", "model.cnn_backbone",
            "model.cnn_weights",
            "model.text_encoder", "model.glove_path", "model.text_local", "model.text_pos_encoding",
            "model.bert_path", "model.set_head", "model.set_share_weights", "loss.similarity",
            "loss.triplet_reduction", "loss.hardest_negatives", "loss.warmup_negatives", "loss.gd_margin",
            "loss.isd_margin", "optim.schedule", "train.amp", "train.report_to", "eval.protocol",
            "eval.similarity"}
    fields = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert fields - checked - free == set()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(MaxMatchError, match="optim.lr must be a finite number"):
        load_recipe("demo", {"optim.lr": value})
    with pytest.raises(MaxMatchError, match="loss.gd_margin must be a finite number"):
        load_recipe("demo", {"loss.gd_margin": value})


def test_intra_set_divergence_needs_two_elements():
    with pytest.raises(MaxMatchError, match="loss.isd_weight"):
        load_recipe("demo", {"model.num_embeds": "1"})
    assert load_recipe("demo", {"model.num_embeds": "1", "loss.isd_weight": "0"}).model.num_embeds == 1


def test_a_bad_value_stops_train_before_any_work(tiny_h5, tmp_path):
    """The issue's case: eval.block_size=0 trained a whole epoch, then validation crashed with no checkpoint."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", "demo", "--set", f"data.path={tiny_h5}",
                                      "--set", "eval.block_size=0", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "eval.block_size" in result.output and "must be >= 1" in result.output
    assert not out.exists() or not any(out.rglob("*.jsonl"))
