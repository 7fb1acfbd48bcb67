"""The fork-spread diagnostic on the shipped generator: zero when a fork changes nothing."""

from __future__ import annotations

import pytest

from pocket import domain, load_pocket_policy
from experiments.pocket_studies.fork_spread import fork_spread
from reward_service import build_reward


@pytest.fixture(scope="module")
def policy():
    return load_pocket_policy()


def test_an_unperturbed_fork_has_no_spread_and_a_renoise_fork_has_some(policy):
    spread = fork_spread(policy, build_reward("pocket"), domain.train_prompts(), groups=2, group_size=3, sigma=0.0)
    assert set(spread) == {"initial_noise", "renoise"}
    assert set(spread["initial_noise"]) == {"VQ", "MQ", "TA", "sum"}
    # s = 0: every branch gets the same initial noise, so the videos (and rewards) are identical up to
    # rounding: branches rolled out in one batch differ in the last bits on some CPUs (x0 by up to 7e-6,
    # reward std ~2e-7 seen on one; exactly equal one branch at a time)
    assert spread["initial_noise"] == pytest.approx({"VQ": 0.0, "MQ": 0.0, "TA": 0.0, "sum": 0.0}, abs=1e-5)
    # re-noise forks draw new noise at the pivot chunk's intermediate steps: the videos differ (~0.02)
    assert spread["renoise"]["sum"] > 1e-3


def test_a_fixed_pivot_is_checked_and_forks_there(policy):
    reward, prompts = build_reward("pocket"), domain.train_prompts()
    with pytest.raises(ValueError, match="pivot 4 outside"):
        fork_spread(policy, reward, prompts, groups=1, group_size=2, pivot=4)
    # forked at the last chunk, a re-noise fork still changes that chunk's frames, so the rewards spread;
    # an unperturbed initial-noise fork at that chunk does not
    spread = fork_spread(policy, reward, prompts, groups=1, group_size=3, sigma=0.0, pivot=policy.num_chunks - 1)
    assert spread["initial_noise"]["sum"] == pytest.approx(0.0, abs=1e-5)
    assert spread["renoise"]["sum"] > 1e-4
