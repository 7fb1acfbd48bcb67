"""A data-parallel learner group: rank 0 (the learner actor the controller calls) and the ranks it starts.

`run.num_learners` ranks, one per GPU, in one `torch.distributed` process group (`learner.distributed`).
Rank 0 alone talks to the replay store, writes checkpoints, acks and publishes the adapter: the single
owner of exactly-once accounting, as one learner is. Each iteration it pulls the groups, keeps the usable
ones in id order and hands every other rank its share (the i-th group to rank i mod N) as replay records
(`replay.codec`, the store's own wire format) with stand-ins for the rest, whose per-group random draws
(AR-CoPO's anchors) every rank still makes so its generator stays in step with one learner's. Each rank
back-propagates its groups at the one-learner scale (1 / all groups), the gradients are summed before each
optimiser step, and every rank takes the same step: the replicas stay equal and the update is the one
learner's (within float summation order).

Placement: the controller starts rank 0 in bundle 0 of a placement group of `num_learners` bundles (each
with the rank's GPU), and rank 0 starts rank r in bundle r, so ranks hold distinct GPUs, reserved together.

Failure: the other ranks are rank 0's child actors, so they end with it (Ray's owner fate-sharing) and
have no restarts of their own. A rank that dies breaks the process group; rank 0 notices (a failed
collective or call) and ends its own process, so Ray restarts it (the learner's `max_restarts`) with a
new group restored from the newest checkpoint: the controller sees the one-learner restart path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.distributed import RankLost, free_port, join_process_group
from learner.objectives.base import GroupShard, GroupWithAdvantages, StepStats
from learner.settings import LearnerRunSettings
from replay.codec import decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OtherRankGroup:
    """Stands for a group another rank replays: what this rank's per-group draws read."""

    group_id: str
    reward_valid: torch.Tensor


@dataclass(frozen=True)
class ShardPayload:
    """One rank's part of an iteration: every usable group in order, its own ones as replay records."""

    world_size: int
    entries: list[bytearray | OtherRankGroup]

    def groups(self) -> list:
        return [decode(e) if isinstance(e, (bytes, bytearray)) else e for e in self.entries]


def shard_payload(usable: list[GroupWithAdvantages], rank: int, world_size: int) -> ShardPayload:
    shard = GroupShard(rank, world_size)
    return ShardPayload(world_size, [encode(g) if shard.owns(i) else OtherRankGroup(g.group_id, g.reward_valid)
                                     for i, (g, _) in enumerate(usable)])


def combine_step_stats(ranks: list[StepStats], owned: list[int]) -> StepStats:
    """The iteration's statistics from every rank's: the loss shares add up to the mean loss, the gradient
    norm is taken after the sum (the same on every rank), the clip fraction is a mean over every group."""
    with_groups = [(s, n) for s, n in zip(ranks, owned) if n and s.clip_fraction is not None]
    clip = (sum(s.clip_fraction * n for s, n in with_groups) / sum(n for _, n in with_groups)) if with_groups else None
    deviations = [s.ratio_max_deviation for s in ranks if s.ratio_max_deviation is not None]
    return StepStats(loss=sum(s.loss for s in ranks), grad_norm=ranks[0].grad_norm,
                     clip_fraction=clip if clip is not None else ranks[0].clip_fraction,
                     ratio_max_deviation=max(deviations) if deviations else None)


def on_cpu(state):
    """`state` with every tensor in it moved to the CPU (what crosses to another rank's GPU)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


def restart_group(err: Exception):
    """A rank was lost: the process group cannot go on. Rank 0 ends its process; Ray restarts it (the
    other ranks, its children, end with it) and the new group restores the newest checkpoint."""
    log.error("learner group: %s; restarting the group from the newest checkpoint", err)
    logging.shutdown()
    os._exit(1)


class LearnerPeers:
    """Rank 0's handles on ranks 1..N-1."""

    def __init__(self, actors: list, world_size: int) -> None:
        self.actors, self.world_size = actors, world_size

    @classmethod
    def start(cls, learner_cls: type, init_args: tuple, run: LearnerRunSettings, device: torch.device) -> "LearnerPeers":
        """Start ranks 1..N-1 (instances of rank 0's own class) and form the process group with them."""
        world = run.num_learners
        placement = get_current_placement_group()
        actors = []
        for rank in range(1, world):
            options = dict(num_cpus=1, num_gpus=run.num_gpus, resources=run.resources or None, max_restarts=0,
                           max_task_retries=0)
            if placement is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank)
            actors.append(ray.remote(learner_cls).options(**options).remote(*init_args, rank=rank))
        # Built first, so a constructor that fails raises here instead of leaving the rendezvous waiting.
        ray.get([a.status.remote() for a in actors])
        address, port = ray.util.get_node_ip_address(), free_port()
        joins = [a.join_group.remote(address, port, world) for a in actors]
        join_process_group(address, port, 0, world, device)
        ray.get(joins)
        log.info("learner group of %d ranks formed (rendezvous %s:%d)", world, address, port)
        return cls(actors, world)

    def sync(self, state: dict) -> None:
        """Every rank takes rank 0's adapter, optimiser and generator state (after its start or a restore)."""
        ref = ray.put(state)
        self._get([a.load_replica_state.remote(ref) for a in self.actors])

    def train(self, usable: list[GroupWithAdvantages], train_own) -> StepStats:
        """One iteration's optimiser steps over `usable` on every rank; `train_own(shard)` is rank 0's part."""
        calls = [a.train_shard.remote(shard_payload(usable, rank, self.world_size))
                 for rank, a in enumerate(self.actors, start=1)]
        mine = train_own(GroupShard(0, self.world_size))
        theirs = self._get(calls)
        owned = [sum(GroupShard(r, self.world_size).owns(i) for i in range(len(usable))) for r in range(self.world_size)]
        return combine_step_stats([mine, *theirs], owned)

    @staticmethod
    def _get(refs: list) -> list:
        try:
            return ray.get(refs)
        except RayActorError as err:
            raise RankLost(f"a learner rank died: {err}") from err
