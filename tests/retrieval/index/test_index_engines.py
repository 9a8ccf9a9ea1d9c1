"""The engine table: every engine satisfies the interface, names resolve (auto included), and a new engine is one
table entry away from search_sets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.retrieval.api import Ranking, rank_sets
from maxmatch_cli.retrieval.index import ENGINES, SEARCH_ENGINES, search_sets
from maxmatch_cli.retrieval.index.engines import build_engine, engine_for
from maxmatch_cli.retrieval.index.interface import SearchEngine, check_depth, check_nlist


def _gallery(seed=0, n=12, k=4, d=8):
    g = torch.Generator().manual_seed(seed)
    sets = F.normalize(torch.randn(n, k, d, generator=g), dim=-1).numpy().astype(np.float16)
    return sets, torch.randn(3, k, d, generator=g)


def test_every_engine_satisfies_the_interface_under_its_own_name():
    assert ENGINES == ("auto", "exact", "faiss", "milvus")  # the CLI's --engine choices, in this order
    for name, engine in SEARCH_ENGINES.items():
        assert isinstance(engine, SearchEngine) and engine.name == name
    assert len({engine.auto_rank for engine in SEARCH_ENGINES.values()}) == len(SEARCH_ENGINES)  # auto is decided


class _Gallery:
    """Just what engine_for asks of an index."""

    def __init__(self, has_element_index):
        self.has_element_index = has_element_index


def test_auto_takes_the_usable_engine_of_the_highest_rank():
    assert engine_for("auto", _Gallery(False)).name == "exact"
    want = "faiss" if SEARCH_ENGINES["faiss"].usable(_Gallery(True)) else "exact"  # faiss installed or not
    assert engine_for("auto", _Gallery(True)).name == want
    assert engine_for("exact", _Gallery(True)).name == "exact"
    with pytest.raises(MaxMatchError, match="unknown search engine 'nope'"):
        engine_for("nope", _Gallery(True))
    with pytest.raises(MaxMatchError, match="unknown index engine 'auto'"):
        build_engine("auto")  # auto chooses at search time; a build is for one engine


def test_search_sets_dispatches_through_the_table(monkeypatch):
    sets, queries = _gallery()

    class Reversed:
        """A toy engine: the exact top-k, listed worst first (so its answers are told apart)."""

        name, auto_rank, files = "reversed", -1, ()

        def check_build(self, nlist):
            pass

        def build(self, folder, nlist):
            return None

        def usable(self, index):
            return True

        def open(self, index, device):
            return None

        def search(self, sets, queries, k, kind, options, **kw):
            top = rank_sets(queries, sets, kind, k)
            return Ranking(top.indices.flip(1), top.scores.flip(1))

    assert isinstance(Reversed(), SearchEngine)
    with pytest.raises(MaxMatchError, match="unknown search engine 'reversed'"):
        search_sets(sets, queries, 4, "maxmatch", engine="reversed")
    monkeypatch.setitem(SEARCH_ENGINES, "reversed", Reversed())
    got = search_sets(sets, queries, 4, "maxmatch", engine="reversed")
    want = search_sets(sets, queries, 4, "maxmatch", engine="exact")
    assert torch.equal(got.indices, want.indices.flip(1)) and torch.equal(got.scores, want.scores.flip(1))


def test_exact_engine_is_rank_sets_and_takes_one_query_as_a_batch():
    sets, queries = _gallery(1)
    got = search_sets(sets, queries[0], 5, "chamfer", {"alpha": 4.0}, query_side="image", block_size=5)
    want = rank_sets(queries[:1], sets, "chamfer", 5, query_side="image", alpha=4.0)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.scores, want.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: check_depth(0, None), "candidates must be a positive integer, got 0"),
    (lambda: check_depth(None, True), "nprobe must be a positive integer, got True"),
    (lambda: check_nlist(2.5), "nlist must be a positive integer, got 2.5"),
    (lambda: check_nlist(9, 8), "nlist=9 must lie in 1..8"),
    (lambda: SEARCH_ENGINES["exact"].check_build(4), "--nlist sets the faiss element index"),
])
def test_option_checks_refuse_bad_values(call, message):
    with pytest.raises(MaxMatchError, match=message.replace(".", r"\.").replace("+", r"\+")):
        call()
    check_depth(None, None), check_depth(1, 1), check_nlist(None), check_nlist(8, 8)  # the good ones pass
