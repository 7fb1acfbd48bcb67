"""The driver's iteration (controller.driver.train_iteration) against a recording stand-in of the
system: the calls Algorithm 1 makes, in order, for each mode and `algorithm.max_policy_lag`."""

from __future__ import annotations

import pytest

from controller.config import load_config
from controller.driver import train_iteration
from controller.task_sampler import TaskSampler
from learner.messages import UpdateStats
from rollout_workers.tasks import GroupSummary

ITERATIONS = 3


def _stats() -> UpdateStats:
    return UpdateStats(groups=2, groups_without_signal=0, loss=0.0, grad_norm=0.0, group_reward_means={},
                       policy_version=1, update_s=0.0)


class RecordingSystem:
    def __init__(self):
        self.calls = []

    def rollout(self, tasks, next_tasks=()):
        self.calls.append(("rollout", [t.group_id for t in tasks], [t.group_id for t in next_tasks]))
        return [GroupSummary(group_id=t.group_id, worker="w", prompt=t.prompt, pivot=t.pivot, policy_version=0, stored=True,
                             reward_means={}, num_valid=2, forward_passes=1, rollout_s=0, decode_s=0, reward_s=0, push_s=0)
                for t in tasks]

    def update_on_policy(self, n):
        self.calls.append(("update_on_policy", n))
        return _stats()

    def update_from_buffer(self, n):
        self.calls.append(("update_from_buffer", n))
        return _stats()

    def broadcast(self):
        self.calls.append(("broadcast",))


def _config(mode: str, lag: int):
    return load_config(None, [f"algorithm.mode={mode}", f"algorithm.max_policy_lag={lag}", "algorithm.groups_per_iteration=2",
                              f"run.iterations={ITERATIONS}"])


@pytest.mark.parametrize("lag", [0, 1])
def test_on_policy_iteration_is_rollout_update_broadcast_and_names_the_next_iterations_tasks(lag):
    config = _config("on_policy", lag)
    sampler = TaskSampler(config, ["a", "b", "c"], 4, "t")
    system = RecordingSystem()
    for i in range(ITERATIONS):
        train_iteration(system, sampler, config.algorithm, i)
    ids = lambda i: [t.group_id for t in sampler.tasks(i, 2)] if i < ITERATIONS else []  # noqa: E731
    expected = []
    for i in range(ITERATIONS):
        expected += [("rollout", ids(i), ids(i + 1)), ("update_on_policy", 2), ("broadcast",)]
    assert system.calls == expected  # the last iteration names no next tasks: nothing is made past the run


@pytest.mark.parametrize("mode", ["semi_on_policy", "off_policy"])
@pytest.mark.parametrize("lag", [0, 1])
def test_semi_on_policy_never_asks_for_rollouts_or_waits_for_them(mode, lag):
    config = _config(mode, lag)
    system = RecordingSystem()
    for i in range(ITERATIONS):
        stats, summaries = train_iteration(system, TaskSampler(config, ["a"], 4, "t"), config.algorithm, i)
        assert summaries == []
    assert system.calls == [("update_from_buffer", 2)] * ITERATIONS
