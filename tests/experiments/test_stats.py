"""Aggregation over seeds against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.stats import curve, mean_spread, raises, spearman, start_end, window_mean


def test_mean_spread_is_the_mean_and_sample_std_over_seeds():
    s = mean_spread([1.0, 2.0, 4.0])
    assert s.n == 3
    assert s.mean == pytest.approx(7 / 3)
    # ((1 - 7/3)^2 + (2 - 7/3)^2 + (4 - 7/3)^2) / (3 - 1) = (16/9 + 1/9 + 25/9) / 2 = 7/3
    assert s.spread == pytest.approx(math.sqrt(7 / 3))
    assert s.standard_error == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert s.fmt() == "2.333 ± 1.528"


def test_mean_spread_skips_missing_values_and_has_no_spread_for_one_seed():
    s = mean_spread([float("nan"), 0.5, None])
    assert (s.mean, s.n) == (0.5, 1) and math.isnan(s.spread)
    assert s.fmt() == "0.500"
    assert mean_spread([]).fmt() == "n/a"


def _rows(values, key="reward_mean", start=0):
    return [{"iteration": start + i, key: v} for i, v in enumerate(values)]


def test_curve_aligns_seeds_by_iteration():
    runs = [_rows([1.0, 2.0, 3.0]), _rows([3.0, 4.0]) + [{"iteration": 2}]]  # seed 2 lacks the key at iteration 2
    c = curve(runs, "reward_mean")
    assert c.iterations.tolist() == [0, 1, 2]
    assert c.mean.tolist() == [2.0, 3.0, 3.0]
    assert c.n.tolist() == [2, 2, 1]
    assert c.spread[0] == pytest.approx(math.sqrt(2.0))  # std of {1, 3}, ddof 1
    assert math.isnan(c.spread[2])


def test_start_end_averages_a_window_at_each_end_per_seed():
    runs = [_rows([0.0, 1.0, 2.0, 3.0, 4.0]), _rows([1.0, 1.0, 1.0, 1.0, 5.0])]
    assert window_mean(runs[0], "reward_mean", 2, at_end=False) == 0.5
    assert window_mean(list(reversed(runs[0])), "reward_mean", 2, at_end=True) == 3.5  # order of rows does not matter
    start, end, change = start_end(runs, "reward_mean", 2)
    assert start.mean == pytest.approx((0.5 + 1.0) / 2)
    assert end.mean == pytest.approx((3.5 + 3.0) / 2)
    assert change.mean == pytest.approx((3.0 + 2.0) / 2)
    assert change.spread == pytest.approx(np.std([3.0, 2.0], ddof=1))


def test_a_rise_is_a_positive_mean_beyond_two_standard_errors():
    assert raises(mean_spread([0.10, 0.12, 0.11]))
    assert not raises(mean_spread([0.3, -0.2, 0.05]))  # positive mean, within the noise
    assert not raises(mean_spread([-0.1, -0.2, -0.15]))
    assert raises(mean_spread([0.01])) and not raises(mean_spread([-0.01]))


def test_spearman_matches_hand_ranks():
    scales = [0.0, 0.4, 0.5, 0.6, 0.8, 1.0]
    assert spearman(scales, [1, 2, 3, 4, 5, 6]) == pytest.approx(1.0)
    assert spearman(scales, [6, 5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # y ranks 0, 2, 1, 3, 5, 4: d = 0, 1, 1, 0, 1, 1 -> 1 - 6 * 4 / (6 * 35) = 31/35
    assert spearman(scales, [0.1, 0.3, 0.2, 0.4, 0.9, 0.5]) == pytest.approx(31 / 35)
    assert math.isnan(spearman(scales, [1.0] * 6))
