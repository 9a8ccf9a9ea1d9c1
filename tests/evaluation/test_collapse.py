"""circular_variance against hand values."""

from __future__ import annotations

import pytest
import torch

from maxmatch_cli.evaluation.collapse import circular_variance
from maxmatch_cli.errors import MaxMatchError


def test_identical_elements_give_zero():
    v = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(0))
    sets = v.expand(3, 4, 8) * torch.tensor([1.0, 2.0, 0.5, 7.0]).view(1, 4, 1)  # scale does not matter
    torch.testing.assert_close(circular_variance(sets), torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_orthonormal_elements_give_one_minus_one_over_k(k):
    q, _ = torch.linalg.qr(torch.randn(10, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    sets = (q.t() * 3.0).unsqueeze(0)  # (1, K, 10), orthogonal rows of norm 3
    torch.testing.assert_close(circular_variance(sets), torch.tensor([1 - 1 / k], dtype=torch.float64))


def test_opposite_pair_and_loop_reference():
    sets = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    torch.testing.assert_close(circular_variance(sets), torch.tensor([1.0]))
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    expected = []
    for s in x:
        unit = [e / e.norm() for e in s]
        m = sum(unit) / len(unit)
        expected.append(1 - float(m @ m))
    torch.testing.assert_close(circular_variance(x), torch.tensor(expected))


def test_shape_errors():
    with pytest.raises(MaxMatchError):
        circular_variance(torch.zeros(3, 4))
    with pytest.raises(MaxMatchError):
        circular_variance(torch.zeros(3, 0, 4))
