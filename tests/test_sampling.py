from __future__ import annotations

import numpy as np
import pytest

from cellkit.data.sampling import RepeatFactorSampler, repeat_factors


def test_repeat_factors_follow_lvis_rule() -> None:
    # class 1 in every image, class 3 in 1 of 10 images
    presence = np.zeros((10, 4), bool)
    presence[:, 0] = True
    presence[0, 2] = True
    f = repeat_factors(presence, threshold=0.4)
    assert f[0] == pytest.approx(np.sqrt(0.4 / 0.1))  # = 2
    assert (f[1:] == 1).all()
    assert repeat_factors(np.zeros((3, 4), bool), 0.4).tolist() == [1, 1, 1]


def test_sampler_repeats_on_average_and_changes_per_epoch() -> None:
    factors = np.array([1.0, 1.0, 2.5, 1.3])
    s = RepeatFactorSampler(factors, seed=1)
    counts = np.zeros(4)
    draws = set()
    for epoch in range(400):
        s.set_epoch(epoch)
        idx = list(s)
        assert len(idx) == len(s)
        counts += np.bincount(idx, minlength=4)
        draws.add(tuple(idx))
    np.testing.assert_allclose(counts / 400, factors, atol=0.08)
    assert len(draws) > 50


def test_sampler_shards_across_ranks() -> None:
    factors = np.array([1.0, 2.0, 1.0, 1.5, 1.0])
    shards = [RepeatFactorSampler(factors, seed=3, num_replicas=2, rank=r) for r in range(2)]
    full = RepeatFactorSampler(factors, seed=3)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b)
    merged = sorted(a + b)
    base = sorted(full)
    # the shards cover the epoch's draw, padded by at most one repeated entry
    assert len(merged) - len(base) in (0, 1)
    assert sorted(set(merged)) == sorted(set(base))
