"""Pipelined rollout and update (`algorithm.max_policy_lag`) through the real driver, fleet, reward
server, replay store and learner (pocket model, really trained), with simulated rollout workers and
a simulated update time (learner.simulated):

- lag 0 is strictly sequential: no group of iteration k+1 starts before update k has returned;
- lag 1 makes iteration k+1's groups during update k (from the workers' own start/finish times and
  the driver's update spans), trains on exactly the same groups and so writes the same metrics;
- every group is applied exactly once (the checkpoints' applied ids against the sampler's task ids);
- a group staler than the bound is dropped by the learner's pull and counted (`groups_stale`, the
  store's `stale_dropped`), and the update does not wait for it (reward.timeout_s is 600 s: a learner
  asked for the stale group too would wait that long and then train on fewer groups).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from ray import cloudpickle

from controller.config import load_config
from controller.driver import train
from controller.task_sampler import TaskSampler, load_prompts
from learner.simulated import simulated_update_learner
from replay import open_store
from rollout_workers.simulated import FIXED_COST_REWARD, SimulatedRolloutWorker, preset_geometry

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module

ITERATIONS, GROUPS = 3, 4
STALE_AT = 2  # a group of this iteration is made as if by adapter version 0: stale under lag 0 and 1
COMPUTE_S, UPDATE_S_PER_GROUP = 0.15, 0.1
SAME = ("reward_mean", "reward_VQ", "reward_MQ", "reward_TA", "loss", "clip_fraction", "ratio_max_deviation",
        "grad_norm", "policy_version", "groups", "groups_without_signal", "groups_dropped", "groups_stale")


class StaleRolloutWorker(SimulatedRolloutWorker):
    """Makes the groups named in `stale_ids` as if with adapter version 0 (a worker left far behind)."""

    def __init__(self, *args, stale_ids: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stale_ids = set(stale_ids)

    def generate(self, task):
        group = super().generate(task)
        return group.model_copy(update={"policy_version": 0}) if task.group_id in self.stale_ids else group


def _config(weights, lag: int):
    return load_config(None, [
        f"run.iterations={ITERATIONS}", "run.checkpoint_every=2", "run.eval_every=0", "run.eval_prompts_limit=1",
        f"algorithm.groups_per_iteration={GROUPS}", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
        "algorithm.updates_per_iteration=1", "lora.rank=2", "lora.alpha=4", f"policy.transformer_checkpoint={weights}",
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5", f"reward.model='{FIXED_COST_REWARD}'",
        "reward.num_actors=1", "reward.batch_size=4", "reward.timeout_s=600", f"algorithm.max_policy_lag={lag}",
    ])


def _run(tmp_path, weights, lag: int) -> dict:
    config = _config(weights, lag)
    output = tmp_path / f"lag{lag}"
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    ids = [[t.group_id for t in sampler.tasks(i, GROUPS)] for i in range(ITERATIONS)]
    seen: dict = {}

    def on_iteration(system, row):
        seen["timeline"] = [span for span in system.timeline if span[0] == "update"]
        seen["stale_metric"] = system.metrics.value("groups_dropped_total", reason="stale")

    summaries: list = []
    import controller.system as system_module

    rollout = system_module.System.rollout

    def recording_rollout(self, tasks, next_tasks=()):
        out = rollout(self, tasks, next_tasks)
        summaries.append(out)
        return out

    system_module.System.rollout = recording_rollout
    try:
        rows = train(config, output, on_iteration=on_iteration, worker_cls=StaleRolloutWorker,
                     worker_kwargs={"compute_s": COMPUTE_S, "geometry": preset_geometry("pocket"),
                                    "stale_ids": (ids[STALE_AT][1],)},
                     learner_cls=simulated_update_learner(UPDATE_S_PER_GROUP))
    finally:
        system_module.System.rollout = rollout
    applied = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        applied.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    with open_store((output / "replay").resolve().as_uri()) as store:
        stats = store.stats()
    return {"rows": rows, "ids": ids, "summaries": summaries, "updates": seen["timeline"], "applied": applied,
            "stats": stats, "stale_metric": seen["stale_metric"]}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, untrained_pocket_weights):
    tmp = tmp_path_factory.mktemp("pipelining")
    return {"sequential": _run(tmp, untrained_pocket_weights, 0), "pipelined": _run(tmp, untrained_pocket_weights, 1)}


def _group_spans(run: dict, iteration: int) -> list[tuple[float, float]]:
    return [(s.started_at, s.finished_at) for s in run["summaries"][iteration]]


@pytest.mark.slow
def test_lag_0_is_sequential_and_lag_1_overlaps_the_next_rollout_with_the_update(runs):
    sequential, pipelined = runs["sequential"], runs["pipelined"]
    for run in (sequential, pipelined):
        assert len(run["updates"]) == ITERATIONS and len(run["summaries"]) == ITERATIONS
    # lag 0: every group of iteration k+1 starts after update k returned
    for k in range(ITERATIONS - 1):
        update_end = sequential["updates"][k][2]
        assert all(start > update_end for start, _ in _group_spans(sequential, k + 1)), k
    # lag 1: groups of iteration k+1 run while update k runs (their spans intersect the update's)
    overlapped = 0.0
    for k in range(ITERATIONS - 1):
        _, update_start, update_end = pipelined["updates"][k]
        overlapped += sum(max(0.0, min(end, update_end) - max(start, update_start))
                          for start, end in _group_spans(pipelined, k + 1))
        assert min(start for start, _ in _group_spans(pipelined, k + 1)) < update_end, k
    assert overlapped > 0
    # ... made by the adapter one version behind at most (the learner is at version k in iteration k)
    made = lambda run: [(k, s.policy_version) for k, ss in enumerate(run["summaries"]) for s in ss  # noqa: E731
                        if not s.drop_reason.startswith("stale")]
    assert all(v in (k - 1, k) for k, v in made(pipelined)) and any(v == k - 1 for k, v in made(pipelined))
    assert all(v == k for k, v in made(sequential))


@pytest.mark.slow
def test_pipelined_run_trains_on_the_same_groups_and_writes_the_same_metrics(runs):
    sequential, pipelined = runs["sequential"], runs["pipelined"]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in sequential["rows"])  # it really trained
    for column in SAME:
        assert [r[column] for r in pipelined["rows"]] == pytest.approx([r[column] for r in sequential["rows"]],
                                                                       rel=1e-6, nan_ok=True), column
    assert [r["groups_stale"] for r in pipelined["rows"]] == [0] * STALE_AT + [1] + [0] * (ITERATIONS - STALE_AT - 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_every_group_applied_once_and_a_stale_one_dropped_counted_and_not_waited_for(runs, mode):
    run = runs[mode]
    stale_id = run["ids"][STALE_AT][1]
    assert [r["groups_stale"] for r in run["rows"]] == [int(i == STALE_AT) for i in range(ITERATIONS)]
    assert [r["groups"] for r in run["rows"]] == [GROUPS - int(i == STALE_AT) for i in range(ITERATIONS)]
    assert [s.group_id for s in run["summaries"][STALE_AT] if s.drop_reason.startswith("stale")] == [stale_id]
    # every other group applied once, the stale one never: the store dropped it at the learner's pull
    expected = [g for ids in run["ids"] for g in ids if g != stale_id]
    assert sorted(run["applied"]) == sorted(expected) and len(set(run["applied"])) == len(run["applied"])
    assert run["stats"].stale_dropped == 1 and run["stats"].queue_length == 0
    assert run["stats"].acked == len(expected)
    assert run["stale_metric"] == 1  # ray_arcopo_groups_dropped_total{reason="stale"}
