"""Reducers (method/reducers.py): per-direction reductions, directions summed or averaged, "none" keeps terms."""

from __future__ import annotations

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method import reducers

TERMS = [torch.tensor([1.0, 2.0, 6.0]), torch.tensor([0.5, 0.0, 2.5])]


@pytest.mark.parametrize("name,expected_sum", [("sum", 12.0), ("mean", 4.0)])
def test_directions_summed_or_averaged(name, expected_sum):
    reduce = reducers.reduction(name)
    assert reducers.sum_directions(TERMS, reduce).item() == expected_sum
    assert reducers.mean_directions(TERMS, reduce).item() == expected_sum / 2
    assert reducers.sum_directions(TERMS[:1], reduce).item() == {"sum": 9.0, "mean": 3.0}[name]


def test_none_keeps_the_per_query_terms():
    assert reducers.reduction("none") is None
    assert torch.equal(reducers.sum_directions(TERMS, None), torch.stack(TERMS))
    assert reducers.mean_directions(TERMS[1:], None) is TERMS[1]


def test_unknown_reduction_names_the_choices():
    with pytest.raises(MaxMatchError, match="unknown reduction 'max'") as err:
        reducers.reduction("max")
    assert "sum, mean, none" in err.value.hint
