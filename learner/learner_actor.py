"""The learner: a Ray actor holding the trainable LoRA adapter and its optimiser.

One iteration's update (paper Algorithm 1, lines 7-9): take a batch of candidate groups (pulled
from the on-policy queue, or sampled from the semi-on-policy buffer), compute group-normalised
advantages, then for `updates_per_iteration` optimiser steps replay each group's pivot chunk under
the current policy and descend the objective. Only the adapter's tensors leave this actor
(`current_adapter`), versioned.

Exactly-once application on top of the queue's at-least-once delivery: a group's delivery is acked
only after a checkpoint containing its update is on disk; the checkpoint records the ids it applied,
so a learner restored from it skips (and acks) those if they are delivered again, and re-applies
the ones whose update the crash lost.

Every group is checked against the policy at the door (`learner.group_validation`): one it cannot
use is quarantined (dead-lettered with its reason, never delivered again) and the run goes on. Every
optimiser step goes through `learner.nonfinite_guard`: a step with a non-finite loss or gradient is
skipped, and `algorithm.max_nonfinite_steps` of them in a row stop the run.

With `run.num_learners` > 1 this actor is rank 0 of a data-parallel learner group (`learner.learner_group`):
it alone pulls, acks, checkpoints and publishes; the other ranks (instances of this class with `rank` > 0)
replay their share of each iteration's groups (`train_shard`) and every optimiser step sums the ranks'
gradients (`learner.distributed`). A rank lost ends rank 0's process, so the whole group restarts from
the newest checkpoint as one learner would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learner import distributed
from learner.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointNotFound,
    checkpoints_newest_first,
    latest_checkpoint,
    load_learner_checkpoint,
    read_checkpoint_state,
    save_learner_checkpoint,
)
from learner.settings import LearnerSettings
from learner.group_validation import GroupRejected, PolicyGeometry, check_group
from learner.learner_group import LearnerPeers, ShardPayload, on_cpu, restart_group
from learner.messages import DriverState, LearnerStatus, Published, RestoreResult, TrainStats, UpdateStats
from learner.nonfinite_guard import NonFiniteGuard
from learner.objectives import make_objective
from learner.objectives.base import WHOLE_BATCH, GroupShard, GroupWithAdvantages, StepStats
from policy.factory import add_adapter, build_configured_policy
from policy.lora import export_adapter_state
from replay import Delivery, ReplayUnavailableError, StoreLostError, open_store
from replay.record import CandidateGroup
from reward_service.multi_reward import group_advantages

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, config: dict, store_url: str, checkpoint_root: str, consumer: str = "learner-0",
                 rank: int = 0) -> None:
        self.config = LearnerSettings.model_validate(config)
        self.rank, self.world_size = rank, self.config.run.num_learners
        alg = self.config.algorithm
        torch.manual_seed(self.config.run.seed)
        self.policy = build_configured_policy(self.config.policy)
        self.adapter = alg.effective_adapter_name
        add_adapter(self.policy, self.adapter, self.config.lora)
        self.params = [p for p in self.policy.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=alg.learning_rate, weight_decay=alg.weight_decay)
        self.anchor_rng = torch.Generator().manual_seed(self.config.run.seed + 1)
        # Chosen once here; NFT adds an EMA "old" adapter (the sampling policy, what is broadcast) and a reference adapter.
        self.objective = make_objective(self.policy, self.adapter, alg, self.config.reward, self.config.run.seed, self.anchor_rng)
        self.geometry = PolicyGeometry.of(self.policy, self.config)
        # Records larger than the largest group this policy can use are refused before they are read.
        # Rank 0 alone reads and acks the store: exactly-once accounting has one owner.
        self.store = open_store(store_url, max_record_bytes=self.geometry.max_record_bytes()) if rank == 0 else None
        self.guard = NonFiniteGuard(alg.max_nonfinite_steps)
        self.quarantined: Counter[str] = Counter()  # this iteration's quarantined groups, by reason
        self.nonfinite_steps = 0  # this iteration's skipped optimiser steps
        self.reference_verdicts: dict[str, bool] = {}  # buffer groups checked at the door: usable or not
        self.checkpoint_root = Path(checkpoint_root)
        self.consumer = consumer
        self.version = 0
        self.iteration = 0
        self.buffer_rng = np.random.default_rng(self.config.run.seed + 2)
        self.unacked: list[Delivery] = []  # applied, waiting for the next checkpoint
        self.applied_since_checkpoint: list[str] = []
        self.restored_applied: set[str] = set()
        self._adapter_ref = None
        # Deliveries made before this time (to a previous process of this learner, or to a pull an
        # outage cut short) are taken back by the next pull instead of after the store's claim_idle_s.
        self._reclaim_before: float | None = None
        self.peers: LearnerPeers | None = None
        if rank == 0 and self.world_size > 1:
            self.peers = LearnerPeers.start(type(self), (config, store_url, checkpoint_root, consumer), self.config.run,
                                            self.policy.device)
        if _restarted_by_ray():  # max_restarts: continue from the newest checkpoint, if there is one
            try:
                self.restore_latest()
                return
            except CheckpointNotFound:
                self._reclaim_before = time.monotonic()
                log.warning("learner restarted before its first checkpoint: starting from the initial adapter")
        if self.peers is not None:
            self.peers.sync(self.replica_state())

    # ------------------------------------------------------------------ broadcast
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The sampling policy's adapter tensors (the trained adapter, or NFT's old adapter) in the workers'
        dtype: the learner keeps them in float32, a worker computes in `policy.dtype`."""
        return export_adapter_state(self.policy.transformer, self.objective.sampling_adapter, dtype=self.policy.dtype)

    def publish(self) -> Published:
        """Put the current adapter in the object store once; returns its version and size."""
        import ray

        state = self.adapter_state()
        self._adapter_ref = ray.put(state)
        return Published(version=self.version, nbytes=sum(t.numel() * t.element_size() for t in state.values()))

    def current_adapter(self):
        """(version, ObjectRef of the adapter tensors): what a (re)started rollout worker loads."""
        if self._adapter_ref is None:
            self.publish()
        return self.version, self._adapter_ref

    # ------------------------------------------------------------------ data
    def _pull_on_policy(self, num_groups: int, timeout_s: float) -> list[Delivery]:
        """Up to `num_groups` fresh groups; duplicates of applied groups are set aside, not trained on."""
        min_version = self.version - self.config.algorithm.max_policy_lag
        seen = {d.group_id for d in self.unacked}
        taken: list[Delivery] = []
        deadline = time.monotonic() + timeout_s
        try:  # a quarantined group counts as one of the `num_groups` produced: it will not come back
            while len(taken) + sum(self.quarantined.values()) < num_groups and time.monotonic() < deadline:
                block_ms = int(max(1, min(1000, (deadline - time.monotonic()) * 1000)))
                wanted = num_groups - len(taken) - sum(self.quarantined.values())
                for d in self._pull(wanted, block_ms, min_version):
                    if d.group_id in self.restored_applied:
                        self.store.ack(d)  # its update is in the restored checkpoint
                    elif d.group_id in seen:
                        self.unacked.append(d)  # a second delivery of a group already applied
                    elif self._admit(d.group, lambda reason, d=d: self.store.quarantine(d, reason)):
                        seen.add(d.group_id)
                        taken.append(d)
        except ReplayUnavailableError:
            self._reclaim_before = time.monotonic()  # the call is made again; take back what this one held
            raise
        # Arrival order depends on which worker finished first; training in id order makes the anchor
        # draws, and so the update, a function of the groups alone.
        return sorted(taken, key=lambda d: d.group_id)

    def _pull(self, n: int, block_ms: int, min_version: int) -> list[Delivery]:
        """`store.pull`, reclaiming at once every delivery made before `_reclaim_before`: those idle
        longer than this learner has been running since then."""
        options = self.store.options
        if self._reclaim_before is not None:
            age = time.monotonic() - self._reclaim_before
            if age >= options.claim_idle_s:
                self._reclaim_before = None  # the store's own reclaiming covers them now
            else:
                self.store.options = options.model_copy(update={"claim_idle_s": max(age, 1e-3)})
        try:
            return self.store.pull(n, self.consumer, block_ms, min_policy_version=min_version)
        finally:
            self.store.options = options

    def _admit(self, group: CandidateGroup, quarantine) -> bool:
        """True if this learner can use `group`; otherwise `quarantine(reason)` and count it."""
        try:
            check_group(group, self.geometry, self.config, self.version, lambda p: self.policy.text_conditioning([p]))
        except GroupRejected as err:
            log.warning("quarantined group %s (policy version %d): %s", group.group_id, group.policy_version, err)
            quarantine(str(err))
            self.quarantined[err.reason] += 1
            return False
        return True

    def _usable_reference(self, group: CandidateGroup) -> bool:
        """`_admit` for a buffer group, checked once (a group drawn again is not checked again)."""
        if group.group_id not in self.reference_verdicts:
            quarantine = lambda reason: self.store.buffer_quarantine(group.group_id, reason)  # noqa: E731
            self.reference_verdicts[group.group_id] = self._admit(group, quarantine)
        return self.reference_verdicts[group.group_id]

    def _advantages(self, group: CandidateGroup) -> torch.Tensor:
        weights = self.config.reward.weights
        scores = {h: group.rewards[h].numpy() for h in weights}
        adv = group_advantages(scores, weights, group.reward_valid.numpy(), self.config.reward.advantage)
        return torch.from_numpy(adv)

    # ------------------------------------------------------------------ update
    def train_groups(self, groups: list[CandidateGroup]) -> TrainStats:
        """`updates_per_iteration` optimiser steps over `groups`; returns the iteration's statistics."""
        advantages = [self._advantages(g) for g in groups]
        usable = [(g, a) for g, a in zip(groups, advantages) if bool(a.abs().sum() > 0)]
        if self.peers is None:
            step = self._train_shard_of(usable, WHOLE_BATCH)
        else:
            try:
                step = self.peers.train(usable, lambda shard: self._train_shard_of(usable, shard))
            except distributed.RankLost as err:
                restart_group(err)
        return TrainStats(groups=len(groups), groups_without_signal=len(groups) - len(usable),
                          group_reward_means=self._reward_means(groups), **dataclasses.asdict(step))

    def _train_shard_of(self, usable: list[GroupWithAdvantages], shard: GroupShard) -> StepStats:
        self.policy.transformer.train()
        try:
            return self.objective.train_step(usable, self.optimizer, self._guarded_step, shard)
        finally:
            self.policy.transformer.eval()

    def _reward_means(self, groups: list[CandidateGroup]) -> dict[str, float]:
        """Per reward head, the mean over the groups of each group's mean over its valid branches."""
        valid = [g for g in groups if g.reward_valid.any()]
        return {h: _mean([float(g.rewards[h][g.reward_valid].mean()) for g in valid]) for h in self.config.reward.weights}

    def _guarded_step(self, loss: float, group_ids: list[str]) -> tuple[bool, float]:
        """The optimiser step, taken only if `loss` and the gradients are finite: (taken, gradient norm)."""
        max_norm = self.config.algorithm.max_grad_norm
        if self.world_size > 1:
            loss = distributed.sum_gradients(self.params, loss)
        stepped, grad_norm = self.guard.step(self.optimizer, self.params, loss, max_norm, group_ids)
        self.nonfinite_steps += not stepped
        return stepped, grad_norm

    def train_on_policy(self, num_groups: int, timeout_s: float = 600.0) -> UpdateStats:
        t0 = time.perf_counter()
        deliveries = self._pull_on_policy(num_groups, timeout_s)
        stats = self.train_groups([d.group for d in deliveries])
        self.unacked.extend(deliveries)
        self.applied_since_checkpoint.extend(d.group_id for d in deliveries)
        return self._finish_iteration(stats, t0)

    def train_from_buffer(self, num_groups: int) -> UpdateStats:
        t0 = time.perf_counter()
        groups: list[CandidateGroup] = []
        for _ in range(3):  # a quarantined reference group leaves the buffer: draw again in its place
            drawn = self.store.buffer_sample(num_groups - len(groups), self.buffer_rng)
            kept = [g for g in drawn if self._usable_reference(g)]
            groups += kept
            if len(kept) == len(drawn):
                break
        if not groups:
            raise RuntimeError("the semi-on-policy buffer is empty: collect or import reference groups first")
        return self._finish_iteration(self.train_groups(groups), t0)

    def _finish_iteration(self, stats: TrainStats, t0: float) -> UpdateStats:
        self.iteration += 1
        self.version += 1
        self._adapter_ref = None
        stats = UpdateStats(**dict(stats), policy_version=self.version, update_s=time.perf_counter() - t0,
                            quarantined=dict(self.quarantined), nonfinite_steps=self.nonfinite_steps)
        self.nonfinite_steps = 0
        self.quarantined.clear()  # kept until here: a pull made again after an outage still counts them
        return stats

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, driver: DriverState | None = None) -> str:
        """Write a checkpoint (the driver's part beside the learner's state), then ack every delivery
        whose update it contains; returns its directory."""
        state = {
            "policy_version": self.version,
            "applied_group_ids": self.applied_since_checkpoint,
            "anchor_rng": self.anchor_rng.get_state().tolist(),
            "buffer_rng": self.buffer_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state().tolist(),
            # What this checkpoint applied but has not acked yet: a restore acks these exactly.
            "unacked": [{"group_id": d.group_id, "entry_id": d.entry_id, "consumer": d.consumer, "handle": d.handle}
                        for d in self.unacked],
            **({self.objective.name: objective_state} if (objective_state := self.objective.state_dict()) else {}),
            **(driver.model_dump() if driver is not None else {}),
        }
        path = save_learner_checkpoint(self.checkpoint_root, self.iteration, self.policy.transformer, self.adapter, self.optimizer, state,
                                       extra_adapters=self.objective.checkpoint_adapters)
        for d in self.unacked:
            self.store.ack(d)
        self.unacked.clear()
        self.applied_since_checkpoint = []
        return str(path)

    def restore_latest(self) -> RestoreResult:
        """Load the newest checkpoint; returns where it put the learner, and the driver's part."""
        path = latest_checkpoint(self.checkpoint_root)
        state = load_learner_checkpoint(path, self.policy.transformer, self.adapter, self.optimizer,
                                        extra_adapters=self.objective.checkpoint_adapters)
        self.objective.load_state_dict(state.get(self.objective.name, {}))
        self.iteration, self.version = int(state["iteration"]), int(state["policy_version"])
        self.restored_applied = set(state["applied_group_ids"])
        self._check_applied_set(int(state["iteration"]))
        self._ack_restored(state.get("unacked", []))
        self.anchor_rng.set_state(torch.tensor(state["anchor_rng"], dtype=torch.uint8))
        self.buffer_rng.bit_generator.state = state["buffer_rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self._adapter_ref = None
        self._reclaim_before = time.monotonic()  # deliveries held before the restore come back at once
        if self.peers is not None:
            self.peers.sync(self.replica_state())
        log.info("learner restored %s (iteration %d, version %d)", path, self.iteration, self.version)
        written_by_driver = state.get("run_tag") is not None and state.get("metrics_rows") is not None
        driver = DriverState(metrics_rows=state["metrics_rows"], run_tag=state["run_tag"]) if written_by_driver else None
        return RestoreResult(path=str(path), iteration=self.iteration, policy_version=self.version, driver=driver)

    def _ack_restored(self, pending: list[dict]) -> None:
        """Ack the deliveries the restored checkpoint applied but its process did not ack (it died
        between writing the checkpoint and acking), however old they are by now."""
        for p in pending:
            delivery = Delivery(_AppliedGroup(p["group_id"]), p["entry_id"], p["consumer"], handle=p["handle"])
            try:
                self.store.ack(delivery)
            except ReplayUnavailableError as err:  # then they are acked when delivered again (restored_applied)
                log.warning("acking %s after the restore failed: %s", p["group_id"], err)
                return

    def _check_applied_set(self, iteration: int) -> None:
        """The groups of the checkpoint before the restored one were acked before the restored one was
        written: if the store lists none of them as applied, its applied set was lost (the restored
        checkpoint's own groups are acked again by the restore, so they cannot tell)."""
        older = [p for p in checkpoints_newest_first(self.checkpoint_root)
                 if int(p.name[len(CHECKPOINT_PREFIX):]) < iteration]
        applied = read_checkpoint_state(older[0]).applied_group_ids if older else []
        if applied and not any(self.store.is_applied(g) for g in applied):
            raise StoreLostError(
                f"checkpoint {older[0]} applied {len(applied)} groups, but the replay store {self.store!r} lists none "
                f"of them as applied (e.g. {applied[0]}): its applied set was lost, and groups would be trained on a "
                "second time. Resume on the store this run used (restore its data), or start a new run with a new "
                "--output."
            )

    def status(self) -> LearnerStatus:
        return LearnerStatus(iteration=self.iteration, version=self.version, unacked=len(self.unacked))

    # ------------------------------------------------------------------ the other ranks of a learner group
    def join_group(self, address: str, port: int, world_size: int) -> None:
        distributed.join_process_group(address, port, self.rank, world_size, self.policy.device)

    def replica_state(self) -> dict:
        """What makes another rank this learner's replica: adapter, optimiser, generators, position."""
        model = self.policy.transformer
        return {"adapter": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": on_cpu(self.optimizer.state_dict()), "objective": self.objective.state_dict(),
                "anchor_rng": self.anchor_rng.get_state(), "torch_rng": torch.get_rng_state(),
                "iteration": self.iteration, "version": self.version}

    def load_replica_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.policy.transformer.named_parameters():
                if p.requires_grad:
                    p.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.anchor_rng.set_state(state["anchor_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.version = state["iteration"], state["version"]

    def train_shard(self, payload: ShardPayload) -> StepStats:
        """A rank > 0's part of an iteration's update: its own groups replayed, the others' draws made."""
        shard = GroupShard(self.rank, payload.world_size)
        groups = payload.groups()
        usable = [(g, self._advantages(g) if shard.owns(i) else None) for i, g in enumerate(groups)]
        try:
            step = self._train_shard_of(usable, shard)
        finally:
            self.iteration += 1
            self.version += 1
        return step


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


@dataclass(frozen=True)
class _AppliedGroup:
    """Stands for a group in a delivery rebuilt from a checkpoint (an ack reads only its id)."""

    group_id: str


def _restarted_by_ray() -> bool:
    """True inside an actor that Ray has restarted (max_restarts), so its constructor runs again."""
    import ray

    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray's own property reads a deprecated attribute
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)
