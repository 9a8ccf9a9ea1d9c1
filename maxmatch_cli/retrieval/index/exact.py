"""The ``exact`` engine (always available): exhaustive exact scoring.

Every query is scored against every gallery set with :func:`maxmatch_cli.retrieval.api.rank_sets`, block by block
over the memory-mapped sets, so results are exactly the top-k under the index's similarity (of the
float16-stored sets); cost grows linearly with the gallery. It needs no files beyond the sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.index.interface import check_nlist


class ExactEngine:
    """Exhaustive exact search (a :class:`~maxmatch_cli.retrieval.index.interface.SearchEngine`)."""

    name = "exact"
    auto_rank = 0  # the fallback of --engine auto
    files: tuple[str, ...] = ()

    def check_build(self, nlist: int | None) -> None:
        check_nlist(nlist)
        if nlist is not None:
            raise MaxMatchError("--nlist sets the faiss element index", hint="add --engine faiss, or leave out --nlist")

    def build(self, folder: Path, nlist: int | None) -> None:
        return None

    def usable(self, index: Any) -> bool:
        return True

    def open(self, index: Any, device: str | torch.device) -> None:
        return None

    def search(self, sets: Any, queries: torch.Tensor, k: int, kind: str, options: dict[str, Any], *,
               element_index: Any, candidates: int | None, nprobe: int | None, query_side: str,
               device: str | torch.device, block_size: int | None) -> Any:
        from maxmatch_cli.retrieval.api import rank_sets

        return rank_sets(queries, sets, kind, k, query_side=query_side, block_size=block_size, device=device,
                         **options)
