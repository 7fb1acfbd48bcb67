"""What every objective gives the learner actor: one iteration's optimiser steps, its statistics,
and the state a checkpoint keeps.

The learner actor owns the optimiser, the non-finite guard and the checkpoints; an objective owns
how a batch of groups becomes gradients (and, for NFT, its extra adapters and controllers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from replay.record import CandidateGroup

# `guarded_step(loss, group ids)`: clip the gradients and take the optimiser step unless the loss or the
# gradients are not finite; returns (taken, gradient norm). The learner's `NonFiniteGuard` (in a learner
# group, after summing every rank's gradients and loss shares, so all ranks take the same verdict).
GuardedStep = Callable[[float, list[str]], tuple[bool, float]]
# A group with its advantages [G] (only groups that carry a signal reach an objective).
GroupWithAdvantages = tuple[CandidateGroup, torch.Tensor]


@dataclass(frozen=True)
class GroupShard:
    """Which of an iteration's groups this learner rank replays: the i-th group (in id order) belongs to rank
    i mod world_size. Every rank walks the whole list, so random draws made per group (AR-CoPO's anchors)
    come out of each rank's generator in the order one learner draws them; a rank replays only its own
    groups (the others' may be stand-ins carrying `group_id` and `reward_valid` alone)."""

    rank: int = 0
    world_size: int = 1

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


WHOLE_BATCH = GroupShard()  # one learner: every group is its own


@dataclass(frozen=True)
class StepStats:
    """One iteration's statistics as the objective reports them (NaN loss/grad_norm: no step taken)."""

    loss: float
    grad_norm: float
    # The clipped-ratio objectives' (copo, sde_grpo); None for an objective without a ratio (nft).
    clip_fraction: float | None = None
    ratio_max_deviation: float | None = None
    # An objective's own statistics, each a metrics column under its own name (e.g. `nft_ema_decay`).
    objective_stats: dict[str, float | bool] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """A training objective inside the learner actor, chosen once from `algorithm.objective`."""

    name: str  # `algorithm.objective`; also the key of its state in a checkpoint's state.json
    sampling_adapter: str  # the adapter rollouts sample with: what the learner broadcasts
    checkpoint_adapters: dict[str, str]  # extra adapters a checkpoint saves: directory -> adapter name

    def train_step(self, groups: list[GroupWithAdvantages], optimizer: torch.optim.Optimizer,
                   guarded_step: GuardedStep, shard: GroupShard = WHOLE_BATCH) -> StepStats:
        """`algorithm.updates_per_iteration` optimiser steps over `groups`, each through `guarded_step`,
        back-propagating only `shard`'s groups, each scaled by 1 / len(groups) (the learner group sums the
        ranks' gradients in `guarded_step`). Statistics are this rank's (`learner.learner_group` combines them)."""
        ...

    def state_dict(self) -> dict:
        """The objective's own state for a checkpoint (empty when it keeps none)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


def mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
