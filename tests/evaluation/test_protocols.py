"""Protocols: which one a split gets, and the metrics a similarity matrix gets under it."""

import numpy as np
import pytest
import torch

from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.evaluation.protocols import metrics_for, resolve_protocol


def test_resolve_protocol():
    assert resolve_protocol("auto", 5000) == "coco5k" and resolve_protocol("auto", 1000) == "full"
    assert resolve_protocol("coco1k", 5000, "testall") == "coco1k"
    assert resolve_protocol("full", 5000) == "full"
    for n in (1000, 4000, 10000):
        with pytest.raises(MaxMatchError, match=f"split 'test' has {n:,} images") as info:
            resolve_protocol("coco5k", n, "test")
        assert "--protocol full" in info.value.hint
    with pytest.raises(MaxMatchError, match="unknown protocol 'COCO5K'") as info:
        resolve_protocol("COCO5K", 5000)
    assert info.value.hint == "use one of: auto, full, coco1k, coco5k, eccv, cxc"


def test_metrics_for_refuses_coco1k_folds_of_another_size():
    sims = torch.from_numpy(np.random.default_rng(0).standard_normal((1000, 5000)).astype(np.float32))
    with pytest.raises(MaxMatchError, match="has 1,000 images"):
        metrics_for(sims, "coco1k", 5)
    assert metrics_for(sims, "full", 5).protocol == "full"
