"""Held-out evaluation through the fleet: every kept frame belongs to the (prompt, seed) pair at its
position (a sample sheet labels frames by position), whichever worker made it."""

from __future__ import annotations

import numpy as np
import ray

from controller.system import System
from rollout_workers.tasks import EvalResult


@ray.remote
class _TaggingWorker:
    """Evaluates like a rollout worker; every frame's pixels hold its seed, so it can be traced."""

    def evaluate(self, prompts, seeds, keep_frames=0):
        results = [EvalResult(prompt=p, seed=s, policy_version=0, rewards={"TA": s / 100}, valid=True)
                   for p, s in zip(prompts, seeds)]
        return results, [np.full((2, 4, 4, 3), s, np.uint8) for s in seeds[:keep_frames]]


class _Fleet:
    max_attempts = 2

    def __init__(self, handles):
        self._handles = handles

    def wait_ready(self):
        pass

    def handles(self):
        return self._handles


def test_kept_frames_follow_the_pairs_order_across_workers(ray_local):
    system = System.__new__(System)  # only the fleet is needed
    system.fleet = _Fleet([_TaggingWorker.remote() for _ in range(3)])
    prompts = [f"prompt {i}" for i in range(7)]
    seeds = [10 + i for i in range(7)]
    results, frames = system.evaluate(prompts, seeds, keep_frames=5)
    assert [r.seed for r in results] == seeds
    assert [int(f[0, 0, 0, 0]) for f in frames] == seeds[:5]  # not worker 0's first five (10, 13, 16)
    _, frames = system.evaluate(prompts, seeds, keep_frames=7)
    assert [int(f[0, 0, 0, 0]) for f in frames] == seeds
    _, frames = system.evaluate(prompts, seeds, keep_frames=0)
    assert frames == []
