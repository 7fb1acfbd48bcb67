"""Faults with pipelining on (`algorithm.max_policy_lag=1`): a rollout worker killed while it makes a
group of the next iteration during the update, and the learner killed in an update whose newest
checkpoint is older, while the next iteration's groups are in flight. Every group is still applied
exactly once.

The real driver, fleet, reward server and pool, learner (pocket model) and Redis store; simulated
rollout workers. Drills (drills.py), armed before the run:

    it  drill                                                   what must hold
    1   a worker dies before pushing group 0 of iteration 1,    the fleet, pumped during update 0,
        a task handed out early, during update 0                runs the task again, same id
    3   the learner dies in update 3 (newest checkpoint: 2),    the driver abandons the tasks in
        iteration 4's tasks in flight                           flight and continues from iteration 2

Counted from independent sources: the sampler's task ids, the checkpoints' applied ids, Redis' counters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import ray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from drill_learner import DrillLearner  # noqa: E402
from drills import DrillRolloutWorker, arm, armed  # noqa: E402

from controller.config import load_config  # noqa: E402
from controller.driver import train  # noqa: E402
from controller.task_sampler import TaskSampler, load_prompts  # noqa: E402
from replay import open_store  # noqa: E402
from rollout_workers.simulated import FIXED_COST_REWARD, preset_geometry  # noqa: E402

REDIS_URL = os.environ.get("ARCOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ITERATIONS, GROUPS = 5, 2


@pytest.fixture
def ray_with_drills(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_pipelined_run_with_a_worker_and_the_learner_killed_applies_every_group_once(
        ray_with_drills, tmp_path, redis_prefix, untrained_pocket_weights):
    output, store_url = tmp_path / "run", f"{REDIS_URL}?prefix={redis_prefix}"
    drill_dir = output / "drills"
    config = load_config(None, [
        f"run.iterations={ITERATIONS}", "run.checkpoint_every=2", "run.eval_every=0", "run.eval_prompts_limit=1",
        f"algorithm.groups_per_iteration={GROUPS}", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
        "algorithm.updates_per_iteration=1", "algorithm.max_policy_lag=1", "lora.rank=2", "lora.alpha=4",
        f"policy.transformer_checkpoint={untrained_pocket_weights}", "rollout.num_workers=2",
        "rollout.num_cpus_per_worker=0.5", f"reward.model='{FIXED_COST_REWARD}'", "reward.num_actors=1",
        "reward.batch_size=4", "reward.timeout_s=60", f"replay.url='{store_url}'",
    ])
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    ids = [[t.group_id for t in sampler.tasks(i, GROUPS)] for i in range(ITERATIONS)]
    arm(drill_dir, "worker-before-push", ids[1][0])
    arm(drill_dir, "learner-in-update", 3)
    seen = []
    rows = train(config, output, on_iteration=lambda system, row: seen.append(
                     (row["iteration"], system.fleet.failures, system.learner_restarts)),
                 worker_cls=DrillRolloutWorker, learner_cls=DrillLearner,
                 worker_kwargs={"drill_dir": str(drill_dir), "compute_s": 0.2, "geometry": preset_geometry("pocket")})
    assert armed(drill_dir) == [], "every staged fault fired"
    # The worker died in iteration 1's early rollout (during update 0): seen as a failure by the end of iteration 1.
    assert [f for i, f, _ in seen if i == 1][0] >= 1
    # The learner restarted at iteration 3 to checkpoint 2: iterations 2 and 3 were redone.
    assert [i for i, _, _ in seen] == [0, 1, 2, 2, 3, 4] and seen[-1][2] == 1
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [r["policy_version"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert [r["groups"] for r in rows] == [GROUPS] * ITERATIONS and sum(r["groups_stale"] for r in rows) == 0
    expected = [g for batch in ids for g in batch]
    applied = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        applied.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    assert sorted(applied) == sorted(expected) and len(set(applied)) == len(applied)
    with open_store(store_url) as store:
        stats = store.stats()
        assert all(store.is_applied(g) for g in expected)
    assert stats.acked == len(expected) and stats.pending == 0 and stats.dead_letters == 0
