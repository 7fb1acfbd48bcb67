"""Reward scoring throughput, measured side by side in one run.

    python -m benchmarks.reward_bench [--videos 48] [--batch-size 4] [--reps 2]

The reward is the pocket world's verifier (VQ/MQ/TA from image analysis of 16 x 32 x 32 frames),
built from the registry as "pocket" when its registration file exists, otherwise through a thin
adapter over `pocket.verifiers` here. Videos are pocket-domain renders of the train prompts.

1. direct:   the reward model's `score` called in this process, batch by batch (the baseline)
2. pool x1:  RewardPool with one Ray actor (object store transfer, task dispatch, result return)
3. pool x2:  RewardPool with two actors

Printed: videos/s for each, the pool's overhead against direct scoring (pool x1 / direct time) and
the speed-up of two actors over one. Each figure is the median of `reps` runs after a warm-up run.
Ray runs locally with as many CPUs as the machine has (never on port 6379).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import ray

from reward_service.base import RewardModel, Video
from reward_service.registry import build_reward, register_reward, resolve_factory


class PocketVerifierAdapter(RewardModel):
    """The pocket verifiers behind the reward interface, for when no "pocket" entry is registered."""

    name = "pocket"
    heads = ("VQ", "MQ", "TA")

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        from pocket.verifiers import score_videos

        return score_videos([v.frames for v in videos], prompts)


class MeanBrightness(RewardModel):
    """Almost free to compute: isolates the pool's own cost per batch."""

    name = "mean_brightness"
    heads = ("brightness",)

    def score(self, videos: list[Video], prompts: list[str]) -> dict[str, np.ndarray]:
        return {"brightness": np.array([v.frames.mean() / 255.0 for v in videos])}


if __name__ != "__main__":  # registered by the importable module (which actors import), not by `-m`'s copy
    register_reward("bench_pocket_verifiers")(PocketVerifierAdapter)
    register_reward("bench_mean_brightness")(MeanBrightness)


def reward_name() -> str:
    try:
        resolve_factory("pocket")
        return "pocket"
    except KeyError:
        return "benchmarks.reward_bench:bench_pocket_verifiers"


def pocket_videos(n: int) -> tuple[list[Video], list[str]]:
    from pocket import domain

    prompts = [domain.train_prompts()[i % len(domain.train_prompts())] for i in range(n)]
    videos = [Video(domain.generate_video(p, seed), domain.FPS) for seed, p in enumerate(prompts)]
    return videos, prompts


def interleaved_medians(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Median seconds of each function, measured in alternating rounds (after one warm-up round)
    so that load changes on a shared machine hit every contestant alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(reps + 1):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def compare(name: str, videos: list[Video], prompts: list[str], batch_size: int, reps: int) -> dict[str, float]:
    """Seconds to score all videos: direct in-process, and through pools of one and two actors."""
    from reward_service.pool import RewardPool

    model = build_reward(name)

    def direct():
        for i in range(0, len(videos), batch_size):
            model.score(videos[i : i + batch_size], prompts[i : i + batch_size])

    pools = {k: RewardPool([name], num_actors=k, batch_size=batch_size, num_cpus=1) for k in (1, 2)}
    try:
        return interleaved_medians(
            {"direct": direct, "pool x1": lambda: pools[1].score(videos, prompts), "pool x2": lambda: pools[2].score(videos, prompts)},
            reps,
        )
    finally:
        for pool in pools.values():
            pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    name = reward_name()
    videos, prompts = pocket_videos(args.videos)
    n, b, batches = len(videos), args.batch_size, -(-len(videos) // args.batch_size)
    cpus = os.cpu_count() or 2
    # Three actors exist at once (pools of one and two); only one pool is busy at a time.
    ray.init(num_cpus=max(cpus, 3), include_dashboard=False, logging_level="ERROR")
    try:
        real = compare(name, videos, prompts, b, args.reps)
        free = compare("benchmarks.reward_bench:bench_mean_brightness", videos, prompts, b, args.reps)
    finally:
        ray.shutdown()

    print(f"{n} pocket videos {videos[0].frames.shape} uint8, batch size {b} ({batches} batches), {cpus} CPUs, median of {args.reps}")
    print(f"reward {name}:")
    for key, seconds in real.items():
        print(f"  {key:<10} {seconds:8.3f} s   {n / seconds:8.1f} videos/s")
    print(f"  pool x1 time / direct time (overhead):   {real['pool x1'] / real['direct']:6.3f}")
    print(f"  pool x2 throughput / pool x1 (speed-up): {real['pool x1'] / real['pool x2']:6.3f}")
    print("near-free reward (mean brightness), the pool's own cost:")
    for key, seconds in free.items():
        print(f"  {key:<10} {seconds * 1e3:8.1f} ms  {n / seconds:8.1f} videos/s")
    per_batch = (free["pool x1"] - free["direct"]) / batches
    print(f"  pool overhead per batch (x1 - direct) / batches: {per_batch * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
