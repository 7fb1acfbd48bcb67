"""Iteration time of the sequential loop against the pipelined one (`algorithm.max_policy_lag`), on
simulated device time, through the real driver, fleet, reward pool, replay store and learner:

    python -m benchmarks.pipeline_bench [--rollout-s 0.5] [--update-s 0.18] [--workers 2] [--groups 4]
                                        [--iterations 8] [--json]

Each mode is one run of `controller.driver.train` (the pocket preset): `SimulatedRolloutWorker`s
sleep `rollout_s` a group (a GPU-bound worker waits on its device), the learner
(`learner.simulated.simulated_update_learner`, optimiser step skipped) sleeps `update_s` a group,
and everything else is real: task hand-out, scoring through the reward server and pool, pushes,
pulls and acks on the store, the broadcast. Both modes run in one process, one after the other, and
are printed side by side: iterations/s and the ratio of the iteration time (median time between
finished iterations) to the longer phase (the larger of the sequential run's median rollout and
update phases, each measured alone). Sequential is about rollout + update, so its ratio is
1 + shorter/longer; pipelined approaches 1.

`--json` prints {"sync_ratio", "pipelined_ratio", "learner_scaling", ...}: `learner_scaling` is
filled by `benchmarks.learner_group_bench.measure_learner_scaling(counts)`
(the data-parallel learner group's measurement).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.learner_group_bench import measure_learner_scaling
from controller.config import load_config
from controller.driver import train
from learner.simulated import simulated_update_learner
from rollout_workers.simulated import FIXED_COST_REWARD, SimulatedRolloutWorker, preset_geometry

LEARNER_COUNTS = (1, 2, 4)


def _run(output: Path, lag: int, rollout_s: float, update_s: float, workers: int, groups: int, iterations: int) -> dict:
    """One run at `algorithm.max_policy_lag=lag`: the median time between finished iterations and the
    median rollout and update phases (as the driver's rows record them)."""
    config = load_config(None, [
        f"run.iterations={iterations}", f"run.checkpoint_every={iterations}", "run.eval_every=0",
        "run.eval_prompts_limit=1", "run.trackers=[jsonl]", f"algorithm.groups_per_iteration={groups}",
        "algorithm.group_size=4", "algorithm.anchors_per_group=2", "algorithm.updates_per_iteration=1",
        f"algorithm.max_policy_lag={lag}", "lora.rank=2", "lora.alpha=4",
        f"rollout.num_workers={workers}", "rollout.num_cpus_per_worker=0.01", f"reward.model='{FIXED_COST_REWARD}'",
        "reward.num_actors=1", "reward.batch_size=4",
    ])
    finished: list[float] = []
    rows = train(config, output, on_iteration=lambda system, row: finished.append(time.perf_counter()),
                 worker_cls=SimulatedRolloutWorker,
                 worker_kwargs={"compute_s": rollout_s, "geometry": preset_geometry(config.policy.preset)},
                 learner_cls=simulated_update_learner(update_s, train=False))
    gaps = [b - a for a, b in zip(finished, finished[1:])]
    return {"iteration_s": statistics.median(gaps),
            "rollout_s": statistics.median(r["rollout_s"] for r in rows[1:]),
            "update_s": statistics.median(r["update_s"] for r in rows[1:])}


def measure_sync_vs_pipelined(rollout_s: float = 0.5, update_s: float = 0.18, workers: int = 2, groups: int = 4,
                              iterations: int = 8) -> dict:
    """Run both modes (a Ray cluster must be up); returns each mode's iteration time, iterations/s and
    ratio to the longer phase (taken from the sequential run, where each phase runs alone)."""
    if iterations < 3:
        raise ValueError("at least 3 iterations: the first is a warm-up, the ratio needs two gaps")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        sync = _run(Path(tmp) / "sync", 0, rollout_s, update_s, workers, groups, iterations)
        pipelined = _run(Path(tmp) / "pipelined", 1, rollout_s, update_s, workers, groups, iterations)
    longer = max(sync["rollout_s"], sync["update_s"])
    return {
        "longer_phase_s": longer, "rollout_phase_s": sync["rollout_s"], "update_phase_s": sync["update_s"],
        "sync_iteration_s": sync["iteration_s"], "pipelined_iteration_s": pipelined["iteration_s"],
        "sync_iterations_per_s": 1.0 / sync["iteration_s"], "pipelined_iterations_per_s": 1.0 / pipelined["iteration_s"],
        "sync_ratio": sync["iteration_s"] / longer, "pipelined_ratio": pipelined["iteration_s"] / longer,
    }


def learner_scaling(counts: tuple[int, ...] = LEARNER_COUNTS) -> dict:
    """The learner group's scaling (speed-up / number of learners, by count): benchmarks.learner_group_bench."""
    return {str(k): v for k, v in measure_learner_scaling(counts).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout-s", type=float, default=0.5, help="simulated rollout device time a group")
    parser.add_argument("--update-s", type=float, default=0.18, help="simulated update device time a group")
    parser.add_argument("--workers", type=int, default=2, help="rollout workers")
    parser.add_argument("--groups", type=int, default=4, help="groups an iteration")
    parser.add_argument("--iterations", type=int, default=8, help="iterations of each mode (the first is a warm-up)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        result = measure_sync_vs_pipelined(args.rollout_s, args.update_s, args.workers, args.groups, args.iterations)
    finally:
        ray.shutdown()
    result["learner_scaling"] = learner_scaling()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"simulated device time: rollout {args.rollout_s}s a group on {args.workers} workers, update {args.update_s}s "
          f"a group, {args.groups} groups an iteration; phases measured alone: rollout {result['rollout_phase_s']:.3f}s, "
          f"update {result['update_phase_s']:.3f}s")
    print(f"{'mode':>10} {'iterations/s':>13} {'iteration s':>12} {'ratio to longer phase':>22}")
    for mode in ("sync", "pipelined"):
        print(f"{mode:>10} {result[f'{mode}_iterations_per_s']:>13.3f} {result[f'{mode}_iteration_s']:>12.3f} "
              f"{result[f'{mode}_ratio']:>22.2f}")
    for count, ratio in result["learner_scaling"].items():
        print(f"learners {count}: {ratio:.2f} of linear")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
