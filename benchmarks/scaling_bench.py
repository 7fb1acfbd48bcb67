"""Rollout throughput against the number of rollout workers, with simulated-GPU workers.

    python -m benchmarks.scaling_bench [--workers 1,2,4,8] [--compute-s 0.4] [--groups-per-worker 6]
                                       [--rounds 3] [--reward server|stand-in] [--store URL]

Each worker is a `SimulatedRolloutWorker`: it "generates" a group by sleeping `compute_s` (a GPU-bound
worker waits on its device; the host CPU stays free), then builds a valid pocket-sized
`CandidateGroup`, has its branches scored and pushes it to the replay store, all through the real
`RolloutFleet` (dynamic task dispatch), the real `RewardServer` + reward pool (a fixed-cost reward,
one reward actor per two workers) and the real store (a local-file store by default). The fleet is
resized in place between measurements, as `python -m learner.scale` does in a run; the sizes are
measured side by side, interleaved over `rounds`, and the median of each is printed with its ratio to
linear scaling (groups/s at N workers divided by N x groups/s at 1 worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from controller.config import load_config
from controller.rollout_fleet import RolloutFleet
from replay import open_store
from reward_service.server import RewardServer
from rollout_workers.simulated import FIXED_COST_REWARD, SimulatedRolloutWorker, preset_geometry
from rollout_workers.tasks import RolloutTask


def make_tasks(tag: str, count: int, group_size: int, num_chunks: int) -> list[RolloutTask]:
    return [
        RolloutTask(group_id=f"bench-{tag}-{k:04d}", prompt="a red circle moving left", noise_seed=k,
                    pivot=k % num_chunks, group_size=group_size, sigma=0.5, adapter_name="on_policy")
        for k in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated fleet sizes")
    parser.add_argument("--compute-s", type=float, default=0.4, help="simulated device time per group")
    parser.add_argument("--reward-cost-s", type=float, default=0.02, help="reward model time per batch")
    parser.add_argument("--groups-per-worker", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every size")
    parser.add_argument("--reward", choices=("server", "stand-in"), default="server",
                        help="score through the reward server and pool, or inside the worker")
    parser.add_argument("--store", help="replay store URL (default: a local-file store in a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in args.workers.split(",")]

    config = load_config(None, ["algorithm.group_size=8", "reward.batch_size=8"])
    geometry = preset_geometry(config.policy.preset)
    tmp = tempfile.TemporaryDirectory(prefix="scaling-bench-")
    store_url = args.store or (Path(tmp.name) / "replay").as_uri() + "?max_queue_len=100000"
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        reward_server = ray.remote(RewardServer).options(max_concurrency=64, num_cpus=0).remote(
            [(FIXED_COST_REWARD, {"cost_s": args.reward_cost_s})], num_actors=1, batch_size=8, num_cpus=0)
        fleet = RolloutFleet(
            config, reward_server, store_url, adapter_source=None, num_workers=1,
            worker_cls=SimulatedRolloutWorker, worker_options={"num_cpus": 0},
            worker_kwargs={"compute_s": args.compute_s, "reward": args.reward,
                           "reward_cost_s": args.reward_cost_s, "geometry": geometry},
        )
        store = open_store(store_url)
        fleet.run(make_tasks("warmup", 2, 8, geometry["num_chunks"]))  # imports, connections, first push
        rates: dict[int, list[float]] = {n: [] for n in sizes}
        for round_ in range(args.rounds):
            for n in sizes:
                fleet.resize(n)
                ray.get(reward_server.resize.remote(max(1, n // 2)))
                tasks = make_tasks(f"r{round_}-w{n}", n * args.groups_per_worker, 8, geometry["num_chunks"])
                t0 = time.perf_counter()
                summaries = fleet.run(tasks)
                seconds = time.perf_counter() - t0
                if not all(s.stored for s in summaries):
                    raise RuntimeError(f"{sum(not s.stored for s in summaries)} groups were not stored")
                rates[n].append(len(tasks) / seconds)
                store.drain()
                print(f"round {round_}: {n} workers, {len(tasks)} groups in {seconds:.2f}s", flush=True)
        store.close()
    finally:
        ray.shutdown()
        tmp.cleanup()

    base = statistics.median(rates[sizes[0]]) / sizes[0]
    ideal = 1.0 / args.compute_s
    print(f"\nsimulated compute {args.compute_s}s/group (ideal {ideal:.2f} groups/s per worker), "
          f"reward {args.reward} ({args.reward_cost_s}s/batch), {os.cpu_count()} CPUs, store {store_url.split('?')[0]}")
    print(f"{'workers':>8} {'groups/s':>9} {'speedup':>8} {'ratio to linear':>16} {'per worker vs ideal':>20}")
    for n in sizes:
        rate = statistics.median(rates[n])
        print(f"{n:>8} {rate:>9.2f} {rate / (base * sizes[0]):>8.2f} {rate / (base * n):>16.2f} {rate / n / ideal:>20.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
