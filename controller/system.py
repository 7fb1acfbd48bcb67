"""The running system behind the driver, with one method per step of the training loop.

The driver (controller.driver) owns the control flow and calls these; every actor owns its resources;
only small typed summaries and object references pass through the driver. Its parts:
start-up (controller.assembly), the learner and its fault recovery (controller.learner_handle),
scaling (controller.fleet_scaling); rollout worker and reward actor failures are handled by the fleet
and the reward pool (docs/operations.md).

Pipelining (`algorithm.max_policy_lag` >= 1) is a property of these steps, not of the driver's loop:
`rollout` leaves the next iteration's tasks running on the fleet, `update_on_policy` keeps the fleet
pumping while the learner trains, and `broadcast` queues the new adapter behind the workers' current
groups instead of waiting for them. With lag 0 nothing runs in the background: the steps are strictly
sequential. `timeline` records when each update ran (tests and benchmarks measure the overlap).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from controller.assembly import assemble
from controller.fleet_scaling import Scaler
from controller.learner_handle import LearnerHandle, LearnerRestored
from controller.metrics import ProjectMetrics
from controller.rollout_fleet import RolloutFleet
from controller.config import Config
from learner.messages import DriverState, RestoreResult, UpdateStats
from replay import ReplayUnavailableError, min_policy_version, open_store
from rollout_workers.tasks import EvalResult, GroupSummary, RolloutTask

log = logging.getLogger(__name__)

__all__ = ["LearnerRestored", "System"]


@dataclass
class System:
    config: Config
    output: Path
    store_url: str
    reward_server: "ray.actor.ActorHandle"
    learner: LearnerHandle
    fleet: RolloutFleet
    metrics: ProjectMetrics
    scaler: Scaler
    timings: dict = field(default_factory=dict)  # this iteration's phases, in seconds
    # (phase, start, end) in time.time() seconds, the latest first-in: "update" for each learner update.
    timeline: deque = field(default_factory=lambda: deque(maxlen=10_000))
    _corrupt_seen: int = 0

    @classmethod
    def start(cls, config: Config, output: Path, **options) -> System:
        """Start the reward server, the learner and the rollout fleet (controller.assembly; `options`
        go to `assemble`: worker class, its arguments, the learner's class and restarts)."""
        parts = assemble(config, output, **options)
        metrics = ProjectMetrics()
        return cls(config, Path(output), parts.store_url, parts.reward_server,
                   LearnerHandle(parts.learner, Path(output), parts.store_url, placement=parts.learner_placement),
                   parts.fleet, metrics,
                   Scaler(Path(output), parts.fleet, parts.reward_server, metrics), _corrupt_seen=parts.corrupt_before)

    @property
    def version(self) -> int:
        """The policy version the driver last saw the learner reach."""
        return self.learner.version

    @property
    def learner_restarts(self) -> int:
        return self.learner.restarts

    @property
    def store_waits(self) -> int:
        """Learner calls that met an unreachable replay store."""
        return self.learner.store_waits

    def apply_scaling(self) -> None:
        """Resize the fleet and the reward pool to the scale request (`python -m learner.scale`)."""
        self.scaler.apply()

    # ------------------------------------------------------------------ the loop's steps
    @property
    def max_policy_lag(self) -> int:
        return self.config.algorithm.max_policy_lag

    def rollout(self, tasks: list[RolloutTask], next_tasks: list[RolloutTask] = ()) -> list[GroupSummary]:
        """The groups of `tasks` (made now, or already running since the iteration before); with
        pipelining, `next_tasks` start behind them and run through the update. A group staler than
        `algorithm.max_policy_lag` comes back as dropped (`stale (...)`): the learner's pull drops it."""
        t0 = time.perf_counter()
        summaries = self.fleet.collect(tasks, on_tick=self.apply_scaling)
        if self.max_policy_lag >= 1:
            self.fleet.submit(list(next_tasks))
        self.timings["rollout_s"] = time.perf_counter() - t0
        self.timings["reward_s"] = sum(s.reward_s for s in summaries) / max(1, self.fleet.size)
        self.metrics.observe_phase("rollout", self.timings["rollout_s"])
        self.metrics.observe_phase("reward", self.timings["reward_s"])
        summaries = [self._mark_stale(s) for s in summaries]
        for s in summaries:
            self.metrics.count_groups_produced(worker=s.worker)
            if not s.stored:
                self.metrics.count_groups_dropped(reason=s.drop_reason.split(" ")[0] or "unknown")
        return summaries

    def _mark_stale(self, summary: GroupSummary) -> GroupSummary:
        """The learner at `self.version` pulls with the same bound (replay.min_policy_version)."""
        oldest = min_policy_version(self.version, self.max_policy_lag)
        if not summary.stored or summary.policy_version >= oldest:
            return summary
        why = (f"stale (made by policy version {summary.policy_version}, the learner is at {self.version}; "
               f"algorithm.max_policy_lag={self.max_policy_lag})")
        return summary.model_copy(update={"stored": False, "drop_reason": why})

    def update_on_policy(self, num_groups: int) -> UpdateStats:
        stats = self._while_rolling_out("update", self.learner.train_on_policy, num_groups, self.config.reward.timeout_s)
        return self._record_update(stats)

    def _while_rolling_out(self, phase: str, call, *args):
        """`call(*args)` (a learner call); while the fleet has work, it runs in a thread and the fleet is
        pumped here, so the next iteration's groups are made meanwhile (only this thread touches the
        fleet; only that one the learner handle)."""
        start = time.time()
        try:
            if not self.fleet.busy:
                return call(*args)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-call") as pool:
                future = pool.submit(call, *args)
                while not future.done():
                    self.apply_scaling()  # reads the scale request at most once a second
                    self.fleet.pump(timeout=0.02)
                return future.result()
        finally:
            self.timeline.append((phase, start, time.time()))

    def update_from_buffer(self, num_groups: int) -> UpdateStats:
        return self._record_update(self.learner.train_from_buffer(num_groups))

    def _record_update(self, stats: UpdateStats) -> UpdateStats:
        self.timings["update_s"] = stats.update_s
        self.metrics.observe_phase("update", stats.update_s)
        self.metrics.record_update(stats)  # consumed, applied, quarantined, skipped non-finite steps
        self.metrics.set_policy_version(self.version)
        self._record_replay()
        return stats

    def broadcast(self, force: bool = False) -> None:
        t0 = time.perf_counter()
        published = self.learner.publish()
        _, ref = self.learner.current_adapter()
        # A busy fleet (pipelining) gets the adapter between its groups; an idle one loads it now.
        self.fleet.broadcast(published.version, ref, force, wait=force or not self.fleet.busy)
        self.timings["broadcast_s"] = time.perf_counter() - t0
        self.metrics.observe_phase("broadcast", self.timings["broadcast_s"])
        self.metrics.count_broadcast_bytes(published.nbytes * self.fleet.size)

    def evaluate(self, prompts: list[str], seeds: list[int], keep_frames: int = 0) -> tuple[list[EvalResult], list]:
        """Held-out scores of the current policy, the (prompt, seed) pairs spread over the workers; a
        part whose worker died is evaluated again once the fleet is ready. Frames come back for the
        first `keep_frames` pairs, in order, whichever workers made them."""
        results, frames = [None] * len(prompts), {}
        todo = list(range(len(prompts)))
        for attempt in range(self.fleet.max_attempts):
            self.fleet.wait_ready()
            handles = self.fleet.handles()
            parts = [sorted(todo)[i :: len(handles)] for i in range(len(handles))]
            # A worker keeps the frames of the first videos of its part: those of the pairs < keep_frames.
            calls = [(part, h.evaluate.remote([prompts[j] for j in part], [seeds[j] for j in part],
                                              sum(j < keep_frames for j in part)))
                     for h, part in zip(handles, parts) if part]
            todo = []
            for part, future in calls:
                try:
                    res, fr = ray.get(future)
                except RayActorError:
                    todo.extend(part)
                    continue
                for j, r in zip(part, res):
                    results[j] = r
                frames.update(zip(part, fr))
            if not todo:
                return results, [frames[j] for j in sorted(frames)]
        raise RuntimeError(f"evaluation of {len(todo)} held-out videos failed {self.fleet.max_attempts} times")

    def fill_reference_buffer(self, tasks: list[RolloutTask]) -> dict:
        """Semi-on-policy: import an exported buffer and/or collect the reference groups still missing
        (the adapter is at version 0 then, which is the reference policy exactly: LoRA B starts at
        zero). Returns how many groups were imported and collected, and the buffer's size; the same
        goes to `reference_buffer.json` in the output directory."""
        store = open_store(self.store_url)
        try:
            imported = 0
            if self.config.replay.import_buffer is not None:
                imported = store.import_buffer(self.config.replay.import_buffer)
                log.info("imported %d reference groups from %s", imported, self.config.replay.import_buffer)
            missing = tasks[store.buffer_size():]  # a resumed collection continues where it stopped
            if missing:
                if self.version != 0:
                    raise RuntimeError("reference groups must come from version 0 (the reference policy)")
                self.rollout(missing)
            if self.config.replay.export_buffer:
                store.export_buffer(self.output / "reference_buffer")
            record = {"imported": imported, "collected": len(missing), "size": store.buffer_size()}
        finally:
            store.close()
        (self.output / "reference_buffer.json").write_text(json.dumps(record) + "\n")
        return record

    def checkpoint(self, driver_state: DriverState) -> str:
        return self._while_rolling_out("checkpoint", self.learner.save_checkpoint, driver_state)

    def restore(self) -> RestoreResult:
        restored = self.learner.restore_latest()
        self.broadcast()
        return restored

    def resync(self, restored: LearnerRestored) -> int:
        """After `LearnerRestored`: align the driver and the workers with the restored learner;
        returns the iteration to continue from."""
        self.learner.resync(restored)
        forgotten = self.fleet.abandon()  # prefetched tasks are asked for again from the restored iteration
        if forgotten:
            log.warning("%d rollout tasks in flight were abandoned; their iterations are made again", forgotten)
        self.metrics.set_policy_version(self.version)
        self.broadcast(force=True)  # workers holding a newer (lost) adapter go back to the restored one
        return restored.iteration

    def replay_stats(self) -> dict:
        store = open_store(self.store_url)
        try:
            return store.stats().model_dump()
        finally:
            store.close()

    def _record_replay(self) -> None:
        """Replay queue length and newly found corrupt records, for the dashboards."""
        try:
            with open_store(self.store_url) as store:
                stats = store.stats()
        except ReplayUnavailableError as err:
            log.warning("replay store statistics unavailable: %s", err)
            return
        self.metrics.set_replay_queue_length(stats.queue_length)
        self.metrics.count_replay_corrupt_records(max(0, stats.corrupt - self._corrupt_seen))
        self._corrupt_seen = max(self._corrupt_seen, stats.corrupt)

    def shutdown(self) -> None:
        self.fleet.shutdown()
        try:
            ray.get(self.reward_server.shutdown.remote(), timeout=60)
        except Exception as err:  # shutting down anyway
            log.warning("reward server shutdown: %s", err)
        ray.kill(self.reward_server, no_restart=True)
        self.learner.shutdown()
