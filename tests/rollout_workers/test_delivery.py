"""A scored group reaches the queue or the reference buffer once, and too few valid rewards drop it."""

from __future__ import annotations

import math

import torch

from replay.local_store import LocalStore
from replay.synthetic import synthetic_group
from rollout_workers.delivery import deliver_group, valid_reward_means


def test_groups_go_where_the_task_says_once_each(tmp_path):
    store = LocalStore(tmp_path)
    group = synthetic_group(seed=1, group_id="g1")
    group.reward_valid[:] = True
    assert deliver_group(store, group, "queue", min_valid=2) == (True, "")
    assert deliver_group(store, group, "buffer", min_valid=2) == (True, "")
    assert deliver_group(store, group, "buffer", min_valid=2) == (False, "already in the buffer")
    stats = store.stats()
    assert (stats.queue_length, stats.buffer_size) == (1, 1)


def test_a_group_with_too_few_valid_rewards_is_dropped_and_means_skip_invalid_branches(tmp_path):
    store = LocalStore(tmp_path)
    group = synthetic_group(seed=2, group_size=4)
    group.reward_valid[:] = torch.tensor([True, False, False, False])
    assert deliver_group(store, group, "queue", min_valid=2) == (False, "only 1 valid rewards (< 2)")
    assert store.stats().queue_length == 0
    means = valid_reward_means(group, ("VQ", "TA"))
    assert means["TA"] == float(group.rewards["TA"][0])
    group.reward_valid[:] = False
    assert all(math.isnan(v) for v in valid_reward_means(group, ("VQ",)).values())
