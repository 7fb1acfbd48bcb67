"""A data-parallel learner group on gloo (rank 0 an actor on a local Ray cluster, rank 1 its child):
one update (two optimiser steps, micro-batched) on the same 8 groups gives the adapter one learner gives
(the in-process `Learner` on its own store), within 1e-5 relative: the second step's gradient is taken on
each rank's own replica, so a replica that drifted, or anchors drawn out of step, would show. The
statistics agree too."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from controller.config import load_config
from learner.learner_actor import Learner
from pocket import domain
from reward_service.result import RewardResult
from rollout_workers.delivery import deliver_group
from rollout_workers.produce import produce_group
from rollout_workers.tasks import RolloutTask

HEADS = ("VQ", "MQ", "TA")
GROUPS = 8
SETTINGS = ["lora.rank=4", "lora.alpha=8", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
            "algorithm.updates_per_iteration=2", "algorithm.micro_batch_size=3", "algorithm.learning_rate=1e-3",
            f"algorithm.groups_per_iteration={GROUPS}"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def _settings(num_learners: int) -> dict:
    return load_config(None, SETTINGS + [f"run.num_learners={num_learners}"]).learner_settings().model_dump(mode="json")


def _groups(learner: Learner, iteration: int) -> list:
    """8 groups (different prompts, pivots, some with an invalid branch) from the learner's current policy."""
    rng = np.random.default_rng(iteration)
    groups = []
    for i in range(GROUPS):
        score = lambda videos, prompts: [RewardResult({h: float(rng.normal()) for h in HEADS}, j != i % 5,  # noqa: E731
                                                      None if j != i % 5 else "dropped by the test")
                                         for j, _ in enumerate(videos)]
        task = RolloutTask(group_id=f"it{iteration}-g{i}", prompt=domain.train_prompts()[i], noise_seed=10 * iteration + i,
                           pivot=i % 2, group_size=4, sigma=0.5, adapter_name=learner.adapter)
        groups.append(produce_group(learner.policy, task, learner.version, score, HEADS).group)
    return groups


def _relative_difference(a: dict, b: dict, base: dict) -> float:
    moved = torch.cat([(b[k] - base[k]).flatten() for k in sorted(base)])
    diff = torch.cat([(a[k] - b[k]).flatten() for k in sorted(base)])
    return float(diff.norm() / moved.norm())


def test_two_learners_on_gloo_make_the_one_learner_update(two_cpu_ray, tmp_path):
    single = Learner(_settings(1), (tmp_path / "single_store").as_uri(), str(tmp_path / "single"))
    group = ray.remote(Learner).options(num_cpus=1).remote(_settings(2), (tmp_path / "group_store").as_uri(),
                                                            str(tmp_path / "group"))
    start = single.adapter_state()
    assert _relative_difference(ray.get(group.adapter_state.remote()), start, {k: 0 * v for k, v in start.items()}) == 0
    for iteration in range(1):
        before = single.adapter_state()
        groups = _groups(single, iteration)
        for g in groups:
            assert deliver_group(single.store, g, "queue", 2)[0]
        with __import__("replay").open_store((tmp_path / "group_store").as_uri()) as store:
            for g in groups:
                assert deliver_group(store, g, "queue", 2)[0]
        one = single.train_on_policy(GROUPS, timeout_s=30)
        two = ray.get(group.train_on_policy.remote(GROUPS, 30))
        assert one.groups == two.groups == GROUPS and one.groups_without_signal == two.groups_without_signal == 0
        assert one.nonfinite_steps == two.nonfinite_steps == 0
        after_one, after_two = single.adapter_state(), ray.get(group.adapter_state.remote())
        assert _relative_difference(after_two, after_one, before) < 1e-5, iteration
        assert two.loss == pytest.approx(one.loss, rel=1e-5)
        assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
        assert two.clip_fraction == pytest.approx(one.clip_fraction, abs=1e-9)
        assert two.ratio_max_deviation == pytest.approx(one.ratio_max_deviation, rel=1e-4)
        assert two.policy_version == one.policy_version == iteration + 1
    ray.kill(group)
