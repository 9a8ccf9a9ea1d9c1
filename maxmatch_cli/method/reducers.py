"""How per-query ranking terms become one number: reduce each direction's queries, then combine directions.

The ranking losses produce one term per query and direction (:mod:`maxmatch_cli.method.miners`). A reduction
(:data:`REDUCTIONS`) turns each direction's terms into a scalar, "none" keeps them; the directions are then
summed (the triplet loss, eq. 6) or averaged (the symmetric contrastive loss, CLIP's convention). Scaling by the
world size under data parallelism is the trainer's concern (``training/trainer.py``), not a reduction.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from maxmatch_cli.errors import MaxMatchError

#: Reductions over one direction's per-query terms, by name; ``None`` keeps the terms ("none").
REDUCTIONS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "sum": torch.sum,
    "mean": torch.mean,
    "none": None,
}


def reduction(name: str) -> Callable[[Tensor], Tensor] | None:
    """The reduction called ``name``.

    Raises:
        MaxMatchError: an unknown name.
    """
    if name not in REDUCTIONS:
        raise MaxMatchError(f"unknown reduction {name!r}", f"choose one of: {', '.join(REDUCTIONS)}")
    return REDUCTIONS[name]


def _kept(terms: list[Tensor]) -> Tensor:
    """Per-query terms as returned with reduction "none": (Nq,) for one direction, (2, N) for two."""
    return terms[0] if len(terms) == 1 else torch.stack(terms)


def sum_directions(terms: list[Tensor], reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """Reduce each direction's terms and add the directions (eq. 6).

    Args:
        terms: one (Nq,) tensor of per-query terms per direction.
        reduce: from :func:`reduction`; None keeps the terms.

    Returns:
        Scalar, or the kept terms.
    """
    if reduce is None:
        return _kept(terms)
    return sum(reduce(t) for t in terms)


def mean_directions(terms: list[Tensor], reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """Reduce each direction's terms and average the directions; arguments and result as :func:`sum_directions`."""
    if reduce is None:
        return _kept(terms)
    return sum(reduce(t) for t in terms) / len(terms)
