"""What the engine trains, checked against references written here from the paper's formulas and DivE's facts.

* eq. 5 on an image-centric batch (B images x c captions), every term from a plain loop: the triplet loss with
  hardest negatives, averaged per direction (DivE ``triplet_ranking_loss``), GD (eq. 7), ISD (eq. 8), MMD on the
  L2-normalised elements, the slot diversity (image + text) and InfoNCE;
* MMD's gradient on realistically scaled (unnormalised) sets is not ~0;
* image-centric batches: B distinct images with their own c captions, an epoch = one pass over the images,
  steps per epoch = images // B.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maxmatch_cli.data.datasets import ImageCaptionsDataset
from maxmatch_cli.data.samplers import EpochSampler
from maxmatch_cli.data.tokenizers import Vocab
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.features.store import open_store
from maxmatch_cli.method.losses import mmd_loss, set_mmd, total_loss

B, C, K, D = 3, 2, 3, 5  # images, captions per image, set size, width
OWNER = torch.arange(B).repeat_interleave(C)  # caption j belongs to image j // C


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    img_slots, txt_slots, img_global, txt_global = r(B, K, D), r(B * C, K, D), r(B, D), r(B * C, D)
    # Unnormalised sets, as the set head returns them (slots + global).
    img_sets, txt_sets = 3 * (img_slots + img_global[:, None]), 3 * (txt_slots + txt_global[:, None])
    unit_i, unit_t = F.normalize(img_sets, dim=-1), F.normalize(txt_sets, dim=-1)
    sims = torch.einsum("ikd,tld->it", unit_i, unit_t) / K  # any (B, B*C) matrix will do
    return dict(sims=sims, img_sets=img_sets, txt_sets=txt_sets, img_global=img_global, txt_global=txt_global,
                img_slots=img_slots, txt_slots=txt_slots)


def ref_triplet(s, margin, reduction):
    """Per caption j of image o = j // C: i2t hinge against the hardest caption of another image, t2i hinge
    against the hardest other image; each direction averaged (or summed) over the B*C captions, then added."""
    n_cap = s.shape[1]
    i2t, t2i = [], []
    for j in range(n_cap):
        o = j // C
        neg_caps = [float(s[o, n]) for n in range(n_cap) if n // C != o]
        i2t.append(max(0.0, margin + max(neg_caps) - float(s[o, j])))
        neg_imgs = [float(s[i, j]) for i in range(B) if i != o]
        t2i.append(max(0.0, margin + max(neg_imgs) - float(s[o, j])))
    agg = (lambda v: sum(v) / len(v)) if reduction == "mean" else sum
    return agg(i2t) + agg(t2i)


def ref_info_nce(s, t):
    n_cap = s.shape[1]
    i2t, t2i = 0.0, 0.0
    for j in range(n_cap):
        o = j // C
        den = [float(s[o, j])] + [float(s[o, n]) for n in range(n_cap) if n // C != o]
        i2t += -float(s[o, j]) / t + math.log(sum(math.exp(x / t) for x in den))
        den = [float(s[i, j]) for i in range(B)]
        t2i += -float(s[o, j]) / t + math.log(sum(math.exp(x / t) for x in den))
    return 0.5 * (i2t / n_cap + t2i / n_cap)


def ref_gd(sets, glob, margin, scale):
    vals = [math.exp(scale * (_cos(sets[b, k], glob[b]) - margin)) for b in range(len(sets)) for k in range(K)]
    return sum(vals) / len(vals)


def ref_isd(sets, margin, scale):
    vals = [math.exp(scale * (_cos(sets[b, j], sets[b, k]) - margin))
            for b in range(len(sets)) for j, k in itertools.combinations(range(K), 2)]
    return sum(vals) / len(vals)


def ref_mmd(img_sets, txt_sets, gamma=0.5):
    x = [v / v.norm() for v in img_sets.reshape(-1, D)]
    y = [v / v.norm() for v in txt_sets.reshape(-1, D)]

    def kmean(a, b):
        return sum(math.exp(-gamma * float((u - v).norm())) for u in a for v in b) / (len(a) * len(b))

    return kmean(x, x) + kmean(y, y) - 2 * kmean(x, y)


def ref_div(slots):
    vals = []
    for b in range(len(slots)):
        unit = [v / v.norm() for v in slots[b]]
        vals += [math.exp(-2 * float((unit[i] - unit[j]).norm()) ** 2) for i, j in itertools.combinations(range(K), 2)]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_total_loss_of_an_image_centric_batch_matches_the_formulas(reduction):
    x = _batch()
    w = dict(margin=0.2, gd_weight=0.1, isd_weight=0.05, mmd_weight=0.3, div_weight=0.2, contrastive_weight=0.7,
             gd_margin=0.6, isd_margin=0.8, scale=0.5, contrastive_temperature=0.1, triplet_reduction=reduction)
    total, log = total_loss(**x, caption_owner=OWNER, **w)
    want = {
        "tri": ref_triplet(x["sims"], 0.2, reduction),
        "gd": 0.5 * (ref_gd(x["img_sets"], x["img_global"], 0.6, 0.5) + ref_gd(x["txt_sets"], x["txt_global"], 0.6, 0.5)),
        "isd": ref_isd(x["img_sets"], 0.8, 0.5) + ref_isd(x["txt_sets"], 0.8, 0.5),
        "mmd": ref_mmd(x["img_sets"], x["txt_sets"]),
        "div": ref_div(x["img_slots"]) + ref_div(x["txt_slots"]),
        "con": ref_info_nce(x["sims"], 0.1),
    }
    for name, value in want.items():
        assert float(log[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name
    weights = {"tri": 1.0, "gd": 0.1, "isd": 0.05, "mmd": 0.3, "div": 0.2, "con": 0.7}
    assert float(total) == pytest.approx(sum(weights[n] * v for n, v in want.items()), rel=1e-9)
    assert want["tri"] > 0  # the hinge is active, so the comparison says something


def test_mean_triplet_is_the_sum_over_each_directions_queries_divided_by_their_count():
    x = _batch(seed=3)
    kw = dict(caption_owner=OWNER, gd_weight=0, isd_weight=0, mmd_weight=0, div_weight=0)
    _, mean = total_loss(**x, **kw)
    _, summed = total_loss(**x, triplet_reduction="sum", **kw)
    # Both directions have B*C queries (one per caption), so the ratio is exactly B*C.
    assert float(summed["tri"]) == pytest.approx(B * C * float(mean["tri"]), rel=1e-12)


def test_warm_up_sums_or_averages_each_querys_negatives():
    """Before hardest negatives: VSE++ sums the hinge over a query's negatives, DivE averages it. An image
    query has (B - 1) C negative captions, a caption query B - 1 negative images."""
    x = _batch(seed=5)
    kw = dict(caption_owner=OWNER, gd_weight=0, isd_weight=0, mmd_weight=0, div_weight=0, hardest=False, margin=0.5)
    s, n_cap = x["sims"], B * C

    def ref(aggregate):
        i2t = [aggregate([max(0.0, 0.5 + float(s[j // C, n] - s[j // C, j])) for n in range(n_cap) if n // C != j // C])
               for j in range(n_cap)]
        t2i = [aggregate([max(0.0, 0.5 + float(s[i, j] - s[j // C, j])) for i in range(B) if i != j // C])
               for j in range(n_cap)]
        return sum(i2t) / n_cap + sum(t2i) / n_cap

    _, summed = total_loss(**x, **kw)
    _, averaged = total_loss(**x, warmup_negatives="mean", **kw)
    assert float(summed["tri"]) == pytest.approx(ref(sum), rel=1e-9)
    assert float(averaged["tri"]) == pytest.approx(ref(lambda v: sum(v) / len(v)), rel=1e-9)


def test_same_image_captions_are_never_negatives():
    """Caption 1 is image 0's second caption: scoring it above caption 0 must not cost image 0 anything."""
    s = torch.full((B, B * C), -0.5, dtype=torch.float64)
    s[OWNER, torch.arange(B * C)] = 0.5  # every positive 0.5, every negative -0.5: margin 0.2 is met
    s[0, 1] = 0.9
    x = _batch()
    _, log = total_loss(**{**x, "sims": s}, caption_owner=OWNER, gd_weight=0, isd_weight=0, mmd_weight=0,
                        div_weight=0, margin=0.2)
    assert float(log["tri"]) == 0.0


def test_mmd_on_realistic_sets_has_a_gradient():
    """LN(E) + LN(global) elements have norm ~sqrt(2D) (45 at D = 1024). Unnormalised, the kernel
    exp(-0.5 ||x - y||) is ~0 between distinct elements and MMD's gradient vanishes; on the unit sphere it acts."""
    g = torch.Generator().manual_seed(0)
    dim = 1024
    img = (torch.randn(8, 4, dim, generator=g, dtype=torch.float64) + 1.0).requires_grad_()
    txt = (torch.randn(8, 4, dim, generator=g, dtype=torch.float64) - 1.0).requires_grad_()
    assert 40 < float(img.detach().norm(dim=-1).mean()) < 60
    raw = mmd_loss(img.flatten(0, 1), txt.flatten(0, 1))
    (raw_grad,) = torch.autograd.grad(raw, img)
    unit = set_mmd(img, txt)
    (unit_grad,) = torch.autograd.grad(unit, img)
    assert float(raw_grad.norm()) < 1e-9  # the failure mode this guards against
    assert float(unit_grad.norm()) > 1e-4
    # And it is the MMD of the normalised elements.
    want = mmd_loss(F.normalize(img.detach().flatten(0, 1), dim=-1), F.normalize(txt.detach().flatten(0, 1), dim=-1))
    torch.testing.assert_close(unit.detach(), want)


# ------------------------------------------------------------------------------------------------------------
# Image-centric batches


def test_image_centric_batches_and_steps_per_epoch(tiny_h5):
    store = open_store(tiny_h5)
    images, captions = store.split("train")
    vocab = Vocab.build(store.captions_text(captions), min_count=1)
    ds = ImageCaptionsDataset(store, "train", vocab, captions_per_image=5, train=False)
    batch_size = 8
    sampler = EpochSampler(len(ds), batch_size, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=ds.collate, num_workers=0,
                        drop_last=True)
    assert len(ds) == len(images) and sampler.steps_per_epoch == len(images) // batch_size
    seen = []
    for batch in loader:
        assert batch.feats.shape[0] == batch_size and batch.tokens.shape[0] == 5 * batch_size
        assert len(set(batch.image_index.tolist())) == batch_size  # distinct images
        assert batch.caption_owner.tolist() == [i for i in range(batch_size) for _ in range(5)]
        owners = store.caption_image[batch.caption_index.numpy()]
        assert owners.tolist() == batch.image_index[batch.caption_owner].tolist()  # each caption with its image
        assert len(set(batch.caption_index.tolist())) == 5 * batch_size
        seen += batch.image_index.tolist()
    assert len(seen) == sampler.steps_per_epoch * batch_size and len(set(seen)) == len(seen)
    assert set(seen) <= set(images.tolist())


class _Store:
    """The few attributes ImageCaptionsDataset reads: image 0 has 7 captions, image 1 has 5, image 2 has 3."""

    path = "fake.h5"

    def __init__(self):
        self.caption_image = np.array([0] * 7 + [1] * 5 + [2] * 3)

    def split(self, name):
        return np.array([0, 1, 2]), np.arange(15)

    def captions_text(self, idx):
        return [f"caption {i}" for i in idx]

    def image_features(self, i):
        return np.zeros((2, 4), dtype=np.float32)


def test_extra_captions_are_drawn_per_epoch_and_too_few_is_an_error():
    vocab = Vocab.build([f"caption {i}" for i in range(15)], min_count=1)
    with pytest.raises(MaxMatchError, match="fewer than data.captions_per_image=5"):
        ImageCaptionsDataset(_Store(), "train", vocab, captions_per_image=5)
    ds = ImageCaptionsDataset(_Store(), "train", vocab, captions_per_image=3, seed=1)
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        caps = ds[0][3]
        assert len(caps) == 3 and set(caps) <= set(range(7))
        assert ds[0][3] == caps  # the same epoch draws the same (a resumed run sees what it would have)
        draws.add(tuple(caps))
        assert ds[2][3] == [12, 13, 14]  # exactly enough: all of them, in order
    assert len(draws) > 1  # the other captions get their turn
