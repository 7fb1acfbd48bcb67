"""Multi-reward combination and group advantages against plain-Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward_service.multi_reward import combine, count_valid, group_advantages

WEIGHTS = {"VQ": 1.0, "MQ": 0.5, "TA": 2.0}


def _loop_normalise(values, valid, eps=1e-8):
    kept = [v for v, ok in zip(values, valid) if ok]
    if len(kept) < 2 or max(kept) == min(kept):
        return [0.0] * len(values)
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    return [(v - mean) / (std + eps) if ok else 0.0 for v, ok in zip(values, valid)]


def _scores(g=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"VQ": rng.normal(3, 2, g), "MQ": rng.normal(1, 0.1, g), "TA": rng.normal(2, 5, g)}


def test_combine_is_the_weighted_sum_of_the_named_heads():
    s = _scores()
    want = [sum(w * s[h][i] for h, w in WEIGHTS.items()) for i in range(6)]
    np.testing.assert_allclose(combine(s, WEIGHTS), want, rtol=1e-14)
    np.testing.assert_allclose(combine(s, {"MQ": 1.0}), s["MQ"])
    with pytest.raises(KeyError, match="'Overall'"):
        combine(s, {"Overall": 1.0})


def test_weighted_sum_and_per_head_modes_against_loops_with_invalid_samples():
    s = _scores()
    s["VQ"][2] = np.nan  # invalid samples may hold NaN: they take no part
    valid = np.array([True, True, False, True, False, True])
    combined = [sum(w * s[h][i] for h, w in WEIGHTS.items()) for i in range(6)]
    np.testing.assert_allclose(group_advantages(s, WEIGHTS, valid, "weighted_sum"), _loop_normalise(combined, valid), atol=1e-12)
    per_head = {h: _loop_normalise(list(s[h]), valid) for h in WEIGHTS}
    want = [sum(w * per_head[h][i] for h, w in WEIGHTS.items()) for i in range(6)]
    got = group_advantages(s, WEIGHTS, valid, "per_head")
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[2] == 0.0 and got[4] == 0.0
    # per_head differs from weighted_sum: the wide TA head no longer dominates
    assert not np.allclose(got, group_advantages(s, WEIGHTS, valid, "weighted_sum"))
    assert count_valid(valid) == 4


def test_several_groups_use_the_population_std_and_carry_no_preference_without_spread():
    s = {h: np.stack([_scores(seed=k)[h] for k in range(4)]) for h in WEIGHTS}  # [N=4, G=6]
    valid = np.ones((4, 6), dtype=bool)
    valid[1, :5] = False  # one valid sample: no preference
    s["TA"][2] = 0.0
    s["VQ"][2], s["MQ"][2] = 1.0, 4.0  # every candidate of group 2 combines to the same reward
    ours = group_advantages(s, WEIGHTS, valid)
    combined = combine(s, WEIGHTS)
    for n in (0, 3):
        want = (combined[n] - combined[n].mean()) / (combined[n].std(ddof=0) + 1e-8)
        np.testing.assert_allclose(ours[n], want, rtol=1e-12)
    assert (ours[1] == 0).all() and (ours[2] == 0).all()


def test_bad_inputs_are_rejected():
    s = _scores()
    with pytest.raises(ValueError, match="marked valid contain NaN"):
        group_advantages({**s, "MQ": np.full(6, np.nan)}, WEIGHTS)
    with pytest.raises(ValueError, match="mode must be one of"):
        group_advantages(s, WEIGHTS, mode="max")
    with pytest.raises(KeyError, match="'XX'"):
        group_advantages(s, {"XX": 1.0}, mode="per_head")
