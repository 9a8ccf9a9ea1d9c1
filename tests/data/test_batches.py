"""Padding regions and token ids into batches, with their masks."""

import numpy as np

from maxmatch_cli.data.batches import pad_regions, pad_tokens


def test_padding_masks():
    feats, mask = pad_regions([np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)])
    assert feats.shape == (2, 4, 3) and mask.sum().item() == 6 and feats[0, 2:].abs().sum() == 0
    tokens, tmask = pad_tokens([[1, 2], [1, 2, 3]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 0], [1, 2, 3]] and tmask.tolist() == [[True, True, False], [True] * 3]
