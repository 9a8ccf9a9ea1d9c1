"""The similarity table (similarity/registry.py): its members, option checks and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maxmatch_cli.method.similarity as similarity
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method.similarity import SIMILARITIES, SimilarityKind, list_similarities, set_similarity
from maxmatch_cli.method.similarity.base import positive_float

# The members documented in similarity/__init__.py, in table order. Adding a similarity without its table entry
# (or an entry without its file, its docs and this list) fails below.
KINDS = ["maxmatch", "chamfer", "mil", "topk", "sinkhorn"]
MACHINERY = ["base", "batched", "registry", "slabs"]


def test_registry():
    names = [name for name, _ in list_similarities()]
    assert names == KINDS == list(SIMILARITIES)
    assert all(description and "\n" not in description for _, description in list_similarities())


@pytest.mark.parametrize("kind,options,match", [
    ("maxmach", {}, "unknown similarity 'maxmach'.*did you mean 'maxmatch'"),
    ("chamfer", {"aplha": 3}, "unknown option 'aplha' for similarity 'chamfer'.*did you mean 'alpha'"),
    ("maxmatch", {"alpha": 16}, "unknown option 'alpha' for similarity 'maxmatch'"),
    ("mil", {"k": 2}, "unknown option 'k'"),
    ("chamfer", {"alpha": -1}, "alpha=-1 must be a positive number"),
    ("chamfer", {"alpha": float("nan")}, "alpha=nan"),
    ("sinkhorn", {"iters": 0}, "iters=0 must be a positive integer"),
    ("sinkhorn", {"iters": 2.5}, "iters=2.5"),
    ("topk", {"k": 0}, "k=0"),
    ("topk", {"k": 17}, r"outside 1\.\.16"),
    ("maxmatch", {"solver": "magic"}, "not an assignment solver"),
    ("mil", {"block_size": 0}, "block_size=0"),
])
def test_option_errors(kind, options, match):
    with pytest.raises(MaxMatchError, match=match) as err:
        set_similarity(torch.randn(2, 4, 3), torch.randn(2, 4, 3), kind, **options)
    assert err.value.hint


def test_the_table_lists_exactly_the_documented_members_one_file_each():
    assert list(SIMILARITIES) == KINDS
    folder = Path(similarity.__file__).parent
    members = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", *MACHINERY))
    assert members == sorted(KINDS)
    for name in KINDS:
        module = __import__(f"maxmatch_cli.method.similarity.{name}", fromlist=["KIND"])
        assert SIMILARITIES[name] is module.KIND
        assert f"``{name}.py``" in similarity.__doc__ and f"\n{name} " in similarity.__doc__
        assert getattr(similarity, f"{name}_score") is module.KIND.score


def test_every_option_has_a_default_and_a_check():
    for kind in SIMILARITIES.values():
        assert set(kind.defaults) == set(kind.checks)
    with pytest.raises(ValueError, match="every option a default and a check"):
        SimilarityKind("bad", "an option without its check", lambda c, beta=1.0: c.sum((-2, -1)), {"beta": 1.0})
    ok = SimilarityKind("ok", "one option", lambda c, beta=1.0: c.sum((-2, -1)), {"beta": 1.0},
                        {"beta": positive_float})
    assert ok.checks["beta"]("beta", 2) == 2.0


def test_recipes_accept_exactly_the_table():
    # The config stage sits below method/ and keeps its own list of kinds; this keeps the two in step.
    from maxmatch_cli.config.recipes import EvalConfig, LossConfig

    for kind in SIMILARITIES:
        assert LossConfig(similarity=kind).similarity == kind
        assert EvalConfig(similarity=kind).similarity == kind
    for config in (LossConfig, EvalConfig):
        with pytest.raises(MaxMatchError):
            config(similarity="not-a-similarity")
