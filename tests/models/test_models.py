"""Encoders, set heads, build_model and param_groups: shapes, masks, references, freezing (tiny dims, CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.models import (SET_HEADS, PVSEHead, SetDivHead, SetOutput, build_model, random_drop_mask,
                                 slot_competition_attention)
from maxmatch_cli.models.image import PrecomputedEncoder
from maxmatch_cli.config.recipes import ModelConfig

D, K, F = 16, 3, 12
VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(embed_dim=D, num_embeds=K, image_feature_dim=F, word_dim=8, set_depth=2, set_heads=2,
                set_head_dim=4, set_ff_dim=24, set_dropout=0.0, image_dropout=0.0, text_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_output(out: SetOutput, b: int) -> None:
    assert isinstance(out, SetOutput)
    assert out.sets.shape == (b, K, D)
    assert out.slots.shape == (b, K, D)
    assert out.global_.shape == (b, D)
    assert torch.isfinite(out.sets).all()


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_encoder", ["region", "grid"])
@pytest.mark.parametrize("head", ["setdiv", "pvse"])
def test_shapes_precomputed_and_bigru(image_encoder, head):
    model = build_model(tiny_cfg(image_encoder=image_encoder, set_head=head), VOCAB)
    feats, mask = torch.randn(4, 5, F), torch.ones(4, 5, dtype=torch.bool)
    check_output(model.encode_images(feats, mask), 4)
    check_output(model.encode_images(feats, None), 4)
    tokens = torch.randint(0, len(VOCAB), (2, 6))
    check_output(model.encode_texts(tokens, torch.ones(2, 6, dtype=torch.bool)), 2)
    img, txt = model(feats, mask, tokens, torch.ones(2, 6, dtype=torch.bool))
    check_output(img, 4)
    check_output(txt, 2)


def test_grid_accepts_spatial_maps_and_mean_pools():
    enc = PrecomputedEncoder(F, D, pool="mean", mlp=False).eval()
    maps = torch.randn(2, 3, 3, F)
    f = enc(maps, None)
    assert f.local.shape == (2, 9, D) and f.mask.all()
    torch.testing.assert_close(f.global_, f.local.mean(1))
    region = PrecomputedEncoder(F, D, pool="max").eval()
    g = region(maps.flatten(1, 2), None)
    torch.testing.assert_close(g.global_, g.local.amax(1))


def test_setdiv_output_is_ln_slots_plus_ln_global():
    head = SetDivHead(D, K, depth=2, heads=2, head_dim=4, ff_dim=8, dropout=0.0).eval()
    local, glob = torch.randn(2, 5, D), torch.randn(2, D)
    out = head(local, glob, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out.sets, out.slots + head.norm_global(glob).unsqueeze(1))
    torch.testing.assert_close(out.global_, glob)
    # slots are the final LayerNorm's output: zero mean, unit variance per element
    torch.testing.assert_close(out.slots.mean(-1), torch.zeros(2, K), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("head", ["setdiv", "pvse"])
@pytest.mark.parametrize("train", [False, True])
def test_padded_regions_change_nothing(head, train):
    model = build_model(tiny_cfg(set_head=head), VOCAB)
    model.train(train)
    feats = torch.randn(3, 4, F)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
    base = model.encode_images(feats, mask)
    # Same images with 3 more padded regions holding garbage.
    padded = torch.cat([feats, 100 * torch.randn(3, 3, F)], dim=1)
    pmask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    pad_out = model.encode_images(padded, pmask)
    torch.testing.assert_close(pad_out.sets, base.sets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pad_out.global_, base.global_, atol=1e-5, rtol=1e-5)
    # and garbage inside existing padded slots does not matter either
    noisy = feats + 50 * torch.randn_like(feats) * (~mask).unsqueeze(-1)
    torch.testing.assert_close(model.encode_images(noisy, mask).sets, base.sets, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["setdiv", "pvse"])
def test_caption_embedding_independent_of_batch_padding(head):
    model = build_model(tiny_cfg(set_head=head, gru_layers=2), VOCAB).eval()
    caption = torch.tensor([[1, 4, 5, 6, 2]])
    alone = model.encode_texts(caption, torch.ones(1, 5, dtype=torch.bool))
    # In a batch with a longer caption, padded with 4 pad tokens.
    batch = torch.tensor([[1, 4, 5, 6, 2, 0, 0, 0, 0], [1, 4, 5, 6, 7, 8, 9, 4, 2]])
    bmask = batch != 0
    bmask[:, 0] = True
    together = model.encode_texts(batch, bmask)
    torch.testing.assert_close(together.sets[0], alone.sets[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.global_[0], alone.global_[0], atol=1e-5, rtol=1e-5)


def test_random_drop_mask_subset_and_keeps_one():
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        out = random_drop_mask(mask, 0.9, g)
        assert not (out & ~mask).any()
        assert out.any(dim=1).all()
    assert random_drop_mask(mask, 0.0) is mask


# ---------------------------------------------------------------- attention reference


def brute_force_slot_attention(q, k, v, mask, eps=1e-7):
    b_, h_, k_, d_ = q.shape
    n_ = k.shape[2]
    out = torch.zeros(b_, h_, k_, d_, dtype=q.dtype)
    for b in range(b_):
        for h in range(h_):
            weights = torch.zeros(k_, n_, dtype=q.dtype)
            for j in range(n_):
                if not mask[b, j]:
                    continue
                logits = torch.stack([(q[b, h, i] * k[b, h, j]).sum() / d_ ** 0.5 for i in range(k_)])
                e = torch.exp(logits - logits.max())
                weights[:, j] = e / e.sum()  # slots compete for key j
            for i in range(k_):
                w = weights[i] / (weights[i].sum() + eps)  # renormalise over keys
                out[b, h, i] = sum(w[j] * v[b, h, j] for j in range(n_))
    return out


def test_slot_competition_matches_brute_force():
    q, k, v = torch.randn(2, 2, 3, 4, dtype=torch.float64), torch.randn(2, 2, 5, 4, dtype=torch.float64), \
        torch.randn(2, 2, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    out, attn = slot_competition_attention(q, k, v, mask)
    torch.testing.assert_close(out, brute_force_slot_attention(q, k, v, mask))
    assert (attn[1, :, :, ~mask[1]] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_slot_competition_gradcheck():
    q = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b, c: slot_competition_attention(a, b, c, mask)[0], (q, k, v))


# ---------------------------------------------------------------- weight sharing


def test_weight_sharing_really_shares():
    shared = SetDivHead(D, K, depth=4, heads=2, head_dim=4, ff_dim=8, dropout=0.0, share_weights=True)
    unshared = SetDivHead(D, K, depth=4, heads=2, head_dim=4, ff_dim=8, dropout=0.0, share_weights=False)
    assert len(shared.blocks) == 1 and len(unshared.blocks) == 4
    n_block = sum(p.numel() for p in shared.blocks[0].parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in unshared.parameters()) == n_shared + 3 * n_block

    # The shared head equals applying its one block four times by hand.
    shared.eval()
    local, glob, mask = torch.randn(2, 5, D), torch.randn(2, D), torch.ones(2, 5, dtype=torch.bool)
    block = shared.blocks[0]
    x = shared.queries.expand(2, -1, -1)
    for _ in range(4):
        x = block(x, block.keys_values(local), mask)
    torch.testing.assert_close(shared(local, glob, mask).slots, shared.norm_out(x))

    # A gradient step on the one block changes every depth's computation (there is only one set of weights).
    out = shared(local, glob, mask).sets.sum()
    out.backward()
    assert block.to_q.weight.grad is not None


# ---------------------------------------------------------------- param groups, registry


def test_param_groups_cover_every_parameter_once():
    model = build_model(tiny_cfg(), VOCAB)
    groups = model.param_groups(lr=1e-3, lr_scale_set=0.1, lr_scale_text=0.5, lr_scale_cnn=0.1, weight_decay=1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    by_name = {g["name"]: g for g in groups}
    # DivE: the image factor covers the whole non-CNN image tower; the text side scales only its set head.
    set_ids = {id(p) for m in (model.image_encoder, model.image_head, model.text_head) for p in m.parameters()}
    assert {id(p) for g in groups if g["name"].startswith("set/") for p in g["params"]} == set_ids
    assert by_name["set/decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["base/decay"]["lr"] == pytest.approx(1e-3)  # Bi-GRU is not a 'text backbone'
    assert {id(p) for g in groups if g["name"].startswith("base/") for p in g["params"]} == {
        id(p) for p in model.text_encoder.parameters()}
    heads_only = build_model(tiny_cfg(image_tower_lr_as_set=False), VOCAB)
    only = heads_only.param_groups(lr=1e-3, lr_scale_set=0.1)
    assert {id(p) for g in only if g["name"].startswith("set/") for p in g["params"]} == {
        id(p) for m in (heads_only.image_head, heads_only.text_head) for p in m.parameters()}
    for g in groups:
        if g["name"].endswith("no_decay"):
            assert g["weight_decay"] == 0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in g["params"])
    torch.optim.AdamW(groups)  # accepted as is


def test_unknown_component_suggests_nearest():
    with pytest.raises(MaxMatchError) as err:
        SET_HEADS.get("setdv")
    assert "setdiv" in str(err.value)
    cfg = dataclasses.replace(tiny_cfg(), text_encoder="bigru")
    with pytest.raises(MaxMatchError, match="vocab"):
        build_model(cfg, None)


def test_pvse_head_attends_only_to_valid_locals():
    head = PVSEHead(D, K, hidden_dim=8, dropout=0.0).eval()
    local = torch.randn(1, 4, D)
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    out = head(local, torch.zeros(1, D), mask)
    logits = head.w2(torch.tanh(head.w1(local[:, :2])))
    attended = torch.softmax(logits, dim=1).transpose(1, 2) @ local[:, :2]
    torch.testing.assert_close(out.slots, torch.sigmoid(head.fc(attended)))
    torch.testing.assert_close(out.sets, head.norm(out.slots))


# ---------------------------------------------------------------- CNN backbone


@pytest.fixture(scope="module")
def cnn_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(image_encoder="cnn", cnn_weights="random", cnn_freeze_epochs=1), VOCAB)


def test_cnn_encoder_random_weights_shapes(cnn_model):
    model = cnn_model.eval()
    out = model.encode_images(torch.randn(2, 3, 64, 64), None)
    check_output(out, 2)
    f = model.image_encoder(torch.randn(2, 3, 64, 64))
    assert f.local.shape == (2, 4, D)  # 64/32 = 2 -> 2x2 cells
    torch.testing.assert_close(f.global_, f.local.mean(1))


@pytest.fixture()
def small_cnn_model():
    """A full model whose CNN trunk is a random ResNet-18 (the freezing logic does not depend on depth)."""
    import torchvision

    from maxmatch_cli.models import SetEmbeddingModel
    from maxmatch_cli.models.image import CNNEncoder

    r = torchvision.models.resnet18(weights=None)
    trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
    ref = build_model(tiny_cfg(), VOCAB)
    return SetEmbeddingModel(CNNEncoder(trunk, 512, D, freeze_epochs=1), ref.text_encoder, ref.image_head,
                             ref.text_head)


def test_cnn_freezing_with_set_epoch(small_cnn_model):
    model = small_cnn_model
    enc = model.image_encoder
    trunk_params = list(enc.backbone.parameters())
    bn = next(m for m in enc.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))

    model.set_epoch(0)
    model.train()
    assert enc.frozen
    assert not bn.training  # frozen trunk keeps its BatchNorm statistics
    before = bn.running_mean.clone()
    model.zero_grad(set_to_none=True)
    model.encode_images(torch.randn(2, 3, 64, 64), None).sets.sum().backward()
    assert all(p.grad is None for p in trunk_params)  # no gradient flows into the frozen trunk
    # requires_grad stays on so a DDP wrapper built now still syncs the trunk once it is unfrozen
    assert all(p.requires_grad for p in trunk_params)
    assert enc.project.fc.weight.grad is not None
    torch.testing.assert_close(bn.running_mean, before)

    groups = model.param_groups(1.0, lr_scale_set=0.5, lr_scale_text=1.0, lr_scale_cnn=0.1, weight_decay=0.0)
    cnn_ids = {id(p) for g in groups if g["name"].startswith("cnn/") for p in g["params"]}
    assert cnn_ids == {id(p) for p in trunk_params}  # included while frozen, for after unfreezing
    assert all(g["lr"] == pytest.approx(0.1) for g in groups if g["name"].startswith("cnn/"))
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    # An AdamW step (with weight decay) while frozen leaves the trunk untouched.
    w_before = trunk_params[0].detach().clone()
    torch.optim.AdamW(model.param_groups(1e-2, 1.0, 1.0, 1.0, weight_decay=0.1)).step()
    torch.testing.assert_close(trunk_params[0].detach(), w_before, rtol=0, atol=0)

    model.set_epoch(1)
    model.train()
    assert not enc.frozen and bn.training
    model.zero_grad(set_to_none=True)
    model.encode_images(torch.randn(2, 3, 64, 64), None).sets.sum().backward()
    assert all(p.grad is not None for p in trunk_params)


def test_missing_cnn_weights_name_the_file(tmp_path, monkeypatch):
    from maxmatch_cli.models.backbones import build_cnn_trunk

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MaxMatchError) as err:
        build_cnn_trunk("resnet152", "")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet152-394f9c45.pth") in str(err.value)
    assert "resnet152" in err.value.hint
    with pytest.raises(MaxMatchError) as err:
        build_cnn_trunk("resnext101_32x8d", "")
    assert "ig_resnext101_32x8-c38310e5.pth" in str(err.value)
    with pytest.raises(MaxMatchError, match="nowhere.pth"):
        build_model(tiny_cfg(image_encoder="cnn", cnn_weights=str(tmp_path / "nowhere.pth")), VOCAB)


def test_cnn_weights_load_from_hub_cache(tmp_path, monkeypatch):
    import torchvision

    from maxmatch_cli.models import backbones

    spec = backbones.BackboneSpec(build=torchvision.models.resnet18, files=("resnet18-test.pth",), channels=512,
                                  how_to_get="(test)")
    monkeypatch.setitem(backbones.BACKBONES, "tiny_resnet", spec)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    source = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "hub" / "checkpoints" / "resnet18-test.pth")
    trunk, channels = backbones.build_cnn_trunk("tiny_resnet", "")
    assert channels == 512
    torch.testing.assert_close(trunk[0].weight, source.conv1.weight)
    torch.testing.assert_close(trunk[7][-1].bn2.running_var, source.layer4[-1].bn2.running_var)
    assert trunk.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)

    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(MaxMatchError, match="does not fit"):
        backbones.build_cnn_trunk("tiny_resnet", str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------- encoder formulas


def test_region_encoder_formula_and_half_inputs():
    enc = PrecomputedEncoder(F, D, pool="max").eval()
    x = torch.randn(2, 5, F)
    p = enc.project
    h = p.fc(x)
    expected = h + p.mlp_out(torch.relu(p.mlp_bn.bn(p.mlp_in(h).reshape(-1, D // 2)).reshape(2, 5, D // 2)))
    f = enc(x, None)
    torch.testing.assert_close(f.local, expected)
    torch.testing.assert_close(f.global_, expected.amax(1))
    torch.testing.assert_close(enc(x.half(), None).local, enc(x.half().float(), None).local)


def test_bigru_attends_to_word_embeddings_with_sine_keys():
    """Paper §3.1 / DivE: the text set head's locals are the word vectors; keys carry a sine position code."""
    from maxmatch_cli.models.common import sine_positions

    model = build_model(tiny_cfg(), VOCAB).eval()
    enc = model.text_encoder
    tokens = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 4, 5, 6, 7, 2]])
    f = enc(tokens, tokens != 0)
    torch.testing.assert_close(f.local[0, :4], enc.embed(tokens[0, :4]))
    assert (f.local[0, 4:] == 0).all() and f.local.shape[-1] == enc.embed.embedding_dim
    # Hand-computed encoding of a 4-token caption: angle 2 pi p / 4, channel 2i: sin(angle / 10000^(2i/8)).
    pos = f.key_pos[0]
    for p in range(4):
        for c in range(8):
            angle = 2 * math.pi * (p + 1) / 4 / 10000 ** (2 * (c // 2) / 8)
            assert pos[p, c].item() == pytest.approx(math.sin(angle) if c % 2 == 0 else math.cos(angle), abs=1e-6)
    assert (pos[4:] == 0).all()
    # The encoding depends on the caption's own length, not on the batch's padding.
    torch.testing.assert_close(sine_positions(tokens[:1, :4] != 0, 8)[0], pos[:4])
    # Keys move with the encoding, values do not: the head's output changes when it is dropped.
    with_pos = model.text_head(f.local, f.global_, f.mask, f.key_pos).sets
    without = model.text_head(f.local, f.global_, f.mask, None).sets
    assert (with_pos - without).abs().max() > 1e-4


def test_bigru_gru_locals_match_an_unpadded_run():
    model = build_model(tiny_cfg(text_local="gru"), VOCAB).eval()
    enc = model.text_encoder
    tokens = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 4, 5, 6, 7, 2]])
    f = enc(tokens, tokens != 0)
    out, h_n = enc.gru(enc.embed(tokens[:1, :4]))
    torch.testing.assert_close(f.local[0, :4], (out[0, :, :D] + out[0, :, D:]) / 2)
    assert (f.local[0, 4:] == 0).all()
    torch.testing.assert_close(f.global_[0], (h_n[0, 0] + h_n[1, 0]) / 2)
