"""Evaluation protocols (DESIGN §4) and the metrics they report for a full similarity matrix.

``full`` scores all images of the split against all their captions (Flickr30K 1K test, or any split); ``coco5k`` is
``full`` on the 5,000-image COCO test; ``coco1k`` averages the metrics over 5 folds of 1,000 consecutive images.
``auto`` reports coco5k with the 1K folds for a 5,000-image split, else full. ``eccv`` and ``cxc`` (``maxmatch
evaluate`` and ``ensemble`` only) are coco5k plus the ECCV Caption or CxC metrics of the ``eccv-caption`` package,
which need the split's COCO image and caption annotation ids (:mod:`maxmatch_cli.evaluation.eccv`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.eccv import ECCV_PROTOCOLS, CocoIds, coco_metrics, require_package
from maxmatch_cli.evaluation.metrics import coco_1k_folds, retrieval_metrics
from maxmatch_cli.evaluation.results import EvalResult

PROTOCOLS = ("auto", "full", "coco1k", "coco5k")
"""Evaluation protocols (module docstring); ``evaluate`` also takes :data:`~maxmatch_cli.evaluation.eccv.ECCV_PROTOCOLS`."""
COCO_TEST_IMAGES = 5000
"""Images of the COCO 5K test split, the only split coco1k and coco5k apply to."""


def check_protocol(protocol: str, extra: tuple[str, ...] = ()) -> str:
    """Refuse a protocol name that is not one of :data:`PROTOCOLS` or ``extra`` (what the caller also takes)."""
    if protocol in ECCV_PROTOCOLS and protocol not in extra:
        raise MaxMatchError(f"protocol {protocol} is computed by `maxmatch evaluate` and `ensemble` only",
                            hint=f"use `maxmatch evaluate CKPT --protocol {protocol}`, or here one of: "
                                 f"{', '.join(PROTOCOLS)}")
    allowed = PROTOCOLS + tuple(extra)
    if protocol not in allowed:
        raise MaxMatchError(f"unknown protocol '{protocol}'", hint=f"use one of: {', '.join(allowed)}")
    return protocol


def resolve_protocol(protocol: str, n_images: int, split: str | None = None) -> str:
    """The protocol to apply to a split of ``n_images`` images: ``auto`` resolved, a misfit refused.

    coco1k and coco5k are defined on the 5,000-image COCO test split only; on any other size they would average a
    different number of folds (or one) under the COCO name, so they are an error naming the split. So are eccv and
    cxc (whose ids :func:`~maxmatch_cli.evaluation.eccv.split_coco_ids` checks in full).
    """
    check_protocol(protocol, ECCV_PROTOCOLS)
    if protocol == "auto":
        return "coco5k" if n_images == COCO_TEST_IMAGES else "full"
    if protocol in ECCV_PROTOCOLS and n_images != COCO_TEST_IMAGES:
        where = f"split '{split}'" if split else "the similarity matrix"
        raise MaxMatchError(f"protocol {protocol} needs the {COCO_TEST_IMAGES:,}-image COCO 5K test split that ECCV "
                            f"Caption and CxC annotate, but {where} has {n_images:,} images",
                            hint="use --split testall (or test) of a COCO feature file, or --protocol full")
    if protocol in ("coco1k", "coco5k") and n_images != COCO_TEST_IMAGES:
        where = f"split '{split}'" if split else "the similarity matrix"
        raise MaxMatchError(f"protocol {protocol} needs the {COCO_TEST_IMAGES:,}-image COCO test split, but {where} "
                            f"has {n_images:,} images",
                            hint="use --protocol full (all images against all their captions) or auto for this split")
    return protocol


def check_eval_protocol(protocol: str | None, coco_captions: str | Path | None) -> None:
    """Refuse, before anything is loaded, a protocol ``evaluate`` / ``ensemble`` do not take, a COCO caption file
    without eccv or cxc, and eccv or cxc without the eccv-caption package."""
    if protocol is not None:
        check_protocol(protocol, ECCV_PROTOCOLS)
    if coco_captions is not None and protocol not in ECCV_PROTOCOLS:
        raise MaxMatchError("a COCO caption file (--coco-captions) is used by the eccv and cxc protocols only",
                            hint="add --protocol eccv or --protocol cxc, or leave out --coco-captions")
    if protocol in ECCV_PROTOCOLS:
        require_package()


def metrics_for(sims: torch.Tensor, protocol: str, captions_per_image: int,
                coco_ids: CocoIds | None = None) -> EvalResult:
    """Apply an evaluation protocol (:func:`resolve_protocol`) to a full similarity matrix.

    eccv and cxc report coco5k's metrics and folds plus their own keys, and need ``coco_ids`` (the COCO ids of
    the rows and columns, :func:`~maxmatch_cli.evaluation.eccv.split_coco_ids`).
    """
    n_images = sims.shape[0]
    protocol = resolve_protocol(protocol, n_images)
    if protocol in ECCV_PROTOCOLS and coco_ids is None:
        raise MaxMatchError(f"protocol {protocol} needs the COCO ids of the images and captions",
                            hint="pass coco_ids=maxmatch_cli.evaluation.eccv.split_coco_ids(store, split, captions_per_image)")
    result = EvalResult(protocol=protocol, metrics={}, n_images=n_images, n_captions=sims.shape[1])
    if protocol == "coco1k":
        result.metrics, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
        return result
    result.metrics = retrieval_metrics(sims, captions_per_image=captions_per_image)
    if protocol in ("coco5k", *ECCV_PROTOCOLS):
        result.folds_mean, result.folds = coco_1k_folds(sims, captions_per_image, n_folds=n_images // 1000)
    if protocol in ECCV_PROTOCOLS:
        result.metrics.update(coco_metrics(sims, coco_ids, protocol, captions_per_image))
    return result
