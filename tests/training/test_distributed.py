"""Data-parallel training equals single-process training on the concatenated batch.

Under torchrun, :func:`maxmatch_cli.training.trainer.loss_on_batch` gathers both modalities' sets with gradients, mines
local queries against the global batch and DDP averages the gradients. Why the parameter gradients then
equal those of one process on the concatenated batch of N = W * B pairs:

* the gathered tensors' backward sums every rank's gradient into the owner's slice, and DDP averages over
  ranks, so the update is ``(1 / W) d(sum_r L_r) / d theta``; each term must therefore satisfy
  ``sum_r term_r = W * term_global``;
* TRI (``triplet_reduction="mean"``, the default), CON, GD, ISD and Div are means over local queries / sets
  with equal counts per rank: ``sum_r term_r = W * term_global`` as they are (a summed TRI would need
  ``tri_weight = W``);
* MMD is not a mean over samples (it has cross-rank pairs), so it is computed on the gathered sets: every rank
  holds the same global value and ``sum_r MMD = W * MMD_global``.

Tested twice, for pair batches and for image-centric batches (images with several captions each): with mocked
collectives (a "virtual" second rank in one process) and with a real two-process gloo run on CPU wrapped in DDP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.training import distributed as dist
from maxmatch_cli.training import trainer as train_mod
from maxmatch_cli.data.batches import Batch
from maxmatch_cli.method.losses import LossInputs, same_image_mask
from maxmatch_cli.models import build_model
from maxmatch_cli.config.recipes import LossConfig, ModelConfig, Recipe
from maxmatch_cli.method.similarity import set_similarity

WORLD = 2
B = 3  # pairs per rank
VOCAB = [f"w{i}" for i in range(12)]
# Global batch of 6 captions; samples 2 (rank 0) and 3 (rank 1) are two captions of image 7, so the same-image
# mask has to work across ranks.
IMAGE_IDS = [3, 5, 7, 7, 11, 13]
# (similarity kind, hardest negatives, batch layout): the paper's setting, chamfer with the warm-up's average over
# all negatives, and pair batches (one caption per row, one image twice).
CASES = [("maxmatch", True, "images"), ("chamfer", False, "images"), ("maxmatch", True, "pairs")]
# Image-centric global batch: 4 images x 2 captions; each rank holds 2 images and their 4 captions.
IMG_IDS, CAPS = [3, 5, 7, 11], 2


def tiny_recipe(kind: str = "maxmatch") -> Recipe:
    """Every term of eq. 5 switched on with weights large enough to matter at 1e-10 tolerance."""
    model = ModelConfig(embed_dim=16, num_embeds=4, image_encoder="region", image_feature_dim=12,
                        image_mlp=False,  # BatchNorm statistics differ between per-rank and global batches
                        text_encoder="bigru", word_dim=8, set_depth=1, set_heads=2, set_head_dim=8,
                        set_ff_dim=16, set_dropout=0.0, image_dropout=0.0, text_dropout=0.0)
    loss = LossConfig(similarity=kind, chamfer_alpha=4.0, margin=0.2, gd_weight=0.3, isd_weight=0.2,
                      mmd_weight=0.5, div_weight=0.4, contrastive_weight=0.7, contrastive_temperature=0.1)
    return Recipe(model=model, loss=loss)


def tiny_model(recipe: Recipe) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(recipe.model, VOCAB, pretrained=False).double().train()


def global_batch(layout: str = "pairs") -> Batch:
    """Synthetic float64 batch; variable region counts and caption lengths (padding must not matter).

    "pairs": six (image, caption) rows, rows 2 and 3 the same image. "images": four images with two captions
    each, caption j of image j // 2."""
    g = torch.Generator().manual_seed(1)
    n_img = len(IMAGE_IDS) if layout == "pairs" else len(IMG_IDS)
    n_cap = len(IMAGE_IDS) if layout == "pairs" else len(IMG_IDS) * CAPS
    regions, length = 5, 6
    feats = torch.randn(n_img, regions, 12, generator=g, dtype=torch.float64)
    feat_mask = torch.arange(regions).unsqueeze(0) < torch.tensor([5, 4, 3, 3, 5, 2][:n_img]).unsqueeze(1)
    tokens = torch.randint(1, len(VOCAB), (n_cap, length), generator=g)
    token_mask = torch.arange(length).unsqueeze(0) < torch.tensor([6, 3, 5, 5, 4, 2, 6, 3][:n_cap]).unsqueeze(1)
    if layout == "pairs":
        # Same image for samples 2 and 3; their captions differ in one word, so caption 3 is nearly as close to
        # image 2 as its own caption and would be a (hard) negative without the same-image mask.
        feats[3] = feats[2]
        tokens[3] = tokens[2]
        tokens[3, 1] = tokens[2, 1] % (len(VOCAB) - 1) + 1
    else:
        # Image 1's second caption (rank 0) nearly repeats image 2's first caption (rank 1): a cross-rank hard negative.
        tokens[3] = tokens[4]
        tokens[3, 1] = tokens[4, 1] % (len(VOCAB) - 1) + 1
        token_mask[3] = token_mask[4]
    tokens = tokens.masked_fill(~token_mask, 0)
    if layout == "pairs":
        return Batch(feats, feat_mask, tokens, token_mask, torch.tensor(IMAGE_IDS), torch.arange(n_cap))
    return Batch(feats, feat_mask, tokens, token_mask, torch.tensor(IMG_IDS), torch.arange(n_cap),
                 torch.arange(n_img).repeat_interleave(CAPS))


def rank_batch(batch: Batch, r: int) -> Batch:
    if batch.caption_owner is None:
        s = slice(r * B, (r + 1) * B)
        return Batch(batch.feats[s], batch.feat_mask[s], batch.tokens[s], batch.token_mask[s], batch.image_index[s],
                     batch.caption_index[s])
    n_img = len(batch.image_index) // WORLD
    si, sc = slice(r * n_img, (r + 1) * n_img), slice(r * n_img * CAPS, (r + 1) * n_img * CAPS)
    return Batch(batch.feats[si], batch.feat_mask[si], batch.tokens[sc], batch.token_mask[sc],
                 batch.image_index[si], batch.caption_index[sc], torch.arange(n_img).repeat_interleave(CAPS))


def caption_ids(batch: Batch) -> torch.Tensor:
    return batch.image_index if batch.caption_owner is None else batch.image_index[batch.caption_owner]


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(dist.unwrap(model).named_parameters())
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}


def single_process(kind: str, hardest: bool, layout: str = "pairs"):
    """Loss, log and parameter gradients of one process on the concatenated batch."""
    assert dist.world_size() == 1
    recipe = tiny_recipe(kind)
    model = tiny_model(recipe)
    loss, log = train_mod.loss_on_batch(model, global_batch(layout), recipe, hardest)
    return loss, log, grads_of(model, loss)


def mmd_rounding_bound(recipe: Recipe, gamma: float = 0.5, layout: str = "pairs") -> float:
    """Absolute bound on how far two float64 evaluations of the batch's MMD may differ by rounding alone.

    The per-rank and single-process runs compute the same MMD from sets that differ by rounding (other batch
    shapes, other summation orders), so exact agreement cannot be asked for. MMD = mean k(x, x') + mean k(y, y')
    - 2 mean k(x, y) with k(u, v) = exp(-gamma ||u - v||) and squared distances ||u||^2 + ||v||^2 - 2 u.v (one
    matmul). That squared distance carries an absolute error up to delta = 4 D eps ||u||_max^2 (a D-term dot
    product, the two norms and the subtraction). sqrt passes it on as delta / (2 d) for a pair at distance d,
    but as sqrt(delta) for (near-)identical elements -- images 2 and 3 of this batch are the same image, so their
    elements coincide and their distance is pure rounding (~1e-7 ||u||, not 0). A kernel entry moves by at most
    gamma times the distance error; each mean divides by its N^2 entries and adds at most N^2 eps of summation
    error; the three means enter with weights 1, 1, 2; two evaluations can err in opposite directions (x2).
    Summation order alone would give ~N^2 eps ~ 1e-13; the near-duplicates make it ~1e-9, which a fixed
    rtol=1e-10 could not hold on every CPU. Computed on the raw and on the L2-normalised elements (the larger
    wins), so it holds whichever of the two the loss measures distances on.
    """
    eps = torch.finfo(torch.float64).eps
    model = tiny_model(recipe)
    batch = global_batch(layout)
    with torch.no_grad():
        img, txt = model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)

    def mean_bound(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
        d = torch.cdist(a, b)  # direct differences: accurate where the matmul form is not
        if same:
            d.fill_diagonal_(float("inf"))  # self-distances are set to exactly 0 and carry no error
        scale = max(float(a.norm(dim=-1).max()), float(b.norm(dim=-1).max()))
        delta = 4 * a.shape[1] * eps * scale**2
        near = d < 1e-6 * scale
        per_entry = torch.where(near, torch.full_like(d, delta**0.5), delta / (2 * d.clamp(min=1e-300)))
        per_entry[torch.isinf(d)] = 0.0
        return gamma * float(per_entry.sum()) / d.numel() + d.numel() * eps

    bounds = []
    for x, y in ((img.sets, txt.sets), (F.normalize(img.sets, dim=-1), F.normalize(txt.sets, dim=-1))):
        x, y = x.flatten(0, 1), y.flatten(0, 1)
        bounds.append(2 * (mean_bound(x, x, True) + mean_bound(y, y, True) + 2 * mean_bound(x, y, False)))
    return max(bounds)


def assert_grads_close(got: dict, want: dict, atol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    assert any(bool(g.abs().max() > 1e-3) for g in want.values())  # the comparison is not vacuous
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------------------
# Mocked collectives: rank r runs loss_on_batch while a "virtual" other rank supplies its slices.


def _mock_rank(monkeypatch, model, recipe, batch, r, hardest):
    """loss_on_batch as rank r of 2 sees it; the other rank's sets keep their graph to the shared model, so the
    gradient of ``sum_r L_r`` is what all_gather's backward (sum over ranks) followed by DDP's sum gives."""
    mine, other = rank_batch(batch, r), rank_batch(batch, 1 - r)
    with torch.no_grad():
        mine_img, mine_txt = model(mine.feats, mine.feat_mask, mine.tokens, mine.token_mask)
    other_img, other_txt = model(other.feats, other.feat_mask, other.tokens, other.token_mask)
    counterpart = [(mine_img.sets, other_img.sets), (mine_txt.sets, other_txt.sets)]

    def gather_with_grad(x):
        matches = [o for m, o in counterpart if torch.equal(x.detach(), m)]
        assert len(matches) == 1, "gather_with_grad called on an unexpected tensor"
        return torch.cat([x, matches[0]] if r == 0 else [matches[0], x], dim=0)

    def gather_no_grad(x):
        if torch.equal(x, mine.image_index):
            return batch.image_index.clone()
        assert torch.equal(x, caption_ids(mine)), "only the image ids of images and captions are gathered"
        return caption_ids(batch).clone()

    calls = []

    def spy_total_loss(*args, **kwargs):
        calls.append((args, kwargs))
        return real_total_loss(*args, **kwargs)

    real_total_loss = train_mod.total_loss
    monkeypatch.setattr(dist, "world_size", lambda: WORLD)
    monkeypatch.setattr(dist, "rank", lambda: r)
    monkeypatch.setattr(dist, "gather_with_grad", gather_with_grad)
    monkeypatch.setattr(dist, "gather_no_grad", gather_no_grad)
    monkeypatch.setattr(train_mod, "total_loss", spy_total_loss)
    try:
        loss, log = train_mod.loss_on_batch(model, mine, recipe, hardest)
    finally:
        monkeypatch.undo()
    assert len(calls) == 1
    return loss, log, calls[0]


@pytest.mark.parametrize("kind,hardest,layout", CASES)
def test_mocked_ranks_add_up_to_the_global_batch(monkeypatch, kind, hardest, layout):
    torch.set_num_threads(1)
    recipe = tiny_recipe(kind)
    batch = global_batch(layout)
    ref_loss, ref_log, ref_grads = single_process(kind, hardest, layout)

    model = tiny_model(recipe)
    with torch.no_grad():
        img, txt = model(batch.feats, batch.feat_mask, batch.tokens, batch.token_mask)
    opts = train_mod.similarity_options(recipe, kind)
    sims_global = set_similarity(img.sets, txt.sets, kind=kind, **opts)
    same_global = same_image_mask(batch.image_index, caption_ids(batch))
    n_img, n_cap = sims_global.shape[0] // WORLD, sims_global.shape[1] // WORLD
    if layout == "pairs":
        assert bool(same_global[2, 3]) and bool(same_global[3, 2])  # the cross-rank same-image pair

    losses, logs = [], []
    for r in range(WORLD):
        loss, log, (args, kw) = _mock_rank(monkeypatch, model, recipe, batch, r, hardest)
        losses.append(loss)
        logs.append(log)
        rows, cols = slice(r * n_img, (r + 1) * n_img), slice(r * n_cap, (r + 1) * n_cap)
        # Offsets, no weight on the mean triplet loss, and the global id lists.
        assert kw["offset"] == r * n_img and kw["caption_offset"] == r * n_cap
        assert kw["tri_weight"] == 1.0
        assert torch.equal(kw["all_image_ids"], batch.image_index)
        assert torch.equal(kw["all_caption_ids"], caption_ids(batch))
        # Local images x all captions, and all images x local captions, equal the slices of the global matrix.
        sims_i2t, sims_t2i = args[0], kw["sims_t2i"]
        assert sims_i2t.shape == (n_img, WORLD * n_cap) and sims_t2i.shape == (WORLD * n_img, n_cap)
        torch.testing.assert_close(sims_i2t.detach(), sims_global[rows], rtol=0, atol=1e-12)
        torch.testing.assert_close(sims_t2i.detach(), sims_global[:, cols], rtol=0, atol=1e-12)
        # Designated positives point at the global positions; same-image positives are the global mask's slices.
        inputs = LossInputs(sims_i2t, *args[1:7], kw["image_ids"], kw["caption_owner"], sims_t2i,
                            kw["all_image_ids"], kw["all_caption_ids"], kw["offset"], kw["caption_offset"])
        i2t, t2i = inputs.ranking_calls()
        assert (i2t["direction"], t2i["direction"]) == ("i2t", "t2i")
        owner = torch.arange(n_cap) if layout == "pairs" else torch.arange(n_img).repeat_interleave(CAPS)
        assert torch.equal(i2t["pos_index"], torch.arange(n_cap) + r * n_cap)
        assert torch.equal(t2i["pos_index"], owner + r * n_img)
        same_caps = same_image_mask(caption_ids(batch), caption_ids(batch))
        assert torch.equal(i2t["positives"], same_caps[cols])
        assert torch.equal(t2i["positives"], same_global[:, cols])

    # Every term is a mean over equal local shares: the ranks average to the global value; MMD is global on each.
    for name in ("tri", "con", "gd", "isd", "div"):
        torch.testing.assert_close(sum(l[name] for l in logs) / WORLD, ref_log[name], rtol=1e-10, atol=1e-12)
    mmd_atol = mmd_rounding_bound(recipe, layout=layout)
    for log in logs:
        torch.testing.assert_close(log["mmd"], ref_log["mmd"], rtol=0, atol=mmd_atol)
    total = sum(losses) / WORLD
    torch.testing.assert_close(total.detach(), ref_loss.detach(), rtol=1e-10,
                               atol=1e-12 + recipe.loss.mmd_weight * mmd_atol)
    # all_gather's backward sums over ranks and DDP averages: the update is grad(sum_r L_r) / W.
    assert_grads_close(grads_of(model, total), ref_grads)


def test_same_image_mask_matters_in_this_batch():
    """Guards the batch above: without the same-image mask the loss changes, so the tests exercise it."""
    recipe = tiny_recipe("maxmatch")
    model = tiny_model(recipe)
    batch = global_batch()
    with_mask, _ = train_mod.loss_on_batch(model, batch, recipe, True)
    alone = Batch(*[batch.feats, batch.feat_mask, batch.tokens, batch.token_mask, torch.arange(len(IMAGE_IDS)),
                    batch.caption_index])
    without_mask, _ = train_mod.loss_on_batch(model, alone, recipe, True)
    assert abs(float(with_mask.detach()) - float(without_mask.detach())) > 1e-3


def test_identity_without_torchrun():
    x = torch.randn(2, 3, requires_grad=True)
    assert not dist.is_distributed() and dist.world_size() == 1 and dist.rank() == 0
    assert dist.gather_with_grad(x) is x and dist.gather_no_grad(x) is x
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model, torch.device("cpu")) is model and dist.unwrap(model) is model


# ------------------------------------------------------------------------------------------------------------
# A real two-process gloo run: DDP-wrapped model, one forward/backward of loss_on_batch per rank.


def _worker(out_dir: Path) -> None:
    """Entry point of each spawned rank (``python tests/training/test_distributed.py OUT_DIR`` with torchrun's env)."""
    torch.set_num_threads(1)
    dist.init()
    assert dist.is_distributed() and dist.world_size() == WORLD
    r = dist.rank()
    result = {}
    for kind, hardest, layout in CASES:
        recipe = tiny_recipe(kind)
        model = dist.wrap(tiny_model(recipe), torch.device("cpu"))
        loss, log = train_mod.loss_on_batch(model, rank_batch(global_batch(layout), r), recipe, hardest)
        loss.backward()  # DDP averages the gradients over the ranks here
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).tolist()
                 for n, p in dist.unwrap(model).named_parameters()}
        result[f"{kind}-{hardest}-{layout}"] = {"loss": loss.item(), "log": {k: v.item() for k, v in log.items()},
                                       "grads": grads}
    dist.barrier()
    (out_dir / f"rank{r}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, timeout: float = 240.0) -> list[subprocess.CompletedProcess | None]:
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="")
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log = open(out_dir / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs


@pytest.mark.slow
def test_gloo_two_processes_match_the_concatenated_batch(tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    procs = _launch(tmp_path)
    logs = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD))
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes) and "Address already in use" in logs:
        procs = _launch(tmp_path)  # lost the race for the port; once more
        logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD))
        codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes} (negative: killed after the timeout)\n{logs}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for kind, hardest, layout in CASES:
        key = f"{kind}-{hardest}-{layout}"
        ref_loss, ref_log, ref_grads = single_process(kind, hardest, layout)
        per_rank = [rk[key] for rk in ranks]
        recipe = tiny_recipe(kind)
        mmd_atol = mmd_rounding_bound(recipe, layout=layout)
        # Mean of the rank losses is the global loss; each rank's MMD is the global MMD.
        assert sum(p["loss"] for p in per_rank) / WORLD == pytest.approx(
            float(ref_loss.detach()), rel=1e-10, abs=1e-12 + recipe.loss.mmd_weight * mmd_atol)
        assert sum(p["log"]["tri"] for p in per_rank) / WORLD == pytest.approx(float(ref_log["tri"]), rel=1e-10)
        for p in per_rank:
            assert p["log"]["mmd"] == pytest.approx(float(ref_log["mmd"]), rel=0, abs=mmd_atol)
        for p in per_rank:  # after DDP's all-reduce every rank holds the global gradient
            got = {n: torch.tensor(g, dtype=torch.float64) for n, g in p["grads"].items()}
            assert_grads_close(got, ref_grads)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
