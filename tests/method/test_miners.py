"""Miners (method/miners.py): directions, the same-image masks and the negative miners, against Python loops."""

from __future__ import annotations

import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.method import miners

IDS = torch.tensor([0, 1, 1, 2])


def _scores(n=4, m=None, seed=0):
    return torch.randn(n, m or n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_same_image_mask_marks_equal_ids():
    mask = miners.same_image_mask(IDS, torch.tensor([1, 2]))
    assert mask.tolist() == [[False, False], [True, False], [True, False], [False, True]]


def test_directions_view_queries_as_rows():
    sims = _scores(4, 4)
    pos = miners.same_image_mask(IDS, IDS)
    (i2t,) = miners.queries(sims, pos, "i2t", None)
    (t2i,) = miners.queries(sims, pos, "t2i", torch.tensor([3, 2, 1, 0]))
    assert torch.equal(i2t.scores, sims) and i2t.pos_index.tolist() == [0, 1, 2, 3]
    assert torch.equal(t2i.scores, sims.t()) and torch.equal(t2i.positives, pos.t())
    assert t2i.pos_index.tolist() == [3, 2, 1, 0]
    # "both" with a permutation: row i's positive is column p[i], so column j's positive is row p^-1[j].
    first, second = miners.queries(sims, None, "both", torch.tensor([2, 0, 3, 1]))
    assert first.pos_index.tolist() == [2, 0, 3, 1] and second.pos_index.tolist() == [1, 3, 0, 2]
    assert list(miners.DIRECTIONS) == ["i2t", "t2i", "both"]
    with pytest.raises(MaxMatchError, match="unknown direction 'up'"):
        miners.queries(sims, None, "up", None)


def test_masks_keep_same_image_candidates_out_of_the_negatives():
    (q,) = miners.queries(_scores(), miners.same_image_mask(IDS, IDS), "i2t", None)
    not_negative = miners.not_negative(q)
    others = miners.other_positives(q)
    for i in range(4):
        for j in range(4):
            assert bool(not_negative[i, j]) == (i == j or bool(IDS[i] == IDS[j]))
            assert bool(others[i, j]) == (i != j and bool(IDS[i] == IDS[j]))
    torch.testing.assert_close(miners.positive_scores(q), q.scores.diagonal())


@pytest.mark.parametrize("name", ["hardest", "all", "mean"])
def test_negative_miners_match_loops(name):
    cost = _scores(seed=1).clamp(min=0)  # hinge costs are >= 0
    excluded = miners.same_image_mask(IDS, IDS)
    excluded[0] = True  # a query without negatives gets 0
    got = miners.NEGATIVE_MINERS[name](cost, excluded)
    for i in range(4):
        negatives = [float(cost[i, j]) for j in range(4) if not excluded[i, j]]
        expected = {"hardest": max(negatives, default=0.0), "all": sum(negatives),
                    "mean": sum(negatives) / max(len(negatives), 1)}[name]
        assert got[i].item() == pytest.approx(expected, rel=1e-12)


def test_negative_miner_follows_the_loss_options():
    assert miners.negative_miner(hardest=True, average=True) is miners.hardest_negative
    assert miners.negative_miner(hardest=False) is miners.all_negatives
    assert miners.negative_miner(hardest=False, average=True) is miners.mean_negative
