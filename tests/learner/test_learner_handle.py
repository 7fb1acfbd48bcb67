"""The driver's typed learner calls (controller.learner_handle) against a real Ray actor: a call that
met an unreachable replay store is made again; a restart that restored the call's starting point is
called again; one that restored an older checkpoint raises LearnerRestored with its position."""

from __future__ import annotations

import os
import sys

import pytest
import ray
from ray import cloudpickle

from controller.learner_handle import LearnerHandle, LearnerRestored
from learner.messages import LearnerStatus, UpdateStats
from replay import ReplayUnavailableError


# The Ray worker processes cannot import this test module: send the stand-in's code along.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ScriptedLearner:
    """Stands in for the learner actor: its position survives a restart in a file (as a checkpoint
    would), and each call can be told to fail once, the way the real learner fails."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.iteration = int(self._read("checkpoint", "0"))

    def _read(self, name: str, default: str) -> str:
        path = os.path.join(self.root, name)
        return open(path).read() if os.path.exists(path) else default

    def _fail_once(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if not os.path.exists(path):
            return ""
        kind = open(path).read()
        os.remove(path)
        return kind

    def status(self) -> LearnerStatus:
        return LearnerStatus(iteration=self.iteration, version=self.iteration)

    def train_from_buffer(self, num_groups: int) -> UpdateStats:
        kind = self._fail_once("fail")
        if kind == "store":
            raise ReplayUnavailableError("the store is down")
        if kind == "die":
            os._exit(1)
        self.iteration += 1
        return UpdateStats(groups=num_groups, groups_without_signal=0, loss=0.5, grad_norm=1.0, group_reward_means={},
                           policy_version=self.iteration, update_s=0.0)


@pytest.fixture
def handle(ray_local, tmp_path):
    (tmp_path / "replay").mkdir()
    actor = ray.remote(ScriptedLearner).options(num_cpus=0, max_restarts=2, max_task_retries=0).remote(str(tmp_path))
    return LearnerHandle(actor, tmp_path, (tmp_path / "replay").as_uri(), restart_timeout_s=60), tmp_path


def test_a_call_is_made_again_after_a_store_outage_and_a_restart_at_the_same_iteration(handle):
    learner, root = handle
    (root / "fail").write_text("store")
    stats = learner.train_from_buffer(3)
    assert (stats.groups, stats.policy_version, learner.iteration, learner.version) == (3, 1, 1, 1)
    assert learner.store_waits == 1 and learner.restarts == 0
    (root / "checkpoint").write_text("1")  # the restarted learner comes back where the call found it
    (root / "fail").write_text("die")
    assert learner.train_from_buffer(2).policy_version == 2
    assert learner.restarts == 1 and (learner.iteration, learner.version) == (2, 2)


def test_a_restart_to_an_older_checkpoint_tells_the_driver_where_to_continue(handle):
    learner, root = handle
    for _ in range(3):
        learner.train_from_buffer(1)
    (root / "checkpoint").write_text("2")  # the update of iteration 3 is lost with the process
    (root / "fail").write_text("die")
    with pytest.raises(LearnerRestored, match="during train_from_buffer and restored iteration 2") as caught:
        learner.train_from_buffer(1)
    assert (caught.value.iteration, caught.value.version, learner.restarts) == (2, 2, 1)
    learner.resync(caught.value)
    assert learner.train_from_buffer(1).policy_version == 3 and learner.status().iteration == 3
