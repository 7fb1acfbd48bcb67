"""The running system behind the driver: Ray, the replay store, the reward pool, the learner actor and
the rollout fleet, with one method per step of the training loop.

The driver (`learner.main`) owns the control flow and calls these; every actor owns its resources;
only small typed summaries and object references pass through the driver.

Faults (docs/operations.md):
- the learner actor has `max_restarts`; a restarted learner restores its newest checkpoint in its
  constructor and takes back the deliveries its previous process held. A call it was serving is
  made again when the restored learner is where the call found it (e.g. the update of the current
  iteration); when the restore went back further (updates after the checkpoint were lost),
  `LearnerRestored` tells the driver to continue from the checkpoint's iteration, as `--resume` would.
- a replay store that stays unreachable past its own bounded retries (`ReplayUnavailableError`) makes
  the driver wait for it (at most `store_outage_s`) and make the call again;
- rollout worker and reward actor failures are handled by the fleet and the reward pool.
Scaling: `apply_scaling` reads the output directory's scale request (`learner.scale`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from controller.config import Config
from learner.checkpoint import latest_checkpoint
from learner.learner_actor import Learner
from controller.metrics import ProjectMetrics
from controller.ray_cluster import init_ray
from controller.rollout_fleet import RolloutFleet, wait_for_store
from controller.scale import ScaleRequestError, read_scale_request
from controller.store_identity import pin_store_epoch
from replay import URL_ENV as REPLAY_URL_ENV, ReplayUnavailableError, open_store, with_store_option
from reward_service.server import RewardServer
from rollout_workers.tasks import EvalResult, GroupSummary, RolloutTask
from rollout_workers.worker import RolloutWorker

log = logging.getLogger(__name__)


class LearnerRestored(RuntimeError):
    """The learner restarted and restored a checkpoint older than the driver's position: the driver
    continues from `iteration` (the updates after that checkpoint were lost and are redone)."""

    def __init__(self, iteration: int, version: int, during: str):
        super().__init__(f"the learner restarted during {during} and restored iteration {iteration} (version {version})")
        self.iteration, self.version = iteration, version


@dataclass
class System:
    config: Config
    output: Path
    store_url: str
    reward_server: "ray.actor.ActorHandle"
    learner: "ray.actor.ActorHandle"
    fleet: RolloutFleet
    metrics: ProjectMetrics
    version: int = 0
    learner_iteration: int = 0  # iterations the learner has done, as the driver saw them
    timings: dict = field(default_factory=dict)
    store_outage_s: float = 600.0
    learner_restart_timeout_s: float = 1800.0
    max_call_attempts: int = 5
    learner_restarts: int = 0  # restarts of the learner this driver has seen
    store_waits: int = 0  # learner calls that met an unreachable replay store
    reward_actors: int = 0
    _scale_checked_at: float = 0.0
    _scale_error: str = ""
    _reward_resize: "ray.ObjectRef | None" = None
    _corrupt_seen: int = 0

    @classmethod
    def start(
        cls,
        config: Config,
        output: Path,
        *,
        worker_cls: type = RolloutWorker,
        worker_kwargs: dict | None = None,
        worker_options: dict | None = None,
        learner_cls: type = Learner,
        learner_max_restarts: int = 3,
    ) -> System:
        """Start the reward server, the learner and the rollout fleet (at the counts of the output
        directory's scale request, if there is one, else the config's)."""
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        rollout, reward = config.rollout, config.reward
        request = _read_request(output)
        num_workers = (request and request.rollout_workers) or rollout.num_workers
        num_reward_actors = (request and request.reward_actors) or reward.num_actors
        init_ray(num_workers * rollout.num_cpus_per_worker + num_reward_actors + 1, config.run.dashboard_port)
        base_url = config.replay.url or os.environ.get(REPLAY_URL_ENV) or (output / "replay").resolve().as_uri()
        # Every process that opens the store (learner, rollout workers) gets the configured queue bound.
        store_url = with_store_option(base_url, "max_queue_len", config.replay.max_queue_groups)
        store_url, stats = pin_store_epoch(store_url, output)  # every actor checks the run's store epoch
        corrupt_before = stats.corrupt  # a resumed run counts only what it finds itself
        # Restarted by Ray with its calls retried: a lost scoring call is simply made again.
        reward_server = ray.remote(RewardServer).options(max_concurrency=64, num_cpus=0, max_restarts=3, max_task_retries=3).remote(
            [(reward.model, reward.options)],
            num_actors=num_reward_actors,
            batch_size=reward.batch_size,
            num_gpus=reward.num_gpus_per_actor,
            timeout_s=reward.timeout_s,
            resources=reward.resources or None,
        )
        learner = (
            ray.remote(learner_cls)
            .options(num_cpus=1, num_gpus=config.run.learner_num_gpus, resources=config.run.learner_resources or None,
                     max_restarts=learner_max_restarts, max_task_retries=0)
            .remote(config.learner_settings().model_dump(mode="json"), store_url, str(output / "checkpoints"))
        )
        # The workers start while the learner builds its policy; they pull its adapter when it is ready.
        fleet = RolloutFleet(config, reward_server, store_url, learner, num_workers, worker_cls=worker_cls,
                             worker_options=worker_options, worker_kwargs=worker_kwargs, wait=False)
        ray.get(learner.publish.remote())
        fleet.wait_ready()
        system = cls(config, output, store_url, reward_server, learner, fleet, ProjectMetrics())
        system.reward_actors = ray.get(reward_server.num_actors.remote())
        system._corrupt_seen = corrupt_before
        system._record_sizes()
        return system

    # ------------------------------------------------------------------ the loop's steps
    def rollout(self, tasks: list[RolloutTask]) -> list[GroupSummary]:
        t0 = time.perf_counter()
        summaries = self.fleet.run(tasks, on_tick=self.apply_scaling)
        self.timings["rollout_s"] = time.perf_counter() - t0
        self.timings["reward_s"] = sum(s.reward_s for s in summaries) / max(1, self.fleet.size)
        self.metrics.observe_phase("rollout", self.timings["rollout_s"])
        self.metrics.observe_phase("reward", self.timings["reward_s"])
        for s in summaries:
            self.metrics.count_groups_produced(worker=s.worker)
            if not s.stored:
                self.metrics.count_groups_dropped(reason=s.drop_reason.split(" ")[0] or "unknown")
        return summaries

    def update_on_policy(self, num_groups: int) -> dict:
        return self._update("train_on_policy", num_groups, self.config.reward.timeout_s)

    def update_from_buffer(self, num_groups: int) -> dict:
        return self._update("train_from_buffer", num_groups)

    def _update(self, method: str, *args) -> dict:
        self._check_learner(method)
        stats = self._call_learner(method, *args)
        if stats["policy_version"] != self.version + 1:  # restarted between the check and the call
            status = ray.get(self.learner.status.remote())
            raise LearnerRestored(status["iteration"], status["version"], method)
        self.learner_iteration += 1
        self.version = stats["policy_version"]
        self.timings["update_s"] = stats["update_s"]
        self.metrics.observe_phase("update", stats["update_s"])
        self.metrics.record_update(stats)  # consumed, applied, quarantined, skipped non-finite steps
        self.metrics.set_policy_version(self.version)
        self._record_replay()
        return stats

    def broadcast(self, force: bool = False) -> None:
        t0 = time.perf_counter()
        version, nbytes = self._call_learner("publish")
        _, ref = self._call_learner("current_adapter")
        self.fleet.broadcast(version, ref, force)
        self.timings["broadcast_s"] = time.perf_counter() - t0
        self.metrics.observe_phase("broadcast", self.timings["broadcast_s"])
        self.metrics.count_broadcast_bytes(nbytes * self.fleet.size)

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

    def checkpoint(self, driver_state: dict) -> str:
        # A learner restarted at this very iteration restored the checkpoint this call was writing.
        done = lambda: str(latest_checkpoint(self.output / "checkpoints"))  # noqa: E731
        return self._call_learner("save_checkpoint", driver_state, already_done=done)

    def restore(self) -> dict:
        state = self._call_learner("restore_latest", expect_iteration=None)
        self.learner_iteration = int(state["iteration"])
        self.version = int(state["policy_version"])
        self.broadcast()
        return state

    def resync(self, restored: LearnerRestored) -> int:
        """After `LearnerRestored`: align the driver and the workers with the restored learner;
        returns the iteration to continue from."""
        self.learner_iteration, self.version = restored.iteration, restored.version
        self.metrics.set_policy_version(self.version)
        self.broadcast(force=True)  # workers holding a newer (lost) adapter go back to the restored one
        return restored.iteration

    def replay_stats(self) -> dict:
        store = open_store(self.store_url)
        try:
            return store.stats().model_dump()
        finally:
            store.close()

    # ------------------------------------------------------------------ scaling
    def apply_scaling(self, min_interval_s: float = 1.0) -> None:
        """Resize the rollout fleet and the reward pool to the output directory's scale request
        (`python -m learner.scale`); the learner is not touched. Cheap: reads one small file at most
        once per `min_interval_s`."""
        now = time.monotonic()
        if now - self._scale_checked_at < min_interval_s:
            return
        self._scale_checked_at = now
        if self._reward_resize is not None and ray.wait([self._reward_resize], timeout=0)[0]:
            try:
                ray.get(self._reward_resize)
            except Exception as err:  # e.g. new reward actors could not start: keep running with the old ones
                log.error("resizing the reward pool failed: %s", err)
            self._reward_resize = None
        if self._reward_resize is None:  # asked each time: a restarted reward server starts at its first size
            self.reward_actors = ray.get(self.reward_server.num_actors.remote())
        request = _read_request(self.output, self)
        if request is not None:
            if request.rollout_workers and request.rollout_workers != self.fleet.size:
                log.info("scaling rollout workers %d -> %d", self.fleet.size, request.rollout_workers)
                self.fleet.resize(request.rollout_workers, wait=False)
            if request.reward_actors and request.reward_actors != self.reward_actors and self._reward_resize is None:
                log.info("scaling reward actors %d -> %d", self.reward_actors, request.reward_actors)
                self._reward_resize = self.reward_server.resize.remote(request.reward_actors)
        self._record_sizes()

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

    def _record_sizes(self) -> None:
        self.metrics.set_rollout_workers(self.fleet.ready_size)
        self.metrics.set_reward_actors(self.reward_actors)

    # ------------------------------------------------------------------ fault handling
    def _call_learner(self, method: str, *args, expect_iteration: int | None | str = "current",
                      already_done: Callable[[], object] | None = None):
        """`learner.<method>(*args)`, made again after a learner restart that restored the state the
        call started from, or after an outage of the replay store; bounded by `max_call_attempts`."""
        expected = self.learner_iteration if expect_iteration == "current" else expect_iteration
        last: Exception | None = None
        for _ in range(self.max_call_attempts):
            try:
                return ray.get(getattr(self.learner, method).remote(*args))
            except RayActorError as err:
                last = err
                status = self._await_learner()
                self.learner_restarts += 1
                if expected is not None and status["iteration"] != expected:
                    raise LearnerRestored(status["iteration"], status["version"], method) from err
                log.warning("the learner restarted during %s and restored iteration %d; calling again", method, status["iteration"])
                if already_done is not None:
                    return already_done()
            except RayTaskError as err:
                if not isinstance(err.cause, ReplayUnavailableError):
                    raise
                last = err.cause
                self.store_waits += 1
                log.warning("learner %s met an unreachable replay store (%s); waiting for it", method, err.cause)
                self._await_store()
        raise RuntimeError(f"learner call {method} failed {self.max_call_attempts} times; last error: {last}") from last

    def _check_learner(self, during: str) -> None:
        """Raise LearnerRestored if the learner restarted (and restored an older checkpoint) unseen."""
        status = self._call_learner("status", expect_iteration=None)
        if status["iteration"] != self.learner_iteration:
            self.learner_restarts += 1
            raise LearnerRestored(status["iteration"], status["version"], during)

    def _await_learner(self) -> dict:
        """Wait for Ray to restart the learner (its constructor restores the newest checkpoint)."""
        start = time.monotonic()
        deadline = start + self.learner_restart_timeout_s
        status = self.learner.status.remote()
        while True:
            try:
                return ray.get(status, timeout=min(30.0, max(1.0, deadline - time.monotonic())))
            except GetTimeoutError as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"the learner did not come back within {self.learner_restart_timeout_s}s") from err
                log.warning("waiting %.0fs for the learner to restart (its node or its resources may be missing)",
                            time.monotonic() - start)
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                status = self.learner.status.remote()
            except ActorDiedError as err:
                raise RuntimeError(
                    "the learner died and Ray did not restart it (restarts spent, or its node is gone for good); "
                    f"continue with `python -m learner.main --resume --output {self.output}`"
                ) from err

    def _await_store(self) -> None:
        wait_for_store(self.store_url, self.store_outage_s, "the learner cannot pull or ack groups")

    def shutdown(self) -> None:
        self.fleet.shutdown()
        try:
            ray.get(self.reward_server.shutdown.remote(), timeout=60)
        except Exception as err:  # shutting down anyway
            log.warning("reward server shutdown: %s", err)
        ray.kill(self.reward_server, no_restart=True)
        ray.kill(self.learner, no_restart=True)


def _read_request(output: Path, system: System | None = None):
    """The scale request, or None; a broken file is logged (once per distinct problem), not fatal."""
    try:
        return read_scale_request(output)
    except ScaleRequestError as err:
        if system is None or system._scale_error != str(err):
            log.error("ignoring the scale request: %s", err)
            if system is not None:
                system._scale_error = str(err)
        return None
