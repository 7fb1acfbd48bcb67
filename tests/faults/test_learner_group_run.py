"""A learner group of 2 ranks (gloo) through the real driver (`controller.driver.train`) on a local Ray
cluster: the reward server and pool, two simulated rollout workers, the project's Redis under a key prefix
of the test's own, the pocket model (untrained). Rank 1 is killed in the update of iteration 1 (before its
first gradient sum; rank 0 has pulled and acks nothing yet): the group restarts from the newest checkpoint
(the driver sees rank 0 restart and makes the call again), and a --resume continues the finished run.

Counted from independent sources: the sampler's task ids, Redis' applied set and counters, the
checkpoints' applied ids and metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the drills modules, also on the Ray processes' PYTHONPATH (below)

from drill_learner import DrillLearner  # noqa: E402
from drills import arm, armed  # noqa: E402

from controller.config import load_config  # noqa: E402
from controller.driver import train  # noqa: E402
from controller.task_sampler import TaskSampler, load_prompts  # noqa: E402
from replay import open_store  # noqa: E402
from rollout_workers.simulated import FIXED_COST_REWARD, SimulatedRolloutWorker, preset_geometry  # noqa: E402
from tests.conftest import REDIS_URL  # noqa: E402

GROUPS = 2  # per iteration: one for each rank


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(HERE))
        ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def _config(weights: Path, prefix: str, iterations: int):
    return load_config(None, [
        f"run.iterations={iterations}", "run.checkpoint_every=1", "run.eval_every=0", "run.eval_prompts_limit=2",
        "run.num_learners=2", f"algorithm.groups_per_iteration={GROUPS}", "algorithm.group_size=4",
        "algorithm.anchors_per_group=2", "algorithm.updates_per_iteration=1", "lora.rank=2", "lora.alpha=4",
        f"policy.transformer_checkpoint={weights}", "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5",
        f"reward.model={FIXED_COST_REWARD}", "reward.options={cost_s: 0.0}", "reward.num_actors=1",
        "reward.batch_size=4", "reward.timeout_s=60", f"replay.url='{REDIS_URL}?prefix={prefix}'",
    ])


def _applied_by_checkpoints(output: Path) -> list[str]:
    ids = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        ids.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    return ids


def test_a_learner_rank_killed_mid_update_restarts_the_group_and_a_resume_continues(
        ray_cluster, untrained_pocket_weights, redis_prefix, tmp_path):
    output = tmp_path / "group"
    config = _config(untrained_pocket_weights, redis_prefix, 2)
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    ids = [[t.group_id for t in sampler.tasks(i, GROUPS)] for i in range(3)]
    drill_dir = output / "drills"
    seen = {}

    def on_iteration(system, row):
        seen[row["iteration"]] = system.learner_restarts
        if row["iteration"] == 0:
            arm(drill_dir, "learner-rank1-in-update", 1)

    worker_kwargs = {"compute_s": 0.05, "geometry": preset_geometry("pocket")}
    rows = train(config, output, on_iteration=on_iteration, worker_cls=SimulatedRolloutWorker,
                 worker_kwargs=worker_kwargs, learner_cls=DrillLearner)
    assert armed(drill_dir) == []  # rank 1 died
    assert seen == {0: 0, 1: 1}  # the group restarted once, restored checkpoint 1, made update 1 again
    assert [r["policy_version"] for r in rows] == [1, 2] and [r["groups"] for r in rows] == [GROUPS, GROUPS]

    # --resume with one more iteration: continues from checkpoint 2 on a new group.
    rows = train(_config(untrained_pocket_weights, redis_prefix, 3), output, resume=True,
                 worker_cls=SimulatedRolloutWorker, worker_kwargs=worker_kwargs, learner_cls=DrillLearner)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["policy_version"] == 3
    every = sorted(g for row in ids for g in row)
    applied = _applied_by_checkpoints(output)
    assert sorted(applied) == every and len(set(applied)) == len(applied)  # each group applied exactly once
    with open_store(f"{REDIS_URL}?prefix={redis_prefix}") as store:
        stats = store.stats()
        assert all(store.is_applied(g) for g in every)
    assert (stats.acked, stats.queue_length, stats.pending, stats.dead_letters) == (len(every), 0, 0, 0)
    assert sorted((output / "checkpoints").glob("iter_*"))[-1].name.endswith("3")
