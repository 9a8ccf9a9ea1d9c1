"""The baseline recipes change exactly what their paper rows change, and the attention widths follow App. B.

Each baseline is compared field by field with the recipe it sits beside, so a value inherited by accident (or a
change nobody meant) fails here, not in a week-long run.
"""

from __future__ import annotations

import pytest

from maxmatch_cli.config.recipes import list_recipes, load_recipe


def _flat(name: str) -> dict[str, object]:
    recipe = load_recipe(name).to_dict()
    return {f"{section}.{key}": value for section, fields in recipe.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def _changes(name: str, base: str) -> dict[str, object]:
    """The fields where ``name`` differs from ``base``, with ``name``'s values."""
    mine, theirs = _flat(name), _flat(base)
    return {key: value for key, value in mine.items() if theirs.get(key) != value and key != "recipe.extends"}


def _without_description(changes: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in changes.items() if not k.startswith("recipe.")}


@pytest.mark.parametrize("similarity", ["chamfer", "mil"])
def test_table4_flickr_baselines_change_only_the_similarity_and_drop_gd_isd(similarity):
    name = f"f30k-butd-bigru-{similarity}"
    assert _without_description(_changes(name, "f30k-butd-bigru")) == {
        "loss.similarity": similarity, "loss.gd_weight": 0.0, "loss.isd_weight": 0.0, "eval.similarity": similarity}
    recipe = load_recipe(name)
    assert recipe.loss.chamfer_alpha == 16.0  # DivE --temperature 16, as coco-butd-bert-chamfer
    assert recipe.data.path.endswith("f30k_butd.h5") and recipe.eval.split == "test"
    assert (recipe.loss.div_weight, recipe.loss.mmd_weight) == (0.01, 0.01)  # "+ Div + MMD"


def test_plain_pvse_changes_only_the_loss_to_pvse_own():
    changes = _without_description(_changes("f30k-resnet152-bigru-pvse-mil", "f30k-resnet152-bigru-pvse"))
    # PVSE's README command: --margin 0.1 --max_violation --mmd_weight 0.01 --div_weight 0.1; no GD / ISD.
    assert changes == {"loss.similarity": "mil", "loss.margin": 0.1, "loss.gd_weight": 0.0, "loss.isd_weight": 0.0,
                       "loss.div_weight": 0.1, "eval.similarity": "mil"}
    recipe = load_recipe("f30k-resnet152-bigru-pvse-mil")
    assert recipe.model.set_head == "pvse" and recipe.loss.hardest_negatives and recipe.loss.mmd_weight == 0.01
    assert recipe.loss.contrastive_weight == 0.0 and recipe.loss.warmup_epochs == 0


def test_vsepp_is_one_pooled_vector_with_vsepp_training():
    r = load_recipe("f30k-resnet152-bigru-vsepp")
    assert (r.model.set_head, r.model.num_embeds, r.model.embed_dim) == ("pooled", 1, 1024)
    assert (r.model.image_encoder, r.model.cnn_backbone, r.model.image_pool, r.model.image_mlp) == \
           ("cnn", "resnet152", "mean", False)  # fc of the average-pooled ResNet-152 features
    assert (r.model.word_dim, r.model.glove_path, r.model.gru_layers) == (300, "", 1)  # learnt from scratch
    assert (r.loss.similarity, r.loss.margin, r.loss.hardest_negatives, r.loss.warmup_epochs) == ("mil", 0.2, True, 0)
    assert r.loss.triplet_reduction == "sum"  # VSE++'s ContrastiveLoss sums over the batch
    for weight in ("gd_weight", "isd_weight", "mmd_weight", "div_weight", "contrastive_weight"):
        assert getattr(r.loss, weight) == 0.0, weight
    assert (r.data.batching, r.train.batch_size, r.optim.grad_clip) == ("pairs", 128, 2.0)
    assert (r.optim.lr, r.optim.weight_decay, r.optim.schedule, r.optim.step_epochs, r.optim.gamma) == \
           (2e-4, 0.0, "step", 15, 0.1)
    # 30 epochs with the CNN fixed, then 15 fine-tuning it at 2e-4 x 0.1^2 x 10 = 2e-5
    assert (r.train.epochs, r.model.cnn_freeze_epochs) == (45, 30)
    assert r.optim.lr * r.optim.gamma ** 2 * r.optim.lr_scale_cnn == pytest.approx(2e-5)
    assert r.eval.similarity == "mil"


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_attention_width_follows_appendix_b(name):
    """App. B: "D_h = 1024 for convolutional features and D_h = 2048 for region features"."""
    m = load_recipe(name).model
    if name == "demo" or m.set_head != "setdiv":
        return
    width = m.set_heads * m.set_head_dim
    assert width == (1024 if m.image_encoder in ("cnn", "grid") else 2048), (name, m.set_heads, m.set_head_dim)


def test_resnext_recipes_use_the_wsl_weights_by_default():
    for name in ("coco-resnext-bert", "f30k-resnext-bert"):
        m = load_recipe(name).model
        assert (m.cnn_backbone, m.cnn_weights, m.set_heads, m.set_head_dim) == ("resnext101_32x8d", "", 4, 256)
