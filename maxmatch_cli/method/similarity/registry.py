"""The name-keyed table of set similarities, and the lookup that checks a kind's options."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity import chamfer, maxmatch, mil, sinkhorn, topk
from maxmatch_cli.method.similarity.base import SimilarityKind, optional_positive_int

#: Every similarity by name, in the order ``maxmatch similarities`` lists them.
SIMILARITIES: Mapping[str, SimilarityKind] = MappingProxyType({
    kind.name: kind for kind in (maxmatch.KIND, chamfer.KIND, mil.KIND, topk.KIND, sinkhorn.KIND)
})


def list_similarities() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered similarity, in registry order."""
    return [(kind.name, kind.description) for kind in SIMILARITIES.values()]


def check_similarity(kind: str | None) -> None:
    """Refuse a similarity name that is not in :data:`SIMILARITIES` (``None``: the default, nothing to check), so
    that a command can say so before it loads a model."""
    if kind is not None:
        _resolve(kind, {})


def _resolve(kind: str, options: Mapping[str, object]) -> tuple[SimilarityKind, dict[str, object], int | None]:
    """Look up ``kind`` and validate ``options``; returns the kind, its score options and the block size.

    ``block_size`` is accepted by every kind: it belongs to the batched entry points, not to the score function.
    """
    if kind not in SIMILARITIES:
        close = difflib.get_close_matches(str(kind), SIMILARITIES, n=1)
        raise MaxMatchError(
            f"unknown similarity {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            hint=f"choose one of: {', '.join(SIMILARITIES)}",
        )
    spec = SIMILARITIES[kind]
    allowed = [*spec.defaults, "block_size"]
    resolved = dict(spec.defaults)
    block_size = None
    for name, value in options.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            raise MaxMatchError(
                f"unknown option {name!r} for similarity {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                hint=f"{kind} accepts: {', '.join(allowed)}",
            )
        if name == "block_size":
            block_size = optional_positive_int(name, value)
        else:
            resolved[name] = spec.checks[name](name, value)
    return spec, resolved, block_size
