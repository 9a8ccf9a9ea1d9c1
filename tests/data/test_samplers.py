"""The resumable, rank-split epoch sampler."""

from maxmatch_cli.data.samplers import EpochSampler


def test_epoch_sampler_resume_and_ranks():
    full = list(EpochSampler(50, 4, seed=3))
    assert len(full) == 48 and len(set(full)) == 48
    resumed = EpochSampler(50, 4, seed=3)
    resumed.set_epoch(0, start_step=5)
    assert list(resumed) == full[20:]
    # Two ranks together cover the same global batches as one process with the doubled batch.
    one = EpochSampler(50, 8, seed=3)
    r0, r1 = EpochSampler(50, 4, seed=3, rank=0, world_size=2), EpochSampler(50, 4, seed=3, rank=1, world_size=2)
    assert sorted(list(r0) + list(r1)) == sorted(one)
    other = EpochSampler(50, 4, seed=3)
    other.set_epoch(1)
    assert list(other) != full
