"""Per-sample isolation when a reward model fails on part of a batch (in-process, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from reward_service.base import RewardModel, Video
from reward_service.scoring import score_isolated
from toy_rewards import BrightnessReward, NanReward, RaisingReward, brightness


class BadShape(RewardModel):
    name, heads = "bad_shape", ("x",)

    def score(self, videos, prompts):
        return {"x": np.zeros(len(videos) + ("SHORT" in "".join(prompts)))}


class Infinite(RewardModel):
    name, heads = "infinite", ("y",)

    def score(self, videos, prompts):
        return {"y": np.array([np.inf if "INF" in p else 2.0 for p in prompts])}


def _videos(n):
    rng = np.random.default_rng(7)
    return [Video(rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), 4.0) for _ in range(n)]


def test_one_failing_sample_does_not_invalidate_the_batch():
    videos = _videos(5)
    prompts = ["a", "RAISE", "NAN", "INF", "SHORT"]
    models = [BrightnessReward(), RaisingReward(), NanReward(), Infinite(), BadShape()]
    results = score_isolated(models, videos, prompts, scored_by="here")
    assert [r.valid for r in results] == [True, False, False, False, False]
    assert results[1].reason == "exception: toy_raising raised ValueError: marked sample in the batch"
    assert results[2].reason == "non_finite: toy_nan head peak returned nan"
    assert results[3].reason == "non_finite: infinite head y returned inf"
    assert results[4].reason == "bad_output: bad_shape raised RewardOutputError: bad_shape head 'x' has shape (2,), expected (1,)"
    for r, v in zip(results, videos):
        np.testing.assert_allclose([r.scores[h] for h in "RGB"], brightness(v))
        assert r.scored_by == "here"
    assert results[0].scores == {**results[0].scores, "ok": 1.0, "y": 2.0, "x": 0.0}
    assert np.isnan(results[4].scores["x"]) and np.isnan(results[1].scores["ok"])


def test_two_rewards_may_not_share_a_head():
    with pytest.raises(ValueError, match="head 'R' of reward 'toy_brightness'"):
        score_isolated([BrightnessReward(), BrightnessReward()], _videos(1), ["a"])


class Explains(RewardModel):
    """NaN for "SKIP" samples, saying why in last_errors; raises for a batch holding "RAISE"."""

    name, heads = "explains", ("z",)

    def score(self, videos, prompts):
        if len(prompts) > 1 and any("RAISE" in p for p in prompts):
            raise ValueError("batch refused")
        self.last_errors = {i: f"skipped {p}" for i, p in enumerate(prompts) if "SKIP" in p}
        return {"z": np.array([np.nan if "SKIP" in p else 1.0 for p in prompts])}


def test_a_models_own_reason_for_a_nan_is_reported_at_the_right_sample():
    results = score_isolated([Explains()], _videos(3), ["a", "SKIP-1", "b"])
    assert [r.valid for r in results] == [True, False, True]
    assert results[1].reason == "unscored: explains: skipped SKIP-1"
    # After a failed batch the samples are re-scored one by one: index 0 of each call maps back.
    results = score_isolated([Explains()], _videos(3), ["RAISE", "b", "SKIP-2"])
    assert [r.valid for r in results] == [True, True, False]
    assert results[2].reason == "unscored: explains: skipped SKIP-2"
