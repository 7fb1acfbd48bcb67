"""Two drills through the real driver (`controller.driver.train`) on a local Ray cluster: the learner actor
(pocket model, untrained weights), the reward server and pool, two simulated rollout workers and the
project's Redis under a key prefix of the test's own.

1. Poison in a running run: the workers turn one group of each kind into one the codec accepts but
   the learner cannot use. The run finishes; each poison is quarantined with its reason (dead letter,
   counter, metric); every good group is applied exactly once; nothing poisoned is applied.
2. The store loses its data mid-run (every key under the run's prefix deleted after iteration 1, as a
   Redis restarted without persistence would): the run stops with StoreLostError at its next push,
   nothing is recreated in the store, nothing was applied twice; a --resume is refused the same way.
   Following the error's instructions (delete replay_epoch.json, --resume) the run finishes on the
   emptied store: its applied set is rebuilt from the checkpoints and every group is applied once.
3. The reward server's process is killed while iteration 1's groups are being scored: Ray restarts it,
   the workers' scoring calls are made again, no group is dropped and every group is applied once.

Counted from independent sources: the sampler's task ids, Redis' applied set, counters and dead
letters, the checkpoints' applied ids, metrics.jsonl and the driver's metrics facade."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import ray
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from poison_worker import POISONS, PoisonRolloutWorker  # noqa: E402

from controller.config import load_config  # noqa: E402
from controller.driver import train  # noqa: E402
from controller.task_sampler import TaskSampler, load_prompts  # noqa: E402
from replay import StoreLostError, open_store  # noqa: E402
from rollout_workers.simulated import FIXED_COST_REWARD, preset_geometry  # noqa: E402
from tests.conftest import REDIS_URL  # noqa: E402

GROUPS = 4  # per iteration


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(HERE))  # the poison worker's module, for the Ray worker processes
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def _config(weights: Path, prefix: str, iterations: int):
    return load_config(None, [
        f"run.iterations={iterations}", "run.checkpoint_every=1", "run.eval_every=0", "run.eval_prompts_limit=2",
        f"algorithm.groups_per_iteration={GROUPS}", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
        "algorithm.updates_per_iteration=1", "lora.rank=2", "lora.alpha=4", f"policy.transformer_checkpoint={weights}",
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5",
        f"reward.model={FIXED_COST_REWARD}", "reward.options={cost_s: 0.0}", "reward.num_actors=1",
        "reward.batch_size=4", "reward.timeout_s=60", f"replay.url='{REDIS_URL}?prefix={prefix}'",
    ])


def _task_ids(config, output: Path, iterations: int) -> list[list[str]]:
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    return [[t.group_id for t in sampler.tasks(i, GROUPS)] for i in range(iterations)]


def _applied_by_checkpoints(output: Path) -> list[str]:
    ids = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        ids.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    return ids


def _worker_kwargs(plan: dict[str, str]) -> dict:
    return {"plan": plan, "compute_s": 0.05, "geometry": preset_geometry("pocket")}


def test_poison_of_every_kind_in_a_running_run_is_quarantined_and_every_good_group_applied_once(
        ray_cluster, untrained_pocket_weights, redis_prefix, tmp_path):
    iterations = 3
    output = tmp_path / "poisoned"
    config = _config(untrained_pocket_weights, redis_prefix, iterations)
    ids = _task_ids(config, output, iterations)
    kinds = list(POISONS)  # 7 kinds over 12 groups: every iteration keeps at least one good group
    slots = [(i, k) for i in range(iterations) for k in range(GROUPS)][1::2] + [(2, 0)]
    plan = {ids[i][k].split("-", 1)[1]: kind for (i, k), kind in zip(slots, kinds)}
    poisoned = {ids[i][k]: kind for (i, k), kind in zip(slots, kinds)}
    good = [g for row in ids for g in row if g not in poisoned]
    quarantined_seen = {}

    def on_iteration(system, row):
        quarantined_seen.update(system.metrics.snapshot().get("arcopo_groups_quarantined_total", {}))

    rows = train(config, output, on_iteration=on_iteration, worker_cls=PoisonRolloutWorker, worker_kwargs=_worker_kwargs(plan))

    assert [r["iteration"] for r in rows] == list(range(iterations))
    assert sum(r["groups_quarantined"] for r in rows) == len(kinds)
    assert sum(r["groups"] for r in rows) == len(good) and all(r["nonfinite_steps"] == 0 for r in rows)
    applied = _applied_by_checkpoints(output)
    assert sorted(applied) == sorted(good) and len(set(applied)) == len(applied)
    with open_store(f"{REDIS_URL}?prefix={redis_prefix}") as store:
        stats = store.stats()
        letters = {letter["gid"]: letter["reason"] for letter in store.dead_letters()}
        assert all(store.is_applied(g) for g in good) and not any(store.is_applied(g) for g in poisoned)
    assert (stats.quarantined, stats.acked, stats.corrupt) == (len(kinds), len(good), 0)
    assert stats.queue_length == 0 and stats.pending == 0
    assert {gid: reason.split(":")[0] for gid, reason in letters.items()} == {g: POISONS[k] for g, k in poisoned.items()}
    expected = {}
    for kind in kinds:
        expected[(("reason", POISONS[kind]),)] = expected.get((("reason", POISONS[kind]),), 0) + 1
    assert quarantined_seen == expected


def test_a_store_that_loses_its_data_mid_run_stops_the_run_and_a_resume_applies_every_group_once(
        ray_cluster, untrained_pocket_weights, redis_prefix, tmp_path):
    iterations = 4
    output = tmp_path / "lost"
    config = _config(untrained_pocket_weights, redis_prefix, iterations)
    ids = _task_ids(config, output, iterations)
    client = redis.Redis.from_url(REDIS_URL)
    before_loss = {}

    def on_iteration(system, row):
        if row["iteration"] == 1:  # checkpoint 2 is written and acked: the store loses everything
            before_loss["applied"] = {m.decode() for m in client.smembers(redis_prefix + "applied")}
            client.delete(redis_prefix + "epoch")  # first, as a restart would: no producer writes after this
            for key in client.scan_iter(match=redis_prefix + "*"):
                client.delete(key)

    with pytest.raises(StoreLostError, match=r"has no run epoch.*push of group .*applied set are gone.*--resume"):
        train(config, output, on_iteration=on_iteration, worker_cls=PoisonRolloutWorker, worker_kwargs=_worker_kwargs({}))

    applied = _applied_by_checkpoints(output)
    assert sorted(applied) == sorted(ids[0] + ids[1]) == sorted(before_loss["applied"])  # nothing twice
    assert len(set(applied)) == len(applied)
    assert [json.loads(line)["iteration"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert list(client.scan_iter(match=redis_prefix + "*")) == []  # nothing recreated in the emptied store
    with pytest.raises(StoreLostError, match="has no run epoch"):  # nor by a resume
        train(config, output, resume=True, worker_cls=PoisonRolloutWorker, worker_kwargs=_worker_kwargs({}))
    assert list(client.scan_iter(match=redis_prefix + "*")) == []

    (output / "replay_epoch.json").unlink()  # what the error says to do to continue on the emptied store
    rows = train(config, output, resume=True, worker_cls=PoisonRolloutWorker, worker_kwargs=_worker_kwargs({}))
    assert [r["iteration"] for r in rows] == list(range(iterations))
    applied = _applied_by_checkpoints(output)
    every = sorted(g for row in ids for g in row)
    assert sorted(applied) == every and len(set(applied)) == len(applied)
    with open_store(f"{REDIS_URL}?prefix={redis_prefix}") as store:
        assert all(store.is_applied(g) for g in every)
        assert (store.stats().queue_length, store.stats().pending) == (0, 0)


def test_the_reward_server_killed_mid_run_is_restarted_and_every_group_applied_once(
        ray_cluster, untrained_pocket_weights, redis_prefix, tmp_path):
    iterations = 3
    output = tmp_path / "reward-restart"
    config = _config(untrained_pocket_weights, redis_prefix, iterations)
    ids = _task_ids(config, output, iterations)
    seen = {}

    def on_iteration(system, row):
        scored = ray.get(system.reward_server.metrics.remote())["samples"]
        seen[row["iteration"]] = scored
        if row["iteration"] == 0:  # killed while the next iteration's groups are being scored
            threading.Timer(0.3, lambda: ray.kill(system.reward_server, no_restart=False)).start()

    rows = train(config, output, on_iteration=on_iteration, worker_cls=PoisonRolloutWorker, worker_kwargs=_worker_kwargs({}))

    assert [r["groups"] for r in rows] == [GROUPS] * iterations and sum(r["groups_dropped"] for r in rows) == 0
    applied = _applied_by_checkpoints(output)
    assert sorted(applied) == sorted(g for row in ids for g in row) and len(set(applied)) == len(applied)
    with open_store(f"{REDIS_URL}?prefix={redis_prefix}") as store:
        stats = store.stats()
    assert (stats.acked, stats.quarantined, stats.queue_length) == (GROUPS * iterations, 0, 0)
    # The restarted server counts from zero: by the end it has scored fewer videos than the run did.
    group_size = config.algorithm.group_size
    assert seen[0] >= GROUPS * group_size and seen[iterations - 1] < GROUPS * group_size * iterations
