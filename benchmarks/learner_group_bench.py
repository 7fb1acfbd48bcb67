"""Update time against the number of learner ranks, with simulated device time.

    python -m benchmarks.learner_group_bench [--learners 1,2,4] [--groups 16] [--update-s 0.5]
                                             [--updates 2] [--iterations 2] [--json]

The real learner group (`learner.learner_group`): rank 0 a Ray actor pulling valid pocket-sized groups
from a local-file replay store, checking each at the door, handing the other ranks their shares as
replay records; every rank is a `SimulatedUpdateLearner`, whose optimiser step costs
`update_s x (groups it replays)` seconds of sleep (a GPU-bound rank waits on its device) followed by the
real gradient sum over gloo (the LoRA's size) and the real optimiser step. Measured: the driver's wall
time of `train_on_policy` per iteration (median over `iterations`); printed side by side with the
scaling ratio to linear (speed-up over one learner / number of learners).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from controller.config import load_config
from learner.learner_actor import Learner
from learner.objectives.base import GroupShard, GroupWithAdvantages, StepStats
from pocket import domain
from replay import open_store
from replay.synthetic import synthetic_group
from rollout_workers.delivery import deliver_group
from rollout_workers.simulated import preset_geometry

UPDATE_S_ENV = "ARCOPO_BENCH_UPDATE_S_PER_GROUP"  # reaches rank 0 and, through its runtime_env, its ranks


class SimulatedUpdateLearner(Learner):
    """A learner rank whose replay is `update_s` seconds a group (no model forward), then the real gradient
    sum and optimiser step."""

    def _train_shard_of(self, usable: list[GroupWithAdvantages], shard: GroupShard) -> StepStats:
        update_s = float(os.environ.get(UPDATE_S_ENV, "0"))
        owned = [g.group_id for i, (g, _) in enumerate(usable) if shard.owns(i)]
        for _ in range(self.config.algorithm.updates_per_iteration if usable else 0):
            time.sleep(update_s * len(owned))
            self._guarded_step(0.0, owned)
        return StepStats(loss=0.0, grad_norm=0.0, clip_fraction=0.0, ratio_max_deviation=0.0)


def _groups(iteration: int, count: int, version: int) -> list:
    geometry = preset_geometry("pocket")
    prompts = domain.train_prompts()
    groups = []
    for i in range(count):
        group = synthetic_group(**geometry, group_size=4, pivot=1, policy_version=version, seed=1000 * iteration + i,
                                group_id=f"bench-{iteration:03d}-{i:03d}")
        groups.append(group.model_copy(update={"prompt": prompts[i % len(prompts)], "adapter_name": "on_policy"}))
    return groups


def _time_updates(num_learners: int, groups: int, update_s: float, updates: int, iterations: int, workdir: Path) -> float:
    """Median seconds of one iteration's `train_on_policy` on a group of `num_learners` ranks."""
    config = load_config(None, [f"run.num_learners={num_learners}", f"algorithm.groups_per_iteration={groups}",
                                f"algorithm.updates_per_iteration={updates}", "algorithm.group_size=4",
                                "algorithm.anchors_per_group=2", "lora.rank=4", "lora.alpha=8",
                                "run.checkpoint_every=1", f"replay.max_queue_groups={groups * 12}"])
    store_url = (workdir / f"store-{num_learners}").as_uri()
    rank0 = (ray.remote(SimulatedUpdateLearner)
             .options(num_cpus=1, runtime_env={"env_vars": {UPDATE_S_ENV: str(update_s), "OMP_NUM_THREADS": "1"}})
             .remote(config.learner_settings().model_dump(mode="json"), store_url, str(workdir / f"ckpt-{num_learners}")))
    times = []
    try:
        with open_store(store_url) as store:
            for iteration in range(iterations + 1):  # the first is a warm-up
                version = ray.get(rank0.status.remote()).version
                for group in _groups(iteration, groups, version):
                    assert deliver_group(store, group, "queue", 2)[0]
                t0 = time.perf_counter()
                stats = ray.get(rank0.train_on_policy.remote(groups, 120.0))
                times.append(time.perf_counter() - t0)
                assert stats.groups == groups, stats
    finally:
        ray.kill(rank0, no_restart=True)
    return statistics.median(times[1:])


def measure_learner_times(counts=(1, 2, 4), groups: int = 16, update_s_per_group: float = 0.5, updates: int = 2,
                          iterations: int = 2) -> dict[str, float]:
    """Median update seconds per iteration for each number of learners (a local Ray cluster is started
    with a CPU per rank when none is running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="learner_group_bench") as tmp:
            return {str(n): _time_updates(n, groups, update_s_per_group, updates, iterations, Path(tmp)) for n in counts}
    finally:
        if started:
            ray.shutdown()


def scaling_from_times(times: dict[str, float]) -> dict[str, float]:
    """Speed-up over one learner / number of learners, for each count."""
    one = times["1"]
    return {n: (one / t) / int(n) for n, t in times.items()}


def measure_learner_scaling(counts=(1, 2, 4), groups: int = 16, update_s_per_group: float = 0.5, updates: int = 2,
                            iterations: int = 2) -> dict[str, float]:
    """{"1": 1.0, "2": ..., "4": ...}: speed-up / number of learners on simulated device time."""
    counts = tuple(sorted(set(counts) | {1}))
    return scaling_from_times(measure_learner_times(counts, groups, update_s_per_group, updates, iterations))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learner_group_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--learners", default="1,2,4", help="comma-separated numbers of learner ranks")
    parser.add_argument("--groups", type=int, default=16, help="groups per iteration")
    parser.add_argument("--update-s", type=float, default=0.5, help="simulated device seconds per group and optimiser step")
    parser.add_argument("--updates", type=int, default=2, help="optimiser steps per iteration")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per count (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="print {count: scaling} as JSON")
    args = parser.parse_args(argv)
    counts = tuple(sorted({1, *(int(n) for n in args.learners.split(","))}))
    times = measure_learner_times(counts, args.groups, args.update_s, args.updates, args.iterations)
    scaling = scaling_from_times(times)
    if args.json:
        print(json.dumps(scaling))
        return
    ideal = args.groups * args.updates * args.update_s
    print(f"{args.groups} groups x {args.updates} steps x {args.update_s}s simulated device time a group "
          f"({ideal:.2f}s on one learner without overhead)")
    print(f"{'learners':>8} {'update_s':>9} {'speed-up':>9} {'scaling':>8}")
    for n in times:
        print(f"{n:>8} {times[n]:>9.3f} {times['1'] / times[n]:>9.2f} {scaling[n]:>8.3f}")


if __name__ == "__main__":
    main()
