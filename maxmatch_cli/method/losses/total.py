"""Eq. 5: the weighted sum of the loss components, assembled from a name-keyed table.

:data:`LOSS_COMPONENTS` maps a component's name to a :class:`LossComponent`: the :class:`LossWeights` field
holding its weight, an adapter that calls its loss (``losses/<name>.py``) on :class:`LossInputs`, and a help
line. :func:`total_loss` computes every component whose weight is not 0.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.losses.contrastive import contrastive_loss
from maxmatch_cli.method.losses.diversity import diversity_loss
from maxmatch_cli.method.losses.global_discriminative import global_discriminative_loss
from maxmatch_cli.method.losses.intra_set_divergence import intra_set_divergence_loss
from maxmatch_cli.method.losses.mmd import set_mmd
from maxmatch_cli.method.losses.triplet import triplet_loss
from maxmatch_cli.method.miners import same_image_mask


@dataclass(frozen=True)
class LossWeights:
    """The flat keyword arguments of :func:`total_loss`: lambdas of eq. 5 and each term's margin/scale.

    Field names follow ``recipes.LossConfig``. Defaults: paper App. B (Faster R-CNN configurations differ in
    margin and contrastive weight).
    """

    tri_weight: float = 1.0
    """Weight of the triplet loss (eq. 5 fixes it to 1)."""
    gd_weight: float = 0.1
    """lambda_GD, Global Discriminative loss."""
    isd_weight: float = 0.1
    """lambda_ISD, Intra-Set Divergence loss."""
    mmd_weight: float = 0.01
    """lambda_MMD, MMD between image and text set elements."""
    div_weight: float = 0.01
    """lambda_Div, diversity of the pre-global slots."""
    contrastive_weight: float = 0.0
    """lambda_CON, contrastive loss (0.001 for the Faster R-CNN configurations)."""
    margin: float = 0.2
    """delta_1, triplet margin."""
    triplet_reduction: str = "mean"
    """'mean' over each direction's queries, the two directions summed (DivE, VSE-infinity's averaged variant),
    or 'sum' over queries (eq. 6 as printed, VSE++)."""
    hardest: bool = True
    """Hardest negative per query; False takes every negative (warm-up), see ``warmup_negatives``."""
    warmup_negatives: str = "sum"
    """Without hardest negatives: 'sum' the hinge over a query's negatives (VSE++ / VSE-infinity warm-up) or
    'mean' it (DivE tri_mean_to_max)."""
    gd_margin: float = 0.6
    """delta_2."""
    isd_margin: float = 0.6
    """delta_3."""
    scale: float = 0.5
    """s, shared by GD and ISD."""
    mmd_gamma: float = 0.5
    """Rate of the MMD kernel exp(-gamma * ||x - y||) (SetDiv)."""
    contrastive_temperature: float = 0.05
    """Contrastive temperature (not given in the paper)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float | int) and not isinstance(value, bool) and value < 0:
                raise MaxMatchError(f"loss.{f.name} must be >= 0, got {value}")
        if self.triplet_reduction not in ("mean", "sum"):
            raise MaxMatchError(f"loss.triplet_reduction must be 'mean' or 'sum', got {self.triplet_reduction!r}")
        if self.warmup_negatives not in ("mean", "sum"):
            raise MaxMatchError(f"loss.warmup_negatives must be 'mean' or 'sum', got {self.warmup_negatives!r}")
        if self.contrastive_temperature <= 0:
            raise MaxMatchError(f"loss.contrastive_temperature must be > 0, got {self.contrastive_temperature}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LossWeights":
        """Build from keyword arguments; an unknown name is an error naming the closest valid one."""
        names = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise MaxMatchError(
                    f"unknown loss argument {key!r}",
                    f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(names)}",
                )
        return cls(**kwargs)


@dataclass(frozen=True)
class LossInputs:
    """Everything the components of eq. 5 read; built by :func:`total_loss` (see there for shapes)."""

    sims: Tensor
    img_sets: Tensor
    txt_sets: Tensor
    img_global: Tensor
    txt_global: Tensor
    img_slots: Tensor | None
    txt_slots: Tensor | None
    image_ids: Tensor | None
    caption_owner: Tensor | None
    sims_t2i: Tensor | None
    all_image_ids: Tensor | None
    all_caption_ids: Tensor | None
    offset: int
    caption_offset: int | None

    def ranking_calls(self) -> list[dict]:
        """Keyword arguments of the two ranking-loss calls, image queries (i2t) and caption queries (t2i).

        Every caption is one query in each direction. i2t: the caption's image asks for it against every other
        caption of the (global) batch, one row of the i2t matrix per caption, so an image with five captions
        is five queries sharing one hardest negative (DivE/VSE-infinity's image-centric batches). t2i: the
        caption asks for its image against every other image. With one caption per image and distinct images
        this is VSE++'s square-matrix loss.
        """
        n_img, n_cap = self.sims.shape[0], self.txt_sets.shape[0]
        device = self.sims.device
        owner = self.caption_owner
        if owner is None:
            if n_img != n_cap:
                raise MaxMatchError(
                    f"{n_img} images but {n_cap} captions and no caption_owner",
                    "pass caption_owner (the local row of each caption's image)",
                )
            owner = torch.arange(n_cap, device=device)
        owner = owner.to(device=device, dtype=torch.long)
        image_ids = self.image_ids
        if image_ids is None:  # every image row is its own image
            image_ids = torch.arange(n_img, device=device) + self.offset
        caption_ids = image_ids[owner]
        all_image_ids = image_ids if self.all_image_ids is None else self.all_image_ids
        all_caption_ids = self.all_caption_ids
        if all_caption_ids is None:  # one caption per image row (pairs): the gathered rows name the captions too
            all_caption_ids = all_image_ids if self.caption_owner is None else caption_ids
        sims_t2i = self.sims if self.sims_t2i is None else self.sims_t2i
        cap_offset = self.caption_offset
        if cap_offset is None:
            cap_offset = self.offset * n_cap // max(n_img, 1)
        local_captions = torch.arange(n_cap, device=device)
        return [
            dict(sims=self.sims[owner], positives=same_image_mask(caption_ids, all_caption_ids), direction="i2t",
                 pos_index=local_captions + cap_offset),
            dict(sims=sims_t2i, positives=same_image_mask(all_image_ids, caption_ids), direction="t2i",
                 pos_index=owner + self.offset),
        ]


# Adapters: each reads what its loss needs from LossInputs and LossWeights.


def _tri(x: LossInputs, w: LossWeights) -> Tensor:
    return sum(triplet_loss(margin=w.margin, hardest=w.hardest, reduction=w.triplet_reduction,
                            average_negatives=w.warmup_negatives == "mean", **kw)
               for kw in x.ranking_calls())


def _con(x: LossInputs, w: LossWeights) -> Tensor:
    calls = x.ranking_calls()
    return sum(contrastive_loss(temperature=w.contrastive_temperature, **kw) for kw in calls) / len(calls)


def _gd(x: LossInputs, w: LossWeights) -> Tensor:
    img = global_discriminative_loss(x.img_sets, x.img_global, w.gd_margin, w.scale)
    txt = global_discriminative_loss(x.txt_sets, x.txt_global, w.gd_margin, w.scale)
    return 0.5 * (img + txt)


def _isd(x: LossInputs, w: LossWeights) -> Tensor:
    # Eq. 8 adds the two modalities (no 1/2, unlike eq. 7).
    return intra_set_divergence_loss(x.img_sets, w.isd_margin, w.scale) + intra_set_divergence_loss(
        x.txt_sets, w.isd_margin, w.scale
    )


def _mmd(x: LossInputs, w: LossWeights) -> Tensor:
    return set_mmd(x.img_sets, x.txt_sets, w.mmd_gamma)


def _div(x: LossInputs, w: LossWeights) -> Tensor:
    if x.img_slots is None or x.txt_slots is None:
        raise MaxMatchError(
            "the diversity loss needs the pre-global slots (img_slots, txt_slots)",
            "pass them to total_loss, or set loss.div_weight = 0",
        )
    # DivE adds the image and the text terms (loss.py, its 'uniformity' term on the normalised slots).
    return diversity_loss(x.img_slots) + diversity_loss(x.txt_slots)


@dataclass(frozen=True)
class LossComponent:
    """One term of eq. 5: its weight field in :class:`LossWeights`, its function, a one-line description."""

    weight: str
    fn: Callable[[LossInputs, LossWeights], Tensor]
    help: str


#: The components of eq. 5 by name, in the order :func:`total_loss` adds them (changing it changes the rounding).
LOSS_COMPONENTS: dict[str, LossComponent] = {
    "tri": LossComponent("tri_weight", _tri, "hinge triplet, hardest (or all) negatives, both directions (eq. 6)"),
    "gd": LossComponent("gd_weight", _gd, "set elements vs their global, mean of image and text (eq. 7)"),
    "isd": LossComponent("isd_weight", _isd, "pairwise element cosines within each set, image + text (eq. 8)"),
    "mmd": LossComponent("mmd_weight", _mmd, "MMD between all image and all text set elements (SetDiv)"),
    "div": LossComponent("div_weight", _div, "PVSE/SetDiv slot diversity, image + text (DivE)"),
    "con": LossComponent("contrastive_weight", _con, "symmetric InfoNCE over the set similarity"),
}


def total_loss(
    sims: Tensor,
    img_sets: Tensor,
    txt_sets: Tensor,
    img_global: Tensor,
    txt_global: Tensor,
    img_slots: Tensor | None = None,
    txt_slots: Tensor | None = None,
    *,
    image_ids: Tensor | None = None,
    caption_owner: Tensor | None = None,
    sims_t2i: Tensor | None = None,
    all_image_ids: Tensor | None = None,
    all_caption_ids: Tensor | None = None,
    offset: int = 0,
    caption_offset: int | None = None,
    **weights,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5: ``TRI + l_GD GD + l_ISD ISD + l_MMD MMD + l_Div Div + l_CON CON``.

    Components whose weight is 0 are not computed. A batch holds Bi images and Bt captions; ``caption_owner``
    names each caption's image row (image-centric batches: Bt = 5 Bi, caption j of image j // 5). Every caption
    is one query in each direction (see :meth:`LossInputs.ranking_calls`). The ranking terms (TRI, CON) run in
    one of two modes:

    * in-batch: ``sims`` is the (Bi, Bt) matrix of the batch;
    * data-parallel (``sims_t2i`` given): ``sims`` is (Bi, Nt) local images x gathered captions, ``sims_t2i`` is
      (Ni, Bt) gathered images x local captions (still image rows); local image i is global image
      ``offset + i`` and local caption j global caption ``caption_offset + j``. The means (TRI with
      ``triplet_reduction="mean"``, CON) are then over the local queries, which DDP's gradient averaging turns
      into the global mean; with ``"sum"`` TRI is this process's share of the global sum.

    The set regularisers always use the local tensors.

    Args:
        sims: see above; image rows x caption columns.
        img_sets: (Bi, K, D) final image sets.
        txt_sets: (Bt, K, D) final text sets.
        img_global: (Bi, D) image global embeddings (GD reference).
        txt_global: (Bt, D) text global embeddings.
        img_slots: (Bi, K, D) image slots before the global is added; needed when div_weight > 0.
        txt_slots: (Bt, K, D) text slots before the global is added.
        image_ids: (Bi,) image id of each local image row; rows sharing an id (caption-centric batches) are
            the same image, whose captions are positives, never negatives. None: every row its own image.
        caption_owner: (Bt,) local row of each caption's image. None: caption j belongs to row j (Bi = Bt).
        sims_t2i: data-parallel only, see above.
        all_image_ids: data-parallel only, (Ni,) ids of the gathered images.
        all_caption_ids: data-parallel only, (Nt,) image id of each gathered caption.
        offset: data-parallel only, global index of local image 0 (rank * Bi).
        caption_offset: data-parallel only, global index of local caption 0; default ``offset * Bt // Bi``.
        **weights: any :class:`LossWeights` field (``margin``, ``hardest``, ``gd_weight``, ...); the rest keep
            their defaults.

    Returns:
        (total, log): the scalar loss and, for each computed component, its unweighted detached value (a
        0-d tensor, so logging needs no device sync until read), plus "total".
    """
    w = LossWeights.from_kwargs(**weights)
    inputs = LossInputs(
        sims, img_sets, txt_sets, img_global, txt_global, img_slots, txt_slots,
        image_ids, caption_owner, sims_t2i, all_image_ids, all_caption_ids, offset, caption_offset,
    )  # fmt: skip
    total = sims.new_zeros(())
    log: dict[str, Tensor] = {}
    for name, component in LOSS_COMPONENTS.items():
        weight = getattr(w, component.weight)
        if weight == 0:
            continue
        value = component.fn(inputs, w)
        total = total + weight * value
        log[name] = value.detach()
    log["total"] = total.detach()
    return total, log
