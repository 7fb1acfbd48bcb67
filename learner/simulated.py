"""A learner with simulated device time, for benchmarks and tests (never a real run).

`simulated_update_learner(update_s_per_group, train)` returns a `Learner` subclass to pass as
`learner_cls` (controller.assembly, `train(..., learner_cls=...)`): the real actor (pulls, acks,
checkpoints, the adapter it publishes), whose update of N groups takes at least
`N x update_s_per_group` seconds, as a GPU-bound learner waits on its device without using the host
CPU. With `train=False` the optimiser step itself is skipped (the adapter stays where it is; loss and
gradient norm are NaN, as for a step not taken), so only the simulated time is spent: what
`benchmarks.pipeline_bench` measures, like `rollout_workers.simulated` for the rollout side.
"""

from __future__ import annotations

import math
import time

from learner.learner_actor import Learner
from learner.messages import TrainStats
from replay.record import CandidateGroup


class SimulatedUpdateLearner(Learner):
    update_s_per_group: float = 0.0
    train: bool = True

    def train_groups(self, groups: list[CandidateGroup]) -> TrainStats:
        t0 = time.perf_counter()
        if self.train:
            stats = super().train_groups(groups)
        else:
            stats = TrainStats(groups=len(groups), groups_without_signal=0, loss=math.nan, grad_norm=math.nan,
                               group_reward_means=self._reward_means(groups))
        time.sleep(max(0.0, self.update_s_per_group * len(groups) - (time.perf_counter() - t0)))
        return stats


def simulated_update_learner(update_s_per_group: float, train: bool = True) -> type[Learner]:
    """A `SimulatedUpdateLearner` class whose update takes `update_s_per_group` seconds a group."""
    if update_s_per_group < 0:
        raise ValueError(f"update_s_per_group must be >= 0, got {update_s_per_group}")
    return type("SimulatedUpdateLearner", (SimulatedUpdateLearner,),
                {"update_s_per_group": float(update_s_per_group), "train": bool(train)})
